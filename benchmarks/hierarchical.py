"""Hierarchical (NSA-style) attention on one GPU (H200): correctness first, then forward and forward + backward
time against dense SDPA (FlashAttention) and spattn's window, at 8k / 32k / 64k tokens.

1. Correctness gate (same run, stops on failure): the fast path (every branch ``spattn.attention`` on a Layout,
   triton on CUDA) against the float64 dense reference (``spattn.hierarchical.reference``, CPU) at the fast path's
   selection, forward and backward (q, k, v, gate logits, pooling logits), with the tolerance rule against the
   reference in the test dtype; and the cost model's pair counts against the compiled layouts.
2. Timings (``spattn.bench.timing.median_ms``: triton ``do_bench`` medians): dense SDPA (causal, GQA), spattn
   ``Window(window - 1)`` on its layout, and ``hierarchical_attention`` (all three branches, selection and mix
   included), forward and forward + backward, with the cost model's FLOPs / decode tokens and the fine
   branches' density beside them.

Writes ``$OUT/hierarchical.json`` (default ``benchmarks/results/h200/hierarchical.json``) with machine, versions,
commit and command. Target: < 5 min on an H200.

    python benchmarks/hierarchical.py                          # H200
    python benchmarks/hierarchical.py --quick --device cpu     # a smoke run of the same code at tiny sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.record import make, write
from spattn.bench.timing import median_ms
from spattn.hierarchical import branch_layouts, cost, hierarchical_attention, prefill_pairs, reference
from spattn.testing import assert_within, poison_empty


def correctness(device, dtype, quick: bool) -> list[dict]:
    checks = []
    L, H, Hkv, D = (200, 4, 2, 32) if quick else (1000, 8, 2, 64)
    config = spattn.Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=4,
                                 window=128, pooling="learned") | spattn.Sinks(16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    gl = torch.randn(1, H, L, 3, generator=g)
    pool = (torch.randn(Hkv, 32, generator=g), torch.randn(Hkv, 32, generator=g))
    do = torch.randn(1, H, L, D, generator=g)
    low = torch.float32 if dtype == torch.float32 else dtype
    with torch.no_grad():
        chosen = hierarchical_attention(q.to(device, low), k.to(device, low), v.to(device, low), config,
                                        gate_logits=gl.to(device, low), pool_logits=tuple(p.to(device) for p in pool),
                                        return_info=True)[1]["chosen"].cpu()

    def run(fn, dev, dt, **extra):
        leaves = [x.detach().to(dev, dt).requires_grad_() for x in (q, k, v, gl, *pool)]
        out = fn(*leaves[:3], config, gate_logits=leaves[3], pool_logits=(leaves[4], leaves[5]), **extra)
        (out.double() * do.to(dev).double()).sum().backward()
        return [t.detach().float().cpu() if i == 0 else t.grad.float().cpu() for i, t in
                enumerate([out] + leaves)]

    t0 = time.perf_counter()
    with poison_empty():
        fast = run(hierarchical_attention, device, low)
    golden = run(reference, "cpu", torch.float64, chosen=chosen)
    baseline = run(reference, "cpu", low, chosen=chosen)
    names = ("out", "dq", "dk", "dv", "dgate", "dpool_key", "dpool_value")
    errors = {}
    for name, f, gd, bl in zip(names, fast, golden, baseline, strict=True):
        assert torch.isfinite(f).all(), name
        assert_within(f, gd, bl, k=2.0, eps=1e-5 if low == torch.float32 else 2e-3, what=name)
        errors[name] = float((f.double() - gd).abs().max())
    checks.append({"check": "fast == reference (fwd + bwd, tolerance rule)", "ok": True, "max_abs_err": errors,
                   "seconds": time.perf_counter() - t0})
    layouts = branch_layouts(q.to(device), k.to(device), spattn.Hierarchical(select_count=4, window=128))
    pairs = prefill_pairs(spattn.Hierarchical(select_count=4, window=128), L)
    for name in ("compressed", "selected", "window"):
        got = layouts[name].allowed_pairs().flatten().tolist()
        assert got == [pairs[name]] * len(got), (name, got, pairs[name])
    checks.append({"check": "cost model pairs == layout pairs", "ok": True, "pairs": pairs})
    return checks


def timings(device, dtype, lengths, heads, kv_heads, head_dim, config) -> list[dict]:
    rows = []
    for L in lengths:
        g = torch.Generator(device=device).manual_seed(L)
        q = torch.randn(1, heads, L, head_dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(1, kv_heads, L, head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn(1, kv_heads, L, head_dim, device=device, dtype=dtype, generator=g)
        window_layout = spattn.compile(config.window_pattern(), L, L, causal=True, block_size=config.select_block,
                                       device=device)
        variants = {
            "dense_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                         enable_gqa=heads != kv_heads),
            "window": lambda q, k, v, layout=window_layout: spattn.attention(q, k, v, layout, causal=True),
            "hierarchical": lambda q, k, v: hierarchical_attention(q, k, v, config),
        }
        model = cost(config, L, head_dim=head_dim, heads=heads, kv_heads=kv_heads, dtype_bytes=q.element_size())
        row = {"length": L, "cost": model, "window_density": window_layout.density()}
        for name, fn in variants.items():
            leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            with torch.no_grad():
                row[f"{name}_forward_ms"] = median_ms(lambda fn=fn, qkv=(q, k, v): fn(*qkv), device=device)

            def step(fn=fn, leaves=leaves):
                fn(*leaves).sum().backward()

            row[f"{name}_forward_backward_ms"] = median_ms(step, device=device, grad_to_none=leaves)
        for mode in ("forward", "forward_backward"):
            row[f"hierarchical_speedup_vs_dense_{mode}"] = row[f"dense_sdpa_{mode}_ms"] / row[f"hierarchical_{mode}_ms"]
        print({k: v for k, v in row.items() if k != "cost"}, flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of the same code)")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/h200"))
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    checks = correctness(device, dtype if device.type == "cuda" else torch.float32, args.quick)
    print(checks, flush=True)
    heads, kv_heads, head_dim = (4, 2, 32) if args.quick else (16, 2, 128)
    config = spattn.Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=16,
                                 window=512)
    lengths = args.lengths or ([512, 1024] if args.quick else [8192, 32768, 65536])
    rows = timings(device, dtype, lengths, heads, kv_heads, head_dim, config)
    record = make("hierarchical", {"config": config.to_dict(), "heads": heads, "kv_heads": kv_heads,
                                   "head_dim": head_dim, "dtype": str(dtype), "batch": 1, "device": str(device)},
                  rows, checks=checks, command="python " + " ".join(sys.argv),
                  seconds=time.perf_counter() - started)
    path = write(record, Path(args.out) / ("hierarchical-quick.json" if args.quick else "hierarchical.json"),
                 overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
