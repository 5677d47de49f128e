"""Planning time of ``spattn.planner.make_plan`` on SmolLM2-135M (all layers and heads, the default candidates).

Wall time and process CPU time per stage (model load excluded), the load average before and after (the
2-core development machine is shared: a wall time at a high load is not the planner's own), torch threads.

    PYTHONPATH=src python benchmarks/planner_time.py --length 1024 --samples 3 \
        --out benchmarks/results/cpu/planner/planning_time_1k.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from spattn.bench.env import machine_info
from spattn.integrations.models import load_smollm2
from spattn.planner import make_plan


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--budget", default="52 keys")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tokenizer = load_smollm2(device=args.device)
    load_before = list(os.getloadavg())
    wall, cpu = time.perf_counter(), time.process_time()
    budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
    res = make_plan(model, "austen", tokenizer=tokenizer, budget=budget, lengths=(args.length,),
                    samples=args.samples, block_size=args.block_size, device=args.device)
    out = {
        "what": f"make_plan on SmolLM2-135M, Austen, {args.length} tokens, {args.samples} calibration chunks, "
                f"{res.table.layers} layers x {res.table.heads} heads, {len(res.table.candidates)} default "
                f"candidates, block size {args.block_size}, budget {args.budget} (calibration + solve + sweep)",
        "wall_seconds": time.perf_counter() - wall, "process_cpu_seconds": time.process_time() - cpu,
        "stages": res.seconds, "load_average_before": load_before, "load_average_after": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(), "target_seconds": 120,
        "layers": res.table.layers, "heads": res.table.heads, "candidates": [c.name for c in res.table.candidates],
        "machine": machine_info(args.device), "args": vars(args),
    }
    out["meets_target"] = out["wall_seconds"] <= 120
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("wall_seconds", "process_cpu_seconds", "stages", "load_average_before",
                                          "load_average_after", "meets_target")}))


if __name__ == "__main__":
    main()
