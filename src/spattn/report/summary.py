"""The terminal summary (rich): recommendation per budget and the Pareto frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def print_summary(results: dict[str, Any], console: Any, output: Path) -> None:
    from rich.table import Table

    by_id = {c["id"]: c for c in results["candidates"]}
    dense = results["dense"]
    table = Table(title=f"spattn report: {results['model']['name']} on {results['data']['text']} "
                        f"(dense perplexity {dense['perplexity']:.3f})", title_justify="left")
    for col, just in (("budget", "right"), ("recommended pattern", "left"), ("cost", "right"),
                      ("perplexity (Δ)", "right"), ("agree", "right"), ("recall mean/p5", "right"),
                      ("reach", "right"), ("ms", "right")):
        table.add_column(col, justify=just, overflow="fold")
    for x in results["recommendations"]:
        c = by_id.get(x["candidate"])
        if c is None:
            table.add_row(f"{100 * x['budget']:.1f}%", f"[dim]{x['reason']}[/]", *[""] * 6)
            continue
        table.add_row(
            f"{100 * x['budget']:.1f}%", c["label"], f"{100 * c['cost']['keys_fraction']:.1f}%",
            f"{c['model']['perplexity']:.2f} ({c['model']['perplexity_delta']:+.2f})",
            f"{100 * c['model']['top1_agreement']:.1f}%", f"{c['recall']['mean']:.3f}/{c['recall']['p5']:.3f}",
            str(c["reach"]["layers_to_full"] or "never"), f"{c['latency']['median_ms']:.0f}",
        )
    console.print(table)
    front = [by_id[i] for i in results["frontier"]["perplexity"]]
    console.print("[bold]Pareto frontier[/] (cost vs perplexity): " + ", ".join(
        f"{c['label']} ({100 * c['cost']['keys_fraction']:.1f}%, ppl {c['model']['perplexity']:.2f})" for c in front))
    for s in results["skipped"]:
        console.print(f"[dim]skipped {s['id']}: {s['note']}[/]")
    console.print(f"report: [link=file://{(output / 'report.html').resolve()}]{output / 'report.html'}[/]  "
                  f"numbers: {output / 'results.json'}  ({results['timings']['total_s']:.0f} s)")
