"""``spattn demo``: compile a few patterns, show them, run attention on CPU and check it against dense."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

import spattn
from spattn._checks import check_int


def demo_patterns(length: int, block_size: int) -> list[tuple[str, spattn.Pattern]]:
    return [
        ("Sinks(16) | Window(128)", spattn.Sinks(16) | spattn.Window(128)),
        ("Window(64) | Strided(4, block)", spattn.Window(64) | spattn.Strided(4, block=block_size)),
        ("Sinks(16) | Window(64) | RandomBlocks(2)", spattn.Sinks(16) | spattn.Window(64) | spattn.RandomBlocks(2, block=block_size)),
        ("Global((0, L/2)) | Dilated(256, 4)", spattn.Global((0, length // 2)) | spattn.Dilated(256, 4)),
        (f"Budgeted({max(1, length // 8)})", spattn.Budgeted(max(1, length // 8), sinks=16)),
    ]


def run_demo(length: int = 1024, block_size: int = 64, seed: int = 0) -> list[dict]:
    check_int(length, "length", 1)
    check_int(block_size, "block_size", 1)
    console = Console(width=max(Console().width, 110))
    torch.manual_seed(seed)
    B, H, Hk, D = 1, 4, 2, 64
    q = torch.randn(B, H, length, D)
    k = torch.randn(B, Hk, length, D)
    v = torch.randn(B, Hk, length, D)
    table = Table(title=f"spattn demo: causal attention, L={length}, {H} query / {Hk} kv heads, D={D}, CPU")
    table.add_column("pattern", no_wrap=True)
    for col in ("density", "block density", "compile ms", "max err", "rel err"):
        table.add_column(col, justify="right", no_wrap=True)
    spattn.compile(spattn.Window(8), 64, block_size=16)  # warm-up, so compile times are not first-call costs
    rows = []
    for name, pattern in demo_patterns(length, block_size):
        layout = spattn.compile(pattern, length, causal=True, block_size=block_size, heads=H)
        console.print(f"\n[bold]{name}[/bold]  {layout!r}")
        console.print(layout.to_string(max_size=32))
        out_ref = spattn.attention(q, k, v, layout, causal=True, backend="reference")
        out_dense = spattn.attention(q.double(), k.double(), v.double(), layout, causal=True, backend="dense")
        err = (out_ref.double() - out_dense).abs().max().item()
        rel = ((out_ref.double() - out_dense).norm() / out_dense.norm()).item()
        row = dict(pattern=name, density=layout.density(), block_density=layout.block_density(),
                   compile_ms=1e3 * layout.info["compile_seconds"], max_error=err, relative_error=rel)
        rows.append(row)
        table.add_row(name, f"{row['density']:.3f}", f"{row['block_density']:.3f}", f"{row['compile_ms']:.1f}",
                      f"{err:.2e}", f"{rel:.2e}")
    console.print()
    console.print(table)
    console.print("density: kept (query, key) pairs / the causal pairs dense attention computes; block density:\n"
                  "visited blocks / the causal blocks a dense block kernel visits (what the kernel pays for);\n"
                  "errors: the float32 reference backend against a float64 dense masked attention on the same mask.")
    return rows
