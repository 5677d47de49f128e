"""The terminal summary (rich): recommendation per budget, where it holds, and the Pareto frontier as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = {
    "cost keys": "share of the dense causal (query, key) pairs kept",
    "cost blocks": "share of the causally visible key blocks a block-sparse kernel visits",
    "perplexity [95%]": "held-out perplexity on the report split, with its bootstrap interval",
    "agree": "top-1 next-token agreement with the dense model",
    "recall": "mean / 5th percentile of the dense attention mass kept, over queries, heads and layers",
    "holds at": "lengths at which the pick stays within budget and is not beaten by the runner-up",
    "passkey": "pass-key retrieval accuracy at the first length (further lengths: the lines below the table); "
               "! = the runner-up retrieves better",
    "ms": "attention latency of one layer (median, interleaved with dense); '?' = too noisy to rank",
}


def latency_text(lat: dict[str, Any]) -> str:
    """Median ms and the speed-up against dense, or a flag when the timing spread is too large to rank."""
    ms = f"{lat['median_ms']:.3g}"  # three digits: CPU rows are milliseconds to seconds, GPU rows a fraction of one
    if lat.get("noisy"):
        return f"{ms}? (spread {100 * lat['spread']:.0f}%)"
    ratio = lat.get("speedup_vs_dense")
    return f"{ms} (×{ratio:.2f})" if ratio else ms


def print_summary(results: dict[str, Any], console: Any, output: Path) -> None:
    from rich.table import Table

    by_id = {c["id"]: c for c in results["candidates"]}
    dense = results["dense"]
    lo, hi = dense["report"]["perplexity_interval"]
    table = Table(title=f"spattn report: {results['model']['name']} on {results['data']['text']}, "
                        f"{results['data']['chunk_length']} tokens (dense perplexity {dense['perplexity']:.3f} "
                        f"[{lo:.2f}, {hi:.2f}])", title_justify="left")
    for col in ("budget", "recommended pattern", *COLUMNS):
        table.add_column(col, justify="left" if col in ("recommended pattern", "holds at") else "right",
                         overflow="fold")
    for x in results["recommendations"]:
        c = by_id.get(x["candidate"])
        if c is None:
            table.add_row(f"{100 * x['budget']:.1f}%", f"[dim]{x['reason']}[/]", *[""] * len(COLUMNS))
            continue
        m = c["model"]
        tie = " (tie)" if x.get("tied_with") else ""
        table.add_row(
            f"{100 * x['budget']:.1f}%", c["label"] + tie, f"{100 * c['cost']['keys_fraction']:.1f}%",
            f"{100 * c['cost']['block_fraction']:.1f}%",
            f"{m['perplexity']:.2f} [{m['perplexity_interval'][0]:.2f}, {m['perplexity_interval'][1]:.2f}]",
            f"{100 * m['top1_agreement']:.1f}%", f"{c['recall']['mean']:.3f}/{c['recall']['p5']:.3f}",
            ", ".join(str(n) for n in x.get("holds_at", [])) or "—",
            f"{100 * x['retrieval']['accuracy']:.0f}%" + ("!" if "for_retrieval" in x else "") if "retrieval" in x
            else "—", latency_text(c["latency"]),
        )
    if results.get("quick"):
        console.print("[bold yellow]quick answer[/] (--quick, a smoke test): it omits "
                      + "; ".join(results["quick"]["omits"]) + ". Run without --quick for the full report.")
    console.print(table)
    for x in results["recommendations"]:
        prof = x.get("profiles")
        if prof is None:
            continue
        lm = by_id[prof["language_modelling"]["candidate"]]["label"]
        if prof["retrieval"].get("none_retrieves"):
            text = (f"{lm} for language modelling; [bold]for retrieval, none at this budget[/] "
                    f"({prof['retrieval']['why']})")
        elif prof["agree"]:
            text = f"{lm} for language modelling and retrieval ({prof['retrieval']['why']})"
        else:
            other = by_id[prof["retrieval"]["candidate"]]["label"]
            text = (f"[bold]they disagree[/]: language modelling → {lm}; retrieval → {other} "
                    f"({100 * prof['retrieval']['accuracy']:.0f}% of the pass keys against "
                    f"{100 * prof['retrieval']['language_modelling_accuracy']:.0f}%)")
        if not prof["evidence"]:
            text += " [yellow](no retrieval evidence: dense retrieves none)[/]"
        console.print(f"per task profile, budget {100 * x['budget']:.1f}%: {text}")
    for part in results.get("lengths", []):  # Note [retrieval at every length]
        got = part.get("retrieval")
        if not got:
            continue
        res, n = got["results"], got["samples"]
        by_here = {c["id"]: c for c in part["candidates"]}
        shown = [f"dense {round(n * res['dense']['accuracy'])}/{n}"] + [
            f"{by_here[cid]['label']} {round(n * r['accuracy'])}/{n}" for cid, r in res.items()
            if cid != "dense" and cid in by_here]
        console.print(f"pass-key retrieval at {part['length']} tokens: " + "; ".join(shown))
    front = Table(title="Pareto frontier (cost against held-out perplexity)", title_justify="left")
    for col in ("pattern", "cost keys", "cost blocks", "perplexity [95%]", "ms"):
        front.add_column(col, justify="left" if col == "pattern" else "right", overflow="fold")
    for cid in results["frontier"]["perplexity"]:
        c = by_id[cid]
        m = c["model"]
        front.add_row(c["label"], f"{100 * c['cost']['keys_fraction']:.1f}%",
                      f"{100 * c['cost']['block_fraction']:.1f}%",
                      f"{m['perplexity']:.2f} [{m['perplexity_interval'][0]:.2f}, {m['perplexity_interval'][1]:.2f}]"
                      + (" ˢ" if m.get("split") == "selection" else ""),
                      latency_text(c["latency"]))
    console.print(front)
    refs = results.get("kernel_references")
    if refs and refs["rows"]:
        kern = Table(title=f"kernels: spattn ({refs['backend']}) and FlexAttention on the same block tables, SDPA "
                           "dense causal (ms, one layer)", title_justify="left")
        for col in ("length", "pattern", "spattn", "Flex", "SDPA", "spattn × SDPA", "spattn × Flex"):
            kern.add_column(col, justify="left" if col == "pattern" else "right", overflow="fold")
        for k in refs["rows"]:
            kern.add_row(str(k["length"]), k["label"] + ("?" if k["noisy"] else ""), f"{k['spattn_ms']:.3f}",
                         f"{k['flex_ms']:.3f}", f"{k['sdpa_ms']:.3f}", f"{k['spattn_vs_sdpa']:.2f}",
                         f"{k['spattn_vs_flex']:.2f}")
        console.print(kern)
    for col, meaning in COLUMNS.items():
        console.print(f"[dim]{col}: {meaning}[/]")
    backends = results["backends"]
    console.print(f"[dim]latency timed on the {backends['latency']} backend with "
                  f"{backends.get('latency_dtype', 'float32')} inputs (Note [latency dtype]); the quality numbers come "
                  "from the model in its own dtype[/]")
    console.print("[dim]ˢ: numbers from the selection split (the report split is scored only for the candidates "
                  "that can still be recommended)[/]")
    for s in results["skipped"]:
        console.print(f"[dim]skipped {s['id']}: {s['note']}[/]")
    timings = results["timings"]
    console.print("[dim]seconds per stage (wall / CPU): " + ", ".join(
        f"{name} {wall:.1f}/{timings['stages_cpu_s'].get(name, 0.0):.1f}" for name, wall in timings["stages_s"].items())
        + (f"; skipped for time: {len(timings['skipped_for_time'])}" if timings.get("skipped_for_time") else "")
        + "[/]")
    console.print(f"report: [link=file://{(output / 'report.html').resolve()}]{output / 'report.html'}[/]  "
                  f"numbers: {output / 'results.json'}  ({results['timings']['total_s']:.0f} s)")
