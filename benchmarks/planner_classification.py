"""Planner task profiles on an encoder: a plan for ``task="classification"`` against the task-free plan (MiniLM).

all-MiniLM-L6-v2 (6 layers x 12 heads, bidirectional) has no language-model head, so the ``lm`` profile does not
apply to it; the comparison is between two plans from one candidate table at one budget:

* ``recall``: attention mass kept (no task; what ``spattn plan`` does without ``--task``);
* ``classification``: ``task="classification"`` (``EmbeddingScorer``: cosine agreement of the sparse model's
  sentence embeddings with the dense ones on calibration-split passages the table did not capture; each layer
  weighted by how much the embeddings suffer when that layer alone goes sparse);
* the best uniform pattern within the same budget, for reference.

Each is evaluated on held-out Austen passages (tokenised like sentences: ``[CLS] ... [SEP]``, padded batches) on
two tasks: the classification metric (cosine of the sentence embedding with the dense one, per passage) and a
token-level one (mean cosine of each token's last hidden state with the dense one, per passage: what a token
head such as tagging reads). Paired comparisons ``classification - recall`` (``spattn.eval.stats.compare``,
bootstrap over passages): a plan for one task that is worse on the other shows as an interval away from 0.

    PYTHONPATH=src python benchmarks/planner_classification.py \
        --out benchmarks/results/cpu/planner/classification_minilm.json
    PYTHONPATH=src python benchmarks/planner_classification.py --quick --out /tmp/planner_classification.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.env import machine_info
from spattn.data import text_chunks
from spattn.eval.stats import compare
from spattn.integrations.models import load_minilm
from spattn.planner import make_plan


def save(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


def passages(tokenizer, length: int, count: int, split: str) -> dict[str, torch.Tensor]:
    """``count`` passages of the ``split`` of Austen, re-tokenised as sentences (special tokens, padding)."""
    ids = text_chunks("austen", tokenizer, length - 2, split=split, max_chunks=count)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    return dict(tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=length))


@torch.no_grad()
def hidden(model, batch, plan, block_size) -> torch.Tensor:
    with spattn.patched(model, plan, block_size=block_size):
        return model(**batch).last_hidden_state.float()


def rows(model, batch, plan, block_size, dense) -> dict[str, list[float]]:
    """Per passage: sentence-embedding cosine and mean token cosine against the dense model."""
    mask = batch["attention_mask"].float()
    h = hidden(model, batch, plan, block_size)

    def pooled(x):
        return F.normalize((x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)

    sentence = (pooled(h) * pooled(dense)).sum(-1)
    token = (F.cosine_similarity(h, dense, dim=-1) * mask).sum(1) / mask.sum(1)
    return {"sentence_cosine": sentence.tolist(), "token_cosine": token.tolist()}


def summary(r: dict[str, list[float]]) -> dict[str, float]:
    return {k: sum(v) / len(v) for k, v in r.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=256, help="tokens per passage (MiniLM takes up to 512)")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--budget", default="0.4", help="one budget for both plans, as spattn.plan takes it")
    ap.add_argument("--samples", type=int, default=3, help="calibration passages captured for the table")
    ap.add_argument("--eval-passages", type=int, default=48, help="held-out passages")
    ap.add_argument("--quick", action="store_true", help="tiny dry run (64 tokens, few passages)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.quick:
        args.length, args.samples, args.eval_passages, args.budget = 64, 1, 6, "0.7"
    started = time.perf_counter()
    path = Path(args.out)
    torch.manual_seed(0)
    out = {"what": "planner task profiles on MiniLM: classification plan vs task-free (recall) plan at one budget, "
                   "each evaluated on sentence-embedding and token-level agreement with dense (held-out Austen)",
           "machine": machine_info("cpu"), "args": vars(args), "note": "CPU, shared machine: no timing claims",
           "phase_seconds": {}}
    save(out, path)
    status = "complete"
    try:
        model, tokenizer = load_minilm()
        budget = float(args.budget) if args.budget.replace(".", "", 1).isdigit() else args.budget
        t0 = time.perf_counter()
        base = make_plan(model, "austen", tokenizer=tokenizer, budget=budget, lengths=(args.length,),
                         samples=args.samples, block_size=args.block_size)
        out["phase_seconds"]["recall_plan"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        task = make_plan(model, "austen", tokenizer=tokenizer, budget=budget, task="classification",
                         table=base.table, samples=args.samples, block_size=args.block_size)
        out["phase_seconds"]["classification_plan"] = round(time.perf_counter() - t0, 1)
        plans = {"recall": base.plan, "classification": task.plan}
        if base.uniform is not None:
            choice = next(c for c in base.table.candidates if c.name == base.uniform["choice"])
            plans["uniform:" + choice.name] = spattn.Plan.uniform(None if choice.dense else choice.pattern)
        picks = {n: [h["choice"] for h in r.per_head] for n, r in (("recall", base), ("classification", task))}
        out["plans"] = {
            n: {"summary": r.plan.meta["planner"] | {"candidates": None}, "layer_weights": r.layer_weights}
            for n, r in (("recall", base), ("classification", task))}
        out["heads_differing"] = sum(a != b for a, b in zip(picks["recall"], picks["classification"], strict=True))
        out["heads"] = len(picks["recall"])
        out["uniform"] = base.uniform
        for n, r in (("recall", base), ("classification", task)):
            r.plan.save(path.with_name(path.stem + f"_plan_{n}.json"))
        save(out, path)
        batch = passages(tokenizer, args.length, args.eval_passages, "held_out")
        t0 = time.perf_counter()
        dense = hidden(model, batch, None, args.block_size)
        results = {n: rows(model, batch, p, args.block_size, dense) for n, p in plans.items()}
        out["phase_seconds"]["evaluate"] = round(time.perf_counter() - t0, 1)
        out["held_out"] = {"passages": int(batch["input_ids"].shape[0]),
                           "tokens": batch["attention_mask"].sum(1).tolist(),
                           "summary": {n: summary(r) for n, r in results.items()}}
        out["classification_minus_recall"] = {
            k: compare(results["classification"][k], results["recall"][k]).to_dict()
            for k in ("sentence_cosine", "token_cosine")}
        out["per_passage"] = results
    except Exception as err:  # keep the partial JSON, say what broke
        status = "failed"
        out["error"] = {"type": type(err).__name__, "message": str(err), "traceback": traceback.format_exc()}
        print(traceback.format_exc(), flush=True)
    out["status"] = status
    out["seconds"] = time.perf_counter() - started
    save(out, path)
    print(json.dumps({k: out.get(k) for k in ("heads_differing", "classification_minus_recall", "status")},
                     indent=1)[:3000])
    print("wrote", path, f"({out['seconds']:.0f} s, {status})")
    if status != "complete":
        sys.exit(1)


if __name__ == "__main__":
    main()
