"""Coverage benchmark: the cost of ``spattn.coverage.measure`` against one dense attention forward.

The ``coverage`` suite of the one driver (DESIGN.md "benchmarks are a registry plus one driver"):

    PYTHONPATH=src python benchmarks/run.py coverage --out benchmarks/results/h200/coverage.json               # GPU
    PYTHONPATH=src python benchmarks/run.py coverage --out benchmarks/results/cpu/coverage.json -- --device cpu \
        --lengths 8192 --heads 12 --kv-heads 12 --head-dim 64 --dtype float32 --reach-length 65536 \
        --reach-layers 32                                                                                   # CPU

Per length, on random causal prefill inputs [B, H, L, D] (GQA when --kv-heads < --heads), pattern
``Sinks(64) | Window(w)``:

1. dense forward: ``F.scaled_dot_product_attention`` (causal; flash on CUDA; GQA heads expanded before the
   timing), median of repeats;
2. ``measure`` (recall, KL, top-k overlap, output error with ``value``) — wall-clock median, and its ratio to
   the dense forward; the same without value/top-k (``recall only``); ``block_mass`` at the layout's block size;
3. correctness gate: on the last ``--gate-queries`` queries of the first 4 heads, measure's recall equals a
   dense float64 brute force (max abs difference recorded, must be <= 1e-4);
4. reachability of the same pattern at ``--reach-length`` tokens through ``--reach-layers`` layers (CPU or
   GPU, whichever ``--device``), time and layers to full.

Returns the suite record (``spattn.bench.record``) and prints a line per row.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import spattn
from spattn.bench import record as bench_record
from spattn.bench.timing import median_ms
from spattn.coverage import block_mass, measure, reachability

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall-clock seconds over ``repeats`` runs (one warm-up when repeats > 1) and the last result."""
    box = []

    def call():
        box[:] = [fn()]

    seconds = median_ms(call, device=device, repeats=max(1, repeats), warmup=1 if repeats > 1 else 0, wall=True) / 1e3
    return seconds, box[0]


def dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA; key/value heads must already match the query heads (expanded outside the timing, so the
    flash kernel runs on CUDA whatever the torch version's GQA support)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gate(q: torch.Tensor, k: torch.Tensor, layout: spattn.Layout, report, n: int) -> float:
    """max |recall - brute force| on the last ``n`` queries of batch 0, first ``heads`` query heads (float64,
    dense over those rows only)."""
    L = q.shape[2]
    n = min(n, L)
    heads = min(q.shape[1], 4)
    G = q.shape[1] // k.shape[1]
    qq = q[0, :heads, L - n:].double()
    kk = k[0].double().repeat_interleave(G, 0)[:heads]
    s = qq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    rows = torch.arange(L - n, L, device=q.device)[:, None]
    s = s.masked_fill(torch.arange(L, device=q.device)[None, :] > rows, -math.inf)
    p = torch.softmax(s, -1)
    # the layout's kept keys for those rows, from the tables (small slice of the dense view)
    from spattn.coverage import _tables

    bs = layout.block_size
    qb0 = (L - n) // bs
    bmap = _tables.block_map(layout, qb0, layout.num_q_blocks)
    kept = _tables.chunk_mask(layout, bmap, _tables.extended_masks(layout), 0, layout.num_kv_blocks,
                              layout.num_q_blocks * bs - qb0 * bs, L)
    kept = kept[0, :heads, (L - n) - qb0 * bs:(L - n) - qb0 * bs + n]
    want = (p * kept).sum(-1)
    return float((report.recall[0, :heads, L - n:].double() - want).abs().max())


def run(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="coverage", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="measure's chunk (tokens); default: its own")
    ap.add_argument("--repeats", type=int, default=3, help="dense forward repeats (median)")
    ap.add_argument("--measure-repeats", type=int, default=1)
    ap.add_argument("--gate-queries", type=int, default=256)
    ap.add_argument("--reach-length", type=int, default=65536)
    ap.add_argument("--reach-layers", type=int, default=32)
    ap.add_argument("--reach-window", type=int, default=1024)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    record = bench_record.make("coverage", vars(args), [], reachability=None)
    pattern = spattn.Sinks(args.sinks) | spattn.Window(args.window)
    chunk, topk = args.chunk, args.topk
    for L in args.lengths:
        torch.manual_seed(0)
        B, H, Hkv, D = args.batch, args.heads, args.kv_heads, args.head_dim
        q = torch.randn(B, H, L, D, device=device, dtype=dtype)
        k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, L, D, device=device, dtype=dtype)
        layout = spattn.compile(pattern, L, L, causal=True, block_size=args.block_size, device=device)
        G = H // Hkv
        k_rep, v_rep = (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)) if G > 1 else (k, v)
        t_dense, _ = timed(lambda q=q, k=k_rep, v=v_rep: dense_forward(q, k, v), device, args.repeats)
        del k_rep, v_rep
        t_full, report = timed(
            lambda q=q, k=k, v=v, lay=layout: measure(q, k, lay, value=v, causal=True, topk=topk, chunk=chunk),
            device, args.measure_repeats)
        t_recall, _ = timed(lambda q=q, k=k, lay=layout: measure(q, k, lay, causal=True, topk=0, chunk=chunk),
                            device, args.measure_repeats)
        t_mass, _ = timed(lambda q=q, k=k: block_mass(q, k, args.block_size, True, chunk=chunk), device, 1)
        gate_err = gate(q, k, layout, report, args.gate_queries)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        s = report.summary()["overall"]
        row = {
            "length": L, "batch": B, "heads": H, "kv_heads": Hkv, "head_dim": D, "dtype": args.dtype,
            "pattern": pattern.to_dict(), "density": layout.density(), "block_density": layout.density("block"),
            "dense_forward_s": t_dense,
            "measure_s": t_full, "measure_over_dense": t_full / t_dense,
            "measure_recall_only_s": t_recall, "measure_recall_only_over_dense": t_recall / t_dense,
            "block_mass_s": t_mass, "block_mass_over_dense": t_mass / t_dense,
            "topk": args.topk, "gate_max_abs_recall_error": gate_err, "gate_passed": gate_err <= 1e-4,
            "recall": s["recall"], "topk_overlap": s.get("topk_overlap"), "output_error": s.get("output_error"),
            "peak_cuda_memory_bytes": peak,
        }
        record["rows"].append(row)
        print(f"L={L:>7} B{B} H{H}/{Hkv} D{D} {args.dtype}  density {row['density']:.4f}  dense {t_dense:.4f}s  "
              f"measure {t_full:.3f}s (x{row['measure_over_dense']:.1f})  recall-only {t_recall:.3f}s "
              f"(x{row['measure_recall_only_over_dense']:.1f})  block_mass {t_mass:.3f}s  "
              f"recall mean {s['recall']['mean']:.4f}  "
              f"gate {'ok' if row['gate_passed'] else 'FAILED'} ({gate_err:.2e})",
              flush=True)
        del q, k, v, report
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.reach_length and args.reach_layers:
        Lr = args.reach_length
        rpat = spattn.Sinks(args.sinks) | spattn.Window(args.reach_window)
        t_compile, rlay = timed(lambda: spattn.compile(rpat, Lr, Lr, causal=True, block_size=args.block_size,
                                                       device=device), device, 1)
        t_reach, r = timed(lambda: reachability(rlay, causal=True, max_layers=args.reach_layers), device, 1)
        record["reachability"] = {
            "length": Lr, "layers": args.reach_layers, "pattern": rpat.to_dict(), "block_size": args.block_size,
            "seconds": t_reach, "seconds_per_layer": t_reach / args.reach_layers, "compile_s": t_compile,
            "layers_to_full": r.layers_to_full, "fraction": r.fraction.tolist(),
            "receptive_field_last": int(r.receptive_field[-1]),
        }
        print(f"reachability L={Lr} layers={args.reach_layers} {t_reach:.2f}s "
              f"({t_reach / args.reach_layers:.3f}s/layer)"
              f"  layers_to_full={r.layers_to_full}  fraction[-1]={float(r.fraction[-1]):.4f}", flush=True)
    return record
