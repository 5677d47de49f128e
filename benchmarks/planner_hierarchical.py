"""Hierarchical as a planner candidate on SmolLM2-135M (issues 15, 16): does the planner pick it, and what does
it change on held-out text?

Calibrates one candidate table (sinks + window, Budgeted, the frozen-form Hierarchical at the Budgeted key counts,
dense) on Austen, then at each key budget solves twice: with every candidate, and with the hierarchical ones
removed (``Constraints(families=...)``). Both plans are scored on held-out Austen chunks: perplexity, mean
KL(dense || sparse), with a paired percentile-bootstrap interval of the per-chunk KL difference (with minus
without hierarchical). Records which layers the solver gave to Hierarchical (a whole layer or none: Note
[layer-wide candidates]).

    PYTHONPATH=src python benchmarks/planner_hierarchical.py --length 1024 --budgets "128 keys;256 keys" \
        --out benchmarks/results/cpu/planner/hierarchical_candidate_1k.json
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
from spattn.eval.stats import compare
from spattn.integrations.models import load_smollm2
from spattn.planner import Constraints, make_plan
from spattn.planner.candidates import default_candidates


def chunk_scores(model, chunks, plan, dense_logp):
    """Per chunk: NLL per token and mean KL(dense || sparse) of the next-token distributions."""
    out = []
    for n, row in enumerate(chunks):
        ids = row[None]
        if n not in dense_logp:
            with torch.no_grad():
                dense_logp[n] = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        with torch.no_grad(), spattn.patched(model, plan, backend="reference"):
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None]).mean().item()
        kl = (dense_logp[n].exp() * (dense_logp[n] - logp)).sum(-1).mean().item()
        out.append({"nll": nll, "kl": kl})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--budgets", default="128 keys;256 keys")
    ap.add_argument("--eval-chunks", type=int, default=4)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.eval()
    held = text_chunks("austen", tokenizer, args.length, max_chunks=args.eval_chunks)  # the held-out split
    cands = default_candidates(args.length, 64, families=("sinks_window", "budgeted", "hierarchical", "dense"))
    record = {"benchmark": "planner_hierarchical", "command": "python " + " ".join(__import__("sys").argv),
              "machine": machine_info("cpu"), "length": args.length, "samples": args.samples,
              "eval_chunks": args.eval_chunks, "candidates": [c.name for c in cands], "budgets": []}
    first = make_plan(model, "austen", tokenizer=tokenizer, budget=1.0, candidates=cands, lengths=(args.length,),
                      samples=args.samples)  # the calibration split (never the held-out tail)
    record["calibration_s"] = first.seconds.get("calibration")
    table = first.table
    # per candidate: keys per query and mean calibration recall, overall and per layer (why the solver picks it)
    record["table"] = [{"name": c.name, "family": c.family,
                        "keys_per_query": float(table.keys[..., n].mean()),
                        "tile_fraction": float(table.block_fraction[..., n].mean()),
                        "recall": float(table.recall[..., n].mean()),
                        "recall_per_layer": [round(float(x), 4) for x in table.recall[..., n].mean(1)]}
                       for n, c in enumerate(table.candidates)]
    for row in record["table"]:
        print(row["name"], round(row["keys_per_query"], 1), round(row["recall"], 4), flush=True)
    no_hier = Constraints(families=("sinks_window", "budgeted"))
    dense_logp: dict = {}
    for budget in args.budgets.split(";"):
        row = {"budget": budget}
        with_h = make_plan(None, None, budget=budget, table=table, solver="milp")
        without = make_plan(None, None, budget=budget, table=table, solver="milp", constraints=no_hier)
        layers = [h["layer"] for h in with_h.per_head if h["family"] == "hierarchical"]
        row["hierarchical_layers"] = sorted(set(layers))
        row["hierarchical_heads"] = len(layers)
        for name, res in (("with", with_h), ("without", without)):
            row[name] = {"mean_recall": res.plan.meta["planner"]["mean_recall"],
                         "mean_keys_per_query": res.plan.meta["planner"]["mean_keys_per_query"],
                         "total_value": res.solution.value, "choices": [h["choice"] for h in res.per_head]}
        if row["hierarchical_heads"]:
            a = chunk_scores(model, held, with_h.plan, dense_logp)
            b = chunk_scores(model, held, without.plan, dense_logp)
            for name, s in (("with", a), ("without", b)):
                row[name]["perplexity"] = math.exp(sum(x["nll"] for x in s) / len(s))
                row[name]["kl"] = sum(x["kl"] for x in s) / len(s)
            diff = compare([x["kl"] for x in a], [x["kl"] for x in b], higher_is_better=False)
            row["kl_difference"] = {"with_minus_without": diff.difference, "interval": [diff.low, diff.high],
                                    "verdict": {"a": "with is better", "b": "without is better",
                                                "tie": "tie"}[diff.winner], "chunks": diff.n}
        else:
            row["note"] = "the solver gave no layer to Hierarchical at this budget: the two plans are the same"
        record["budgets"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("with", "without")}), flush=True)
        for name in ("with", "without"):
            print(name, {k: v for k, v in row[name].items() if k != "choices"}, flush=True)
    record["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
