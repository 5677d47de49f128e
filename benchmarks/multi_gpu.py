"""Issue 20: spattn.distributed on several GPUs (NCCL) -- equality first, then scaling, one JSON.

    torchrun --nproc-per-node 4 benchmarks/multi_gpu.py --out $OUT/multi_gpu_4.json       # 4 GPUs
    torchrun --nproc-per-node 1 benchmarks/multi_gpu.py --dry-run --out /tmp/dry.json     # 1 rank (GPU or CPU)
    torchrun --nproc-per-node 2 benchmarks/multi_gpu.py --dry-run                         # CPU gloo smoke run

1. Equality (at --check-len tokens): head-parallel and context-parallel attention against single-device
   spattn on the same bf16 inputs, with the tolerance rule of spattn.testing (golden: the float64 reference
   on the single-device layout; baseline: single-device spattn in bf16), output and dq/dk/dv, for
   Sinks(64) | Window(4096), Sinks(64) | Window(4096) | TopP("pooled", 0.9) and causal dense.
2. Scaling (at each --seq-lens): per layer, forward and forward + backward time (median of --reps after a
   warm-up; barrier-to-barrier, so the slowest rank decides), bytes sent per rank (counted in the
   communication layer) next to the cost model's prediction, and load balance (max / mean per-rank time of
   the attention call alone), for both modes; and torch's own context parallelism with FlexAttention on the
   same masks (spattn.distributed.torch_cp) where it runs.
Rank 0 writes the JSON (machine, versions, commit, command, every row, and what failed or was skipped).
"""

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import spattn
import spattn.distributed as sd
from spattn.bench.env import machine_info
from spattn.testing import assert_within, max_err


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>/distributed/...)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--check-len", type=int, default=16384)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["head", "context", "torch_flex"])
    p.add_argument("--patterns", nargs="+", default=["window", "dynamic", "dense"])
    p.add_argument("--dry-run", action="store_true", help="small sizes: check the script on one rank or on CPU")
    return p.parse_args()


