"""Is hierarchical attention on a frozen model what ``spattn report``'s row says? Held-out perplexity of SmolLM2-135M
with ``Hierarchical`` (mean pooling, fixed gates) against ``Sinks | Window`` and ``Sinks | Window | TopK`` at equal
keys per query (CPU).

For each length and budget (a fraction of the dense causal keys), ``spattn.hierarchical.fit_budget`` sizes the
hierarchical config (the report's rule); its exact keys per query (``cost_at``: compressed tokens + selected +
window, overlaps counted twice) set the budget of the others:

* ``sinks_window``: ``Sinks(s) | Window(w)``, the largest ``w`` within it;
* ``topk``: ``Sinks(s) | Window(hierarchical window) | TopK("pooled", n, block=select_block)``, the largest ``n``
  whose keys per query, measured on the first chunk's captured queries and keys (4 layers, the report's probes),
  stay within it;
* ``hierarchical``: the report's frozen form (``fit_budget(..., frozen=True)``: gates ``(0, 1, 0)``, the window
  in the selected branch's safeguard, so sinks, window and chosen blocks share one softmax; the compressed branch
  only chooses the blocks);
* ``hierarchical_branches`` / ``hierarchical_equal_gates``: the trainable three-branch form
  (``fit_budget(..., frozen=False)``) with fixed gates ``(0, 1, 1)`` / ``(1, 1, 1)`` (the separately normalised
  branches mixed, and for equal gates the compressed branch's output too).

Scores: perplexity, KL(dense || sparse) and top-1 agreement with the dense model on held-out chunks, 95% bootstrap
intervals over 64-token segments, and paired differences (``spattn.report.intervals``). The JSON is rewritten after
every row (a killed run keeps what it measured).

    PYTHONPATH=src python benchmarks/hierarchical_frozen.py --lengths 1024,2048 --budgets 0.1,0.25 --chunks 4,2
    PYTHONPATH=src python benchmarks/hierarchical_frozen.py --quick --out /tmp/hf.json   # smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import spattn
from spattn.bench.env import machine_info
from spattn.eval.lm import dense_reference, token_scores
from spattn.hierarchical import FROZEN_GATES, cost_at, fit_budget
from spattn.integrations.capture import capture
from spattn.integrations.plan import Plan
from spattn.report import intervals
from spattn.report import model as M
from spattn.report.candidates import safeguards
from spattn.selectors import TopK

DEFAULT_OUT = Path("benchmarks/results/cpu/hierarchical/frozen_smollm2.json")


def keys_per_query(pattern, length: int, block_size: int, layers=None) -> float:
    """Mean keys per query of a pattern (a dynamic one measured on ``layers``' captured (query, key))."""
    if not pattern.contains_dynamic():
        lay = spattn.compile(pattern, length, length, causal=True, block_size=block_size)
        return float(lay.allowed_pairs().mean()) / length
    vals = [float(spattn.compile(pattern, length, length, causal=True, block_size=block_size, query=q, key=k,
                                 heads=q.shape[1]).allowed_pairs().mean()) / length for q, k in layers]
    return sum(vals) / len(vals)


def largest_within(build, lo: int, hi: int, keys, target: float):
    """(p, build(p)) for the largest p in [lo, hi] with keys(build(p)) <= target (keys nondecreasing), or None."""
    if keys(build(lo)) > target:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if keys(build(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo, build(lo)


VARIANTS = ("hierarchical", "hierarchical_branches", "hierarchical_equal_gates", "sinks_window", "topk")


def candidates(length: int, budget: float, block_size: int, layers, variants=VARIANTS) -> tuple[dict, list[str]]:
    """name -> (pattern, keys per query) at equal keys per query; and notes on what could not be fitted."""
    K = budget * (length + 1) / 2
    sinks, _ = safeguards(K)
    notes = []
    hier = fit_budget(K, length, block_size=block_size, sinks=sinks)  # the report's (frozen) form
    if hier is None:
        return {}, [f"Hierarchical cannot fit {budget:g} of the dense keys at {length} tokens"]
    target = cost_at(hier, length)["keys_per_query"]["total"]
    window = hier.safeguard.parts[1].left + 1  # the local window of the frozen form (Sinks | Window)
    out = {"hierarchical": (hier, target)}
    branches = fit_budget(K, length, block_size=block_size, sinks=sinks, frozen=False)
    if branches is not None:
        for name, gates in (("hierarchical_branches", (0.0, 1.0, 1.0)), ("hierarchical_equal_gates", (1.0, 1.0, 1.0))):
            cfg = dataclasses.replace(branches, gates=gates)
            out[name] = (cfg, cost_at(cfg, length)["keys_per_query"]["total"])
    static_keys = lambda p: keys_per_query(p, length, block_size)  # noqa: E731
    fit = largest_within(lambda w: spattn.Sinks(sinks) | spattn.Window(w), 0, length, static_keys, target)
    if fit is not None:
        out["sinks_window"] = (fit[1], static_keys(fit[1]))
    sb = hier.select_block
    dyn_keys = lambda p: keys_per_query(p, length, block_size, layers)  # noqa: E731
    topk = largest_within(lambda n: spattn.Sinks(sinks) | spattn.Window(window - 1) | TopK("pooled", n, block=sb),
                          1, -(-length // sb), dyn_keys, target)
    if topk is None:
        notes.append(f"TopK: one {sb}-token block over the sinks and window exceeds {target:.1f} keys per query")
    else:
        out["topk"] = (topk[1], dyn_keys(topk[1]))
    return {k: v for k, v in out.items() if k in variants}, notes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--budgets", default="0.1,0.25")
    ap.add_argument("--chunks", default="4,2", help="held-out chunks per length (one number or one per length)")
    ap.add_argument("--text", default="austen")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; rows that would not fit are skipped")
    ap.add_argument("--quick", action="store_true", help="one 512-token chunk, budget 0.25 (smoke run)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {','.join(VARIANTS)}")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.budgets, args.chunks = "512", "0.25", "1"
    lengths = [int(x) for x in args.lengths.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    chunk_counts = [int(x) for x in args.chunks.split(",")]
    chunk_counts = chunk_counts * len(lengths) if len(chunk_counts) == 1 else chunk_counts
    if len(chunk_counts) != len(lengths):
        raise SystemExit("--chunks must give one number or one per length")
    t_start = time.perf_counter()
    model, tokenizer, name = M.load_model("smollm2", "cpu")
    result = {"suite": "hierarchical_frozen", "model": name, "text": args.text, "block_size": args.block_size,
              "frozen_gates": list(FROZEN_GATES), "machine": machine_info("cpu"),
              "command": " ".join(["python", *sys.argv]), "note": "CPU shared with other developers: seconds are "
              "wall on a loaded machine", "rows": [], "skipped": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        args.out.write_text(json.dumps(result, indent=1) + "\n")

    for length, n_chunks in zip(lengths, chunk_counts, strict=True):
        calib, held, info = M.load_chunks(args.text, tokenizer, length, 1, n_chunks)
        cap = capture(model, calib[:1])
        picks = sorted({0, len(cap.layers) // 3, (2 * len(cap.layers)) // 3, len(cap.layers) - 1})  # as the report
        layers = [(cap.queries[cap.layers[i]], cap.keys[cap.layers[i]]) for i in picks]
        refs = [dense_reference(M.logits(model, ids), ids) for ids in held]
        dense_seg = intervals.merge([intervals.segment_sums({"nll": -r["logp"].gather(-1, r["target"][:, None])[:, 0]})
                                     for r in refs])
        dense = intervals.summarise(dense_seg)
        for budget in budgets:
            cands, notes = candidates(length, budget, args.block_size, layers, args.variants.split(","))
            row = {"length": length, "budget": budget, "held_out_chunks": info["held_out_indices"],
                   "dense_perplexity": dense["perplexity"], "dense_perplexity_interval": dense["perplexity_interval"],
                   "notes": notes, "candidates": {}, "paired_nll_vs_hierarchical": {}}
            segs = {}
            for cname, (pattern, keys) in cands.items():
                est = None if not row["candidates"] else max(c["seconds"] for c in row["candidates"].values())
                if args.time_budget is not None and est is not None and \
                        time.perf_counter() - t_start + est > args.time_budget:
                    result["skipped"].append(f"{cname} at {length} tokens, budget {budget:g}: time budget")
                    continue
                t = time.perf_counter()
                parts = [intervals.segment_sums(token_scores(r, M.logits(model, ids, Plan.uniform(pattern),
                                                                         backend="auto", block_size=args.block_size)))
                         for ids, r in zip(held, refs, strict=True)]
                segs[cname] = intervals.merge(parts)
                summary = intervals.summarise(segs[cname])
                row["candidates"][cname] = {
                    "pattern": pattern.to_dict(), "keys_per_query": keys, "keys_fraction": keys / ((length + 1) / 2),
                    "perplexity": summary["perplexity"], "perplexity_interval": summary["perplexity_interval"],
                    "kl": summary["kl"], "kl_interval": summary["kl_interval"],
                    "top1_agreement": summary["top1_agreement"],
                    "top1_agreement_interval": summary["top1_agreement_interval"],
                    "seconds": round(time.perf_counter() - t, 1)}
                if cname != "hierarchical" and "hierarchical" in segs:
                    row["paired_nll_vs_hierarchical"][cname] = intervals.paired_difference(segs[cname],
                                                                                           segs["hierarchical"])
                print(f"L={length} b={budget:g} {cname:26s} keys/q {keys:7.1f}  ppl {summary['perplexity']:.3f} "
                      f"(dense {dense['perplexity']:.3f})  kl {summary['kl']:.4f}  {time.perf_counter() - t:.0f}s",
                      flush=True)
                result["rows"] = [r for r in result["rows"] if (r["length"], r["budget"]) != (length, budget)]
                result["rows"].append(row)
                write()
    write()


if __name__ == "__main__":
    main()
