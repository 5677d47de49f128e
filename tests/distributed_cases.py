"""Worker for tests/test_distributed.py: run under ``torch.distributed.run`` (gloo, CPU); every rank runs each
case in both modes, compares with single-process spattn on the same inputs, and writes its findings as JSON.

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_cases.py OUT_DIR
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import spattn
from spattn.distributed import (
    Sharding,
    context_parallel_attention,
    count_bytes,
    head_parallel_attention,
    layer_bytes,
    unshard,
)
from spattn.testing import max_err

BS = 64


def cases(world):
    H, Hkv = (4, 2) if world != 3 else (6, 3)
    segments = torch.tensor([[0] * 150 + [1] * 250 + [2] * 200, [0] * 420 + [1] * 180])
    return [
        dict(name="window", pattern=spattn.Sinks(16) | spattn.Window(100), L=600, H=H, Hkv=Hkv, causal=True),
        dict(name="topp_pooled", pattern=spattn.Sinks(16) | spattn.Window(64) | spattn.TopP("pooled", 0.8), L=600,
             H=H, Hkv=Hkv, causal=True, summary="pooled"),
        dict(name="topk_bounds", pattern=spattn.Window(64) | spattn.TopK("bounds", 2), L=600, H=H, Hkv=Hkv,
             causal=True, summary="bounds"),
        dict(name="document", pattern=spattn.Document(segments) & spattn.Window(160), L=600, H=H, Hkv=Hkv, B=2,
             causal=False),
        dict(name="dense_causal", pattern=spattn.Causal(), L=600, H=H, Hkv=Hkv, causal=True),
        dict(name="mqa", pattern=spattn.Sinks(16) | spattn.Window(128), L=600, H=H, Hkv=1, causal=True,
             modes=("head",)),
        # torch's own FlexAttention context parallelism through spattn's adapter (forward: Flex has no CPU backward)
        dict(name="torch_flex", pattern=spattn.Sinks(16) | spattn.Window(100), L=64 * 3 * world, H=H, Hkv=Hkv,
             causal=True, modes=("torch_flex",)),
    ]


def run_case(case, world, rank):
    torch.manual_seed(1)
    B, H, Hkv, L, D = case.get("B", 1), case["H"], case["Hkv"], case["L"], 8
    q = torch.randn(B, H, L, D, dtype=torch.float64)
    k = torch.randn(B, Hkv, L, D, dtype=torch.float64)
    v = torch.randn(B, Hkv, L, D, dtype=torch.float64)
    grad = torch.randn(B, H, L, D, dtype=torch.float64)
    pattern, causal = case["pattern"], case["causal"]
    # single process, whole sequence
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    layout = spattn.compile(pattern, L, L, causal=causal, block_size=BS, batch=B, heads=H, query=qs, key=ks)
    ref = spattn.attention(qs, ks, vs, layout, causal=causal, backend="reference")
    (ref * grad).sum().backward()
    found = {}
    if case["name"] == "torch_flex":
        from torch.distributed.device_mesh import init_device_mesh

        from spattn.distributed import torch_cp

        sharding = torch_cp.ptrr_sharding(layout, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        out = torch_cp.flex_context_parallel_attention(*(sharding.shard(t, rank) for t in (q, k, v)), layout,
                                                       mesh=mesh, sharding=sharding)
        return {"torch_flex": {"out": max_err(out, sharding.shard(ref, rank))}}
    for mode in case.get("modes", ("context", "head")):
        sharding = (Sharding.balanced(layout, world_size=world) if mode == "context"
                    else Sharding.contiguous(L, world, block_size=BS))
        ql, kl, vl = (sharding.shard(t, rank).requires_grad_() for t in (q, k, v))
        with count_bytes() as traffic:
            if mode == "context":
                out = context_parallel_attention(ql, kl, vl, pattern, sharding=sharding, causal=causal,
                                                 block_size=BS, backend="reference")
            else:
                out = head_parallel_attention(ql, kl, vl, pattern, sharding=sharding, causal=causal,
                                              block_size=BS, backend="reference")
            (out * sharding.shard(grad, rank)).sum().backward()
        model = layer_bytes(layout, L, world_size=world, mode=mode, heads=H, kv_heads=Hkv, head_dim=D, batch=B,
                            dtype=torch.float64, sharding=sharding, summary=case.get("summary") if mode == "context"
                            else None)
        full_out = unshard(out.detach(), sharding)
        found[mode] = {
            "out": max_err(out, sharding.shard(ref, rank)),
            "unsharded_out": max_err(full_out, ref),
            "dq": max_err(ql.grad, sharding.shard(qs.grad, rank)),
            "dk": max_err(kl.grad, sharding.shard(ks.grad, rank)),
            "dv": max_err(vl.grad, sharding.shard(vs.grad, rank)),
            "sent_forward": traffic.total("forward"),
            "sent_backward": traffic.total("backward"),
            "model_forward": model["forward"][rank],
            "model_backward": model["backward"][rank],
            # what an all-gather of the key/value rows would send
            "dense_kv_bytes": (world - 1) * sharding.local_length(rank) * B * Hkv * 2 * D * 8,
            "sent_kv_forward": traffic.by_name("forward").get("key_value", 0),
        }
    return found


def rank_order_slices(world, rank):
    """head_parallel_attention without a sharding: equal rank-order slices, and a clear error when unequal."""
    torch.manual_seed(2)
    L, H, Hkv, D = 64 * 2 * world, 2 * world, world, 8
    q, k, v = torch.randn(1, H, L, D), torch.randn(1, Hkv, L, D), torch.randn(1, Hkv, L, D)
    pattern = spattn.Sinks(8) | spattn.Window(40)
    ref = spattn.attention(q, k, v, pattern, causal=True, backend="reference", block_size=BS)
    rows = slice(rank * L // world, (rank + 1) * L // world)
    out = head_parallel_attention(q[:, :, rows], k[:, :, rows], v[:, :, rows], pattern, causal=True, block_size=BS,
                                  backend="reference")
    n = L // world + (1 if rank == 0 else 0)
    try:
        head_parallel_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], pattern, causal=True, block_size=BS)
        message = None
    except ValueError as exc:
        message = str(exc)
    return {"out": max_err(out, ref[:, :, rows]), "uneven_error": message}


def main():
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    for case in cases(world):
        try:
            results[case["name"]] = run_case(case, world, rank)
        except Exception as exc:  # reported to the test, which fails with the message
            results[case["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        results["head_rank_order"] = rank_order_slices(world, rank)
    except Exception as exc:
        results["head_rank_order"] = {"error": f"{type(exc).__name__}: {exc}"}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