PATTERNS = {
    "window": spattn.Sinks(64) | spattn.Window(4096),
    "dynamic": spattn.Sinks(64) | spattn.Window(4096) | spattn.TopP("pooled", 0.9),
    "dense": spattn.Causal(),
}
DRY_PATTERNS = {  # the same shapes of pattern at the dry run's small lengths
    "window": spattn.Sinks(64) | spattn.Window(512),
    "dynamic": spattn.Sinks(64) | spattn.Window(256) | spattn.TopP("pooled", 0.9),
    "dense": spattn.Causal(),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(mode, pattern, q, k, v, sharding, mesh):
    if mode == "context":
        return sd.context_parallel_attention(q, k, v, pattern, mesh=mesh, sharding=sharding, causal=True)
    if mode == "head":
        return sd.head_parallel_attention(q, k, v, pattern, group=mesh, sharding=sharding, causal=True)
    from spattn.distributed import torch_cp

    return torch_cp.flex_context_parallel_attention(q, k, v, pattern, mesh=mesh, sharding=sharding, causal=True)


def sharding_for(mode, pattern, L, W, layout=None):
    if mode == "head":
        return sd.Sharding.contiguous(L, W)
    if mode == "torch_flex":
        from spattn.distributed import torch_cp

        return torch_cp.ptrr_sharding(layout if layout is not None else pattern, L, W)
    return sd.Sharding.balanced(pattern, L, world_size=W, causal=True)


def equality(args, mesh, device, dtype, rank, W):
    """Both modes against single-device spattn on the same inputs: the tolerance rule on out, dq, dk, dv."""
    L, H, Hkv, D = args.check_len, args.heads, args.kv_heads, args.head_dim
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, g = (torch.randn(1, h, L, D, generator=gen).to(device, dtype) for h in (H, Hkv, Hkv, H))
    for name in args.patterns:
        pattern = PATTERNS[name]
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        layout = spattn.compile(pattern, L, L, causal=True, batch=1, heads=H, device=device, query=q, key=k)
        base = spattn.attention(*leaves, layout, causal=True)
        (base.float() * g.float()).sum().backward()
        gold = [t.detach().double().requires_grad_() for t in (q, k, v)]
        golden = spattn.attention(*gold, layout, causal=True, backend="reference")
        (golden * g.double()).sum().backward()
        for mode in args.modes:
            row = {"pattern": name, "mode": mode, "seq_len": L, "dtype": str(dtype)}
            try:
                sharding = sharding_for(mode, pattern, L, W, layout)
                local = [sharding.shard(t, rank).detach().requires_grad_() for t in (q, k, v)]
                out = run_mode(mode, pattern, *local, sharding, mesh)
                (out.float() * sharding.shard(g, rank).float()).sum().backward()
                pairs = {"out": (out, golden, base)}
                for what, i in (("dq", 0), ("dk", 1), ("dv", 2)):
                    pairs[what] = (local[i].grad, gold[i].grad, leaves[i].grad)
                for what, (fast, gl, bl) in pairs.items():
                    gl, bl = sharding.shard(gl, rank), sharding.shard(bl, rank)
                    row[f"{what}_err"], row[f"{what}_baseline_err"] = max_err(fast, gl), max_err(bl, gl)
                    assert_within(fast, gl, bl, k=2.0, eps=1e-6, what=f"{name} {mode} {what}")
                row["passed"] = True
            except NotImplementedError as exc:  # e.g. torch's Flex CP has no dynamic selection
                row["passed"] = False
                row["skipped"] = f"not supported: {exc}"
            except Exception as exc:  # recorded, and the scaling rows of this (pattern, mode) are skipped
                row["passed"] = False
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc(limit=4)
            rows.append(row)
    return rows


def timed(fn, reps, device, group):
    times = []
    for i in range(reps + 1):
        dist.barrier(group)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        dist.barrier(group)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def scaling(args, mesh, device, dtype, rank, W, passed):
    H, Hkv, D = args.heads, args.kv_heads, args.head_dim
    group = sd.comm.resolve_group(mesh)
    rows = []
    for L in args.seq_lens:
        for name in args.patterns:
            pattern = PATTERNS[name]
            for mode in args.modes:
                row = {"seq_len": L, "pattern": name, "mode": mode, "world_size": W}
                if not passed.get((name, mode), False):
                    row["skipped"] = "not supported or equality check did not pass (see equality)"
                    rows.append(row)
                    continue
                try:
                    sharding = sharding_for(mode, pattern, L, W)
                    Lr = sharding.local_length(rank)
                    gen = torch.Generator(device="cpu").manual_seed(rank)
                    q, k, v, g = (torch.randn(1, h, Lr, D, generator=gen).to(device, dtype) for h in (H, Hkv, Hkv, H))
                    leaves = [t.requires_grad_() for t in (q, k, v)]
                    def forward_only(mode=mode, pattern=pattern, leaves=leaves, sharding=sharding):
                        with torch.no_grad():
                            run_mode(mode, pattern, *leaves, sharding, mesh)

                    def fwd_bwd(mode=mode, pattern=pattern, leaves=leaves, sharding=sharding, g=g):
                        out = run_mode(mode, pattern, *leaves, sharding, mesh)
                        out.backward(g)

                    forward = timed(forward_only, args.reps, device, group)

                    both = timed(fwd_bwd, args.reps, device, group)
                    with sd.count_bytes() as traffic:
                        sync(device)
                        start = time.perf_counter()
                        fwd_bwd()
                        sync(device)
                        own = time.perf_counter() - start
                    own_all = [0.0] * W
                    dist.all_gather_object(own_all, own, group=group)
                    row.update({"forward_seconds": forward, "fwd_bwd_seconds": both,
                                "balance_max_over_mean": max(own_all) / (sum(own_all) / W),
                                "rank_seconds": own_all,
                                "bytes_forward": traffic.total("forward"), "bytes_backward": traffic.total("backward"),
                                "bytes_by_name": {f"{p}:{n}": b for (p, n), b in traffic.bytes.items()}})
                    if mode in ("head", "context") and name != "dynamic":
                        model = sd.layer_bytes(pattern, L, world_size=W, mode=mode, heads=H, kv_heads=Hkv,
                                               head_dim=D, dtype=dtype, sharding=sharding)
                        row["model_bytes_forward"] = model["forward"][rank]
                        row["model_bytes_backward"] = model["backward"][rank]
                    if device.type == "cuda":
                        row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                        torch.cuda.reset_peak_memory_stats(device)
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                gathered = [None] * W
                dist.all_gather_object(gathered, row, group=group)
                rows.append({"rank0": gathered[0], "per_rank_bytes_forward": [r.get("bytes_forward") for r in gathered],
                             "per_rank_bytes_backward": [r.get("bytes_backward") for r in gathered],
                             "per_rank_model_bytes_forward": [r.get("model_bytes_forward") for r in gathered],
                             "errors": [r.get("error") for r in gathered if r.get("error")]})
                if rank == 0:
                    print(json.dumps(rows[-1]["rank0"] | {"errors": rows[-1]["errors"]}), flush=True)
    return rows


def main():
    args = parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.dry_run:
        args.seq_lens, args.check_len = [4096], 1024
        args.heads, args.kv_heads, args.head_dim, args.reps = 4, 2, 32, 1
        PATTERNS.update(DRY_PATTERNS)
        if not cuda:
            args.modes = [m for m in args.modes if m != "torch_flex"]  # its backward needs a GPU
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (W,), mesh_dim_names=("cp",))
    started = time.time()
    checks = equality(args, mesh, device, dtype, rank, W)
    gathered = [None] * W
    dist.all_gather_object(gathered, checks)
    passed = {(c["pattern"], c["mode"]): all(g[i]["passed"] for g in gathered) for i, c in enumerate(checks)}
    if rank == 0:
        for c in checks:
            print(json.dumps({k: v for k, v in c.items() if k != "traceback"}), flush=True)
    rows = scaling(args, mesh, device, dtype, rank, W, passed)
    if rank == 0:
        result = {"issue": 20, "world_size": W, "machine": machine_info(), "dtype": str(dtype),
                  "shape": {"batch": 1, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim},
                  "patterns": {n: repr(PATTERNS[n]) for n in args.patterns}, "dry_run": args.dry_run,
                  "equality": [c for g in gathered for c in g], "scaling": rows,
                  "seconds": time.time() - started}
        kind = "h200" if cuda else "cpu"
        default = f"benchmarks/results/{kind}/distributed/multi_gpu_{W}{'_dry' if args.dry_run else ''}.json"
        out = Path(args.out or default)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
