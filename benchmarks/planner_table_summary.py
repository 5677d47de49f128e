"""Calibration-side numbers of the planner from a saved candidate table: for each budget, the plan's mean
recall against the best uniform pattern within the same budget, the families it picks, and the heat map.

    PYTHONPATH=src python benchmarks/planner_table_summary.py \
        benchmarks/results/cpu/planner/smollm2_austen_1k.table.npz \
        --out benchmarks/results/cpu/planner/smollm2_austen_1k_calibration.json --heatmap docs/planner-heatmap.png
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from spattn.bench.env import machine_info
from spattn.planner import CandidateTable, InfeasibleBudget, make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("table")
    ap.add_argument("--budgets", default="26 keys;52 keys;128 keys;0.3;0.4;0.5")
    ap.add_argument("--heatmap-budget", default="52 keys")
    ap.add_argument("--heatmap", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    table = CandidateTable.load(args.table)
    out = {"machine": machine_info(), "table": args.table, "samples": table.samples, "length": table.length,
           "block_size": table.block_size, "rows": []}
    for spec in [b.strip() for b in args.budgets.split(";") if b.strip()]:
        budget = float(spec) if spec.replace(".", "", 1).isdigit() else spec
        for objective in ("recall", "kl"):
            try:
                res = make_plan(None, None, budget=budget, table=table, objective=objective)
            except InfeasibleBudget as err:
                out["rows"].append({"budget": spec, "objective": objective, "note": str(err)})
                continue
            info = res.plan.meta["planner"]
            fams = collections.Counter(h["family"] for h in res.per_head)
            row = {"budget": spec, "objective": objective, "plan_recall": info["mean_recall"],
                   "plan_keys_per_query": info["mean_keys_per_query"], "plan_tile_fraction": info["mean_tile_fraction"],
                   "plan_value": res.solution.value, "families": dict(fams.most_common()),
                   "distinct_choices": len({h["choice"] for h in res.per_head}), "uniform": res.uniform}
            out["rows"].append(row)
            print(json.dumps(row))
            if objective == "recall" and spec == args.heatmap_budget and args.heatmap:
                from spattn.planner.figures import plan_heatmap

                plan_heatmap(res.plan, args.heatmap, title=f"SmolLM2-135M, Austen 1k: plan under {spec}")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
