"""CPU benchmark of the reference backend against dense SDPA (issue 2).

The ``reference`` suite (``spattn bench --suite reference`` or ``python benchmarks/run.py reference``):
B=1, H=8, D=64, fp32,
causal ``Sinks(64) | Window(512)``; median wall time of repeated runs, peak memory (a fresh subprocess per
row, read from the OS high-water mark), density, speedup. Targets: memory linear in L (16384 under 1.5 GB),
speedup >= 0.3 / density.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

_ROW = r"""
import json, resource, sys, torch, spattn
from spattn.bench.timing import median_ms
import torch.nn.functional as F
mode, L, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
B, H, D = 1, 8, 64
q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
pattern = spattn.Sinks(64) | spattn.Window(512)
layout = spattn.compile(pattern, L, causal=True)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
def run():
    if mode == "dense":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return spattn.attention(q, k, v, layout, causal=True, backend="reference")
out = run()
median_s = median_ms(run, device="cpu", repeats=repeats, warmup=0) / 1e3
err = None
if mode == "reference" and L <= 4096:
    dense = spattn.attention(q, k, v, layout, causal=True, backend="dense")
    err = float((out - dense).abs().max())
print(json.dumps(dict(mode=mode, L=L, median_s=median_s,
      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, baseline_rss_mb=base / 1024,
      density=layout.density(), block_density=layout.density("block"), max_error_vs_dense=err)))
"""


def _row(mode: str, L: int, repeats: int) -> dict:
    res = subprocess.run([sys.executable, "-c", _ROW, mode, str(L), str(repeats)], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def run(argv: list[str] | None = None) -> dict:
    """The suite record for ``--lengths`` (default 4096 16384) and ``--repeats`` (default 5)."""
    ap = argparse.ArgumentParser(prog="reference", description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    return run_reference_bench(args.lengths, repeats=args.repeats)


def run_reference_bench(lengths: list[int], repeats: int = 5) -> dict:
    from rich.console import Console
    from rich.table import Table

    from spattn.bench.record import make

    rows = []
    for L in lengths:
        dense = _row("dense", L, repeats)
        ref = _row("reference", L, repeats)
        speedup = dense["median_s"] / ref["median_s"]
        rows.append(dict(
            L=L, B=1, H=8, D=64, dtype="float32", pattern="Sinks(64) | Window(512)", causal=True,
            density=ref["density"], block_density=ref["block_density"],
            reference_median_s=ref["median_s"], dense_sdpa_median_s=dense["median_s"], speedup=speedup,
            target_speedup=0.3 / ref["density"], reference_peak_rss_mb=ref["peak_rss_mb"],
            dense_peak_rss_mb=dense["peak_rss_mb"], baseline_rss_mb=ref["baseline_rss_mb"],
            max_error_vs_dense=ref["max_error_vs_dense"],
        ))
    result = make("reference", {"lengths": lengths, "repeats": repeats}, rows,
                  rerun="spattn bench --suite reference --lengths " + ",".join(map(str, lengths)))
    table = Table(title="reference backend vs dense SDPA (CPU, fp32, B=1 H=8 D=64, causal Sinks(64)|Window(512))")
    for c in ("L", "density", "reference s", "dense SDPA s", "speedup", "target", "ref peak MB", "dense peak MB"):
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(str(r["L"]), f"{r['density']:.4f}", f"{r['reference_median_s']:.3f}",
                      f"{r['dense_sdpa_median_s']:.3f}",
                      f"{r['speedup']:.1f}x", f"{r['target_speedup']:.1f}x", f"{r['reference_peak_rss_mb']:.0f}",
                      f"{r['dense_peak_rss_mb']:.0f}")
    Console().print(table)
    return result
