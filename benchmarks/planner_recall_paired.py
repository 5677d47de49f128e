"""Paired recall comparisons (plan minus uniform, over the heads) from a ``planner_heldout.py`` JSON.

``planner_heldout.py`` writes the paired comparisons only once a budget's LM rows exist; a run cut short by its
``--time-budget`` (the H200 chain A run at 8192) keeps the per-head held-out recall of the plan and the uniform
pattern without them. This reads those rows and adds the paired bootstrap over the 270 heads
(``spattn.eval.stats.compare``), with the measured keys per query and tile fraction of both sides.

    PYTHONPATH=src python benchmarks/planner_recall_paired.py benchmarks/results/h200/planner/planner_heldout.json \
        --out benchmarks/results/h200/planner/recall_paired.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spattn.eval.stats import compare


def paired_rows(result: dict) -> list[dict]:
    rows = []
    for length, entry in result.get("lengths", {}).items():
        for budget in entry.get("budgets", []):
            plan = budget.get("plan")
            if not plan:
                continue
            for uniform in budget.get("uniform", []):
                for corpus in ("austen", "kjv"):
                    a = plan.get(corpus, {}).get("recall")
                    b = uniform.get(corpus, {}).get("recall")
                    if not a or not b:
                        continue
                    rows.append({
                        "length": int(length), "budget": budget["budget"], "corpus": corpus,
                        "uniform": uniform["name"],
                        "plan": {k: a[k] for k in ("recall", "recall_p5", "keys_per_query", "tile_fraction")},
                        "uniform_measured": {k: b[k] for k in ("recall", "recall_p5", "keys_per_query",
                                                               "tile_fraction")},
                        "plan_minus_uniform_over_heads": compare(a["per_head"], b["per_head"]).to_dict(),
                    })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("result", help="a planner_heldout.py JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = json.loads(Path(args.result).read_text())
    out = {"what": "held-out recall, plan minus the best uniform pattern at the same tile budget, paired over heads "
                   "(percentile bootstrap, 95%)", "source": args.result,
           "source_command": result.get("machine", {}).get("command"),
           "source_commit": result.get("machine", {}).get("git_commit"),
           "device": result.get("machine", {}).get("device"), "rows": paired_rows(result)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    for r in out["rows"]:
        c = r["plan_minus_uniform_over_heads"]
        print(f"{r['length']} {r['budget']} {r['corpus']:6s} plan {r['plan']['recall']:.3f} "
              f"({r['plan']['keys_per_query']:.0f} keys, {r['plan']['tile_fraction']:.3f} tiles) vs {r['uniform']} "
              f"{r['uniform_measured']['recall']:.3f} ({r['uniform_measured']['keys_per_query']:.0f}, "
              f"{r['uniform_measured']['tile_fraction']:.3f}): {c}")


if __name__ == "__main__":
    main()
