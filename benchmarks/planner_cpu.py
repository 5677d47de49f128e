"""Planner on SmolLM2-135M (CPU): the per-head plan against the best uniform patterns at the same cost.

Plans on the calibration split of Austen, then measures on held-out Austen chunks and on KJV (domain shift):
perplexity, mean KL(dense || sparse) and top-1 agreement against the dense model, with paired percentile
bootstrap intervals over chunks for the differences (plan minus uniform); recall of the plan and of the
uniform patterns at the calibration length and at longer lengths (``Plan.at_length``); planning time (wall
and process CPU time: the machine may be shared).

    PYTHONPATH=src python benchmarks/planner_cpu.py --length 1024 --budgets "52 keys;128 keys;0.3" \
        --out benchmarks/results/cpu/planner/smollm2_austen_1k.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.env import machine_info
from spattn.data import text_chunks
from spattn.integrations.models import load_smollm2
from spattn.planner import CandidateTable, InfeasibleBudget, make_plan
from spattn.planner.validate import validate


def lm_metrics(model, chunks, plan, block_size, dense_cache):
    """Per chunk: dense and sparse NLL per token, mean KL(dense || sparse), top-1 agreement."""
    rows = []
    for n, row in enumerate(chunks):
        ids = row[None]
        if n not in dense_cache:
            with torch.no_grad():
                dense_cache[n] = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        log_d = dense_cache[n]
        with torch.no_grad(), spattn.patched(model, plan, block_size=block_size):
            log_s = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        rows.append({
            "dense_nll": float(F.nll_loss(log_d, target)), "sparse_nll": float(F.nll_loss(log_s, target)),
            "kl": float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).mean()),
            "top1": float((log_d.argmax(-1) == log_s.argmax(-1)).float().mean()),
        })
    return rows


def summarise(rows):
    mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    return {"perplexity": math.exp(mean("sparse_nll")), "dense_perplexity": math.exp(mean("dense_nll")),
            "mean_kl": mean("kl"), "top1_agreement": mean("top1"), "chunks": len(rows)}


def paired_bootstrap(a, b, key, draws=2000, seed=0):
    """Percentile bootstrap (95%) over chunks of mean(a[key]) - mean(b[key]) (paired: same chunks)."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.tensor([x[key] - y[key] for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    idx = torch.randint(0, len(d), (draws, len(d)), generator=gen)
    means = d[idx].mean(1)
    return {"mean": float(d.mean()), "low": float(means.quantile(0.025)), "high": float(means.quantile(0.975))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--budgets", default="52 keys;128 keys;0.3",
                    help="';'-separated budgets as spattn.plan takes them (fractions of the dense tiles, 'N keys')")
    ap.add_argument("--table", default=None, help="a saved candidate table (.npz) to reuse instead of calibrating")
    ap.add_argument("--objective", default="recall")
    ap.add_argument("--eval-chunks", type=int, default=6)
    ap.add_argument("--shift-chunks", type=int, default=4)
    ap.add_argument("--uniform-top", type=int, default=2, help="uniform candidates evaluated per budget")
    ap.add_argument("--long", default="4096", help="lengths for the recall check of Plan.at_length")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"machine": machine_info(), "args": vars(args), "note": "CPU timings on a shared 2-core machine"}
    model, tokenizer = load_smollm2()
    budgets = [b.strip() for b in args.budgets.split(";") if b.strip()]
    budgets = [float(b) if b.replace(".", "", 1).isdigit() else b for b in budgets]
    wall, cpu = time.perf_counter(), time.process_time()
    if args.table:
        first = make_plan(None, None, budget=1.0, table=CandidateTable.load(args.table), objective=args.objective)
    else:  # calibrate once (a 100% budget always fits), then solve each budget on the same table
        first = make_plan(model, "austen", tokenizer=tokenizer, budget=1.0, lengths=(args.length,),
                          samples=args.samples, block_size=args.block_size, objective=args.objective)
        first.table.save(Path(args.out).with_suffix(".table.npz"))
    out["planning"] = {"wall_seconds": time.perf_counter() - wall, "process_cpu_seconds": time.process_time() - cpu,
                       "stages": first.seconds, "layers": first.table.layers, "heads": first.table.heads,
                       "candidates": [c.name for c in first.table.candidates], "samples": args.samples,
                       "reused_table": args.table}
    print("planning", out["planning"], flush=True)
    held = text_chunks("austen", tokenizer, args.length, split="held_out", max_chunks=args.eval_chunks)
    shift = text_chunks("kjv", tokenizer, args.length, split="held_out", max_chunks=args.shift_chunks)
    caches = {"austen": {}, "kjv": {}}
    out["budgets"] = []
    for budget in budgets:
        try:
            res = make_plan(None, None, budget=budget, table=first.table, objective=args.objective)
        except InfeasibleBudget as err:
            out["budgets"].append({"budget": budget, "note": str(err)})
            print(budget, err, flush=True)
            continue
        table, C = res.table, len(res.table.candidates)
        totals = res.costs.sum(0)  # in the budget's unit (tiles or keys per query, summed over heads)
        fits = [c for c in range(C) if float(totals[c]) <= res.capacity * (1 + 1e-9)]
        ranked = sorted(fits, key=lambda c: -float(res.values[:, c].sum()))[: args.uniform_top]
        entry = {"budget": budget, "plan": {"choices": [h["choice"] for h in res.per_head],
                                            "tile_fraction": res.plan.meta["planner"]["mean_tile_fraction"],
                                            "keys_per_query": res.plan.meta["planner"]["mean_keys_per_query"],
                                            "calibration_recall": res.plan.meta["planner"]["mean_recall"]},
                 "uniform": []}
        plan_rows = {name: lm_metrics(model, chunks, res.plan, args.block_size, caches[name])
                     for name, chunks in (("austen", held), ("kjv", shift))}
        entry["plan"].update({name: summarise(rows) for name, rows in plan_rows.items()})
        entry["plan"]["recall_at"] = [validate(model, res.plan, "austen", length=int(L), tokenizer=tokenizer,
                                               samples=1) for L in args.long.split(",") if L]
        for c in ranked:
            cand = table.candidates[c]
            uplan = spattn.Plan(default=cand.pattern, budget=res.plan.budget)
            rows = {name: lm_metrics(model, chunks, uplan, args.block_size, caches[name])
                    for name, chunks in (("austen", held), ("kjv", shift))}
            u = {"choice": cand.name, "tile_fraction": float(table.block_fraction[..., c].mean()),
                 "keys_per_query": float(table.keys[..., c].mean()),
                 "calibration_recall": float(table.recall[..., c].mean())}
            u.update({name: summarise(r) for name, r in rows.items()})
            u["plan_minus_uniform"] = {name: {k: paired_bootstrap(plan_rows[name], rows[name], k)
                                              for k in ("sparse_nll", "kl", "top1")} for name in rows}
            u["recall_at"] = [validate(model, uplan, "austen", length=int(L), tokenizer=tokenizer, samples=1)
                              for L in args.long.split(",") if L]
            for r in u["recall_at"] + entry["plan"]["recall_at"]:
                r.pop("per_head_recall", None)
            entry["uniform"].append(u)
            print(budget, cand.name, json.dumps({k: u[k] for k in ("austen", "kjv")}), flush=True)
        print(budget, "plan", json.dumps({k: entry["plan"][k] for k in ("austen", "kjv")}), flush=True)
        out["budgets"].append(entry)
        tag = str(budget).replace(" ", "")
        res.plan.save(Path(args.out).with_name(Path(args.out).stem + f"_plan_{tag}.json"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
