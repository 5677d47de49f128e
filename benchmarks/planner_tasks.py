"""Planner task profiles: the same budget, planned for language modelling and for retrieval (SmolLM2-135M).

Three plans from one candidate table at one budget:

* ``recall``: attention mass kept (no task);
* ``lm``: ``task=LMScorer`` (minus KL(dense || sparse) of next-token distributions on calibration-split chunks
  the table did not capture);
* ``retrieval``: ``task=RetrievalScorer`` (the mean log-likelihood of pass-key answers hidden in the
  calibration split, ``spattn.cli.plan.RetrievalScorer``).

The task plans weigh each layer by the task's loss when that layer alone runs the cheapest candidate (one scorer
call per layer: ``spattn.planner.tasks.layer_sensitivity``). Each plan is then evaluated on both tasks on text
the planner never saw: held-out Austen (perplexity, KL per chunk) and pass keys in held-out Austen (answer
log-likelihood and exact match per sample). Paired comparisons (``spattn.eval.stats.compare``, bootstrap over
chunks / samples): ``lm - retrieval`` on each task, so a plan for one task that is worse on the other shows as an
interval away from 0. How different the plans are: heads whose choice differs, keys per query per layer, and
the layer weights of each task.

The JSON is rewritten after every step; ``--time-budget`` skips (and records) what would not fit.

    PYTHONPATH=src python benchmarks/planner_tasks.py --length 1024 \
        --table benchmarks/results/cpu/planner/smollm2_austen_1k.table.npz --budget "104 keys" \
        --out benchmarks/results/cpu/planner/tasks_1k.json
    PYTHONPATH=src python benchmarks/planner_tasks.py --quick --out /tmp/planner_tasks.json   # dry run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.env import machine_info
from spattn.bench.record import finish, record_error
from spattn.cli.plan import RetrievalScorer
from spattn.data import text_chunks
from spattn.eval.stats import compare
from spattn.integrations.models import load_smollm2
from spattn.planner import CandidateTable, LMScorer, make_plan
from spattn.planner.calibrate import calibration_chunks


def save(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


def lm_rows(model, chunks, plan, block_size, dense_cache):
    """Per chunk: NLL per token and mean KL(dense || sparse) (dense: the model's own attention, cached)."""
    rows = []
    for n in range(chunks.shape[0]):
        ids = chunks[n : n + 1]
        with torch.no_grad():
            if n not in dense_cache:
                dense_cache[n] = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            log_d = dense_cache[n]
            with spattn.patched(model, plan, block_size=block_size):
                log_s = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        rows.append({"nll": float(F.nll_loss(log_s, ids[0, 1:])),
                     "kl": float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--budget", default="104 keys", help="as spattn.plan takes it (one budget for all plans)")
    ap.add_argument("--table", default=None, help="a saved candidate table (.npz) at --length (else calibrate)")
    ap.add_argument("--samples", type=int, default=3, help="calibration chunks when calibrating")
    ap.add_argument("--lm-chunks", type=int, default=1, help="LM scorer chunks (calibration split)")
    ap.add_argument("--retrieval-samples", type=int, default=3, help="retrieval scorer pass keys (calibration split)")
    ap.add_argument("--eval-chunks", type=int, default=3, help="held-out Austen chunks for the LM evaluation")
    ap.add_argument("--eval-passkeys", type=int, default=8, help="held-out pass keys for the retrieval evaluation")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="tiny dry run (256 tokens, 1 sample each)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.quick:
        args.length, args.samples, args.lm_chunks, args.retrieval_samples = 256, 1, 1, 1
        args.eval_chunks, args.eval_passkeys, args.budget = 1, 2, "0.8"
    start = time.perf_counter()
    path = Path(args.out)
    L, bs = args.length, args.block_size
    out = {"what": "planner task profiles: lm vs retrieval plans at one budget, each evaluated on both tasks",
           "machine": machine_info(torch.device("cpu")), "args": vars(args), "command": " ".join(sys.argv),
           "note": "CPU, shared machine: the seconds are not speed claims", "skipped": [], "plans": {},
           "phase_seconds": {}}
    save(out, path)

    def phase(name: str, since: float) -> None:
        out["phase_seconds"][name] = round(time.perf_counter() - since, 2)
        print(f"[phase] {name}: {out['phase_seconds'][name]:.1f} s", flush=True)
        save(out, path)

    def left() -> float:
        return math.inf if args.time_budget is None else args.time_budget - (time.perf_counter() - start)

    status = "complete"
    try:
        torch.manual_seed(0)
        model, tok = load_smollm2()
        phase("model_load", start)
        t0 = time.perf_counter()
        if args.table:
            table = CandidateTable.load(args.table)
            if table.length != L or table.block_size != bs:
                raise ValueError(f"--table is at length {table.length}, block {table.block_size}; asked {L}, {bs}")
            out["table"] = {"reused": args.table}
        else:
            table = make_plan(model, "austen", tokenizer=tok, budget=1.0, lengths=(L,), samples=args.samples,
                              block_size=bs).table
            out["table"] = {"calibration_seconds": table.seconds, "samples": args.samples}
        skip = table.samples  # the scorers use calibration chunks after the captured ones
        out["table"].update(samples=table.samples, candidates=[c.name for c in table.candidates])
        phase("table", t0)

        lm_scorer = LMScorer(calibration_chunks("austen", tok, L, skip + args.lm_chunks)[skip:], block_size=bs)
        hay_cal = calibration_chunks("austen", tok, L, skip + args.lm_chunks + 2)[skip + args.lm_chunks:].flatten()
        ret_scorer = RetrievalScorer(tok, hay_cal, L, args.retrieval_samples, block_size=bs)
        results = {}
        for name, task in (("recall", None), ("lm", lm_scorer), ("retrieval", ret_scorer)):
            t1 = time.perf_counter()
            res = make_plan(model, "austen", tokenizer=tok, budget=args.budget, table=table, task=task)
            results[name] = res
            meta = res.plan.meta["planner"]
            out["plans"][name] = {
                "task": meta["task"], "mean_recall": meta["mean_recall"],
                "mean_keys_per_query": meta["mean_keys_per_query"], "mean_tile_fraction": meta["mean_tile_fraction"],
                "layer_weights": res.layer_weights,
                "keys_per_layer": [sum(h["keys_per_query"] for h in res.per_head if h["layer"] == i) / table.heads
                                   for i in range(table.layers)],
                "choices": [h["choice"] for h in res.per_head], "seconds": time.perf_counter() - t1}
            res.plan.save(path.with_name(path.stem + f"_plan_{name}.json"))
            phase(f"plan_{name}", t1)
        diff = {}
        for a, b in (("lm", "retrieval"), ("lm", "recall"), ("retrieval", "recall")):
            ca, cb = out["plans"][a]["choices"], out["plans"][b]["choices"]
            diff[f"{a}_vs_{b}"] = {"heads_differ": sum(x != y for x, y in zip(ca, cb, strict=True)),
                                   "heads": len(ca)}
        out["plans_differ"] = diff
        save(out, path)

        # evaluation on held-out text: LM rows per chunk, pass keys per sample
        held = text_chunks("austen", tok, L, split="held_out", max_chunks=args.eval_chunks)
        hay_held = text_chunks("austen", tok, L, split="held_out").flatten()
        ret_eval = RetrievalScorer(tok, hay_held, L, args.eval_passkeys, block_size=bs, seed=1000)
        t1 = time.perf_counter()
        cache: dict = {}
        dense_ll, dense_correct = ret_eval.per_sample(model, None)
        rows_dense = lm_rows(model, held, None, bs, cache)
        out["dense"] = {"perplexity": math.exp(sum(r["nll"] for r in rows_dense) / len(rows_dense)),
                        "passkey_log_likelihood": sum(dense_ll) / len(dense_ll),
                        "passkey_correct": dense_correct}
        phase("dense", t1)
        evals: dict = {}
        for name in ("lm", "retrieval", "recall"):
            est = out["phase_seconds"].get("eval_lm", 0.0)
            if est > left():
                out["skipped"].append({"what": f"evaluation of the {name} plan", "estimated_seconds": est,
                                       "seconds_left": left()})
                continue
            t1 = time.perf_counter()
            plan = results[name].plan
            rows = lm_rows(model, held, plan, bs, cache)
            ll, correct = ret_eval.per_sample(model, plan)
            evals[name] = {"rows": rows, "ll": ll, "correct": [float(c) for c in correct]}
            out["plans"][name]["held_out"] = {
                "perplexity": math.exp(sum(r["nll"] for r in rows) / len(rows)),
                "mean_kl": sum(r["kl"] for r in rows) / len(rows),
                "per_chunk": rows, "passkey_log_likelihood": sum(ll) / len(ll), "passkey_per_sample": ll,
                "passkey_correct": correct, "passkey_accuracy": sum(correct) / len(correct)}
            phase(f"eval_{name}", t1)
        comparisons = {}
        for a, b in (("lm", "retrieval"), ("lm", "recall"), ("retrieval", "recall")):
            if a in evals and b in evals:
                ea, eb = evals[a], evals[b]
                comparisons[f"{a}_minus_{b}"] = {
                    "kl": compare([r["kl"] for r in ea["rows"]], [r["kl"] for r in eb["rows"]],
                                  higher_is_better=False).to_dict(),
                    "nll": compare([r["nll"] for r in ea["rows"]], [r["nll"] for r in eb["rows"]],
                                   higher_is_better=False).to_dict(),
                    "passkey_log_likelihood": compare(ea["ll"], eb["ll"]).to_dict(),
                    "passkey_correct": compare(ea["correct"], eb["correct"]).to_dict()}
        out["comparisons"] = comparisons
    except Exception as err:  # keep the partial JSON, say what broke
        status = record_error(out, err)
    finish(out, path, status, time.perf_counter() - start, save)


if __name__ == "__main__":
    main()
