"""Hierarchical attention trained from scratch on the CPU, against dense and a window at equal attention budget.

Three variants of the same tiny ``spattn.nn.TransformerLM`` (``--dim`` 64, 2 layers, 2 query heads, 1 key/value
head), differing only by the attention of every layer:

* ``dense``: causal SDPA;
* ``window``: ``Sinks(--sinks) | Window(w)``, ``w`` the smallest window whose keys per query (measured on the
  compiled layout) reach the hierarchical variant's;
* ``hierarchical``: ``spattn.hierarchical.HierarchicalAttention`` (learned gates and learned pooling) on
  ``Hierarchical(compress_block, compress_stride, select_block, select_count, window)``.

Keys per query are measured, not assumed: for ``window``/``dense`` from the compiled layout's ``allowed_pairs``;
for ``hierarchical`` on the trained model's own queries and keys of a held-out batch (every layer): the pairs of
the compressed, selected and window branch layouts (summed: the branches load separately) and the distinct keys
read at full resolution (``spattn.hierarchical.fine_layout``).

Tasks, run in this order (the JSON is rewritten after every run, so a killed run keeps what it finished):

1. ``retrieval``: pass-key retrieval: one key token (``--keys`` classes) among random filler, asked for by the
   last ``--queries`` positions, each more than the window baseline's reach (layers x (sinks + window)) after the key.
   Accuracy per held-out example (mean over its queries) with a bootstrap interval (``spattn.eval.stats``) and
   paired comparisons. (MQAR from ``spattn.eval.tasks`` at this length was not learned by the dense model in
   300 steps at these sizes, so it says nothing about the attention: see docs/hierarchical.md.)
2. ``lm``: byte-level language modelling on Austen (``spattn.data``), held-out loss every ``--eval-every`` steps.

``--time-budget SECONDS`` skips runs that would not fit (estimated from the runs done) and lists them in
``skipped``. One thread (``torch.set_num_threads(1)``) unless ``--threads``.

    python benchmarks/hierarchical_train.py                         # ~12 min on one core
    python benchmarks/hierarchical_train.py --quick --out /tmp/ht   # smoke run, ~1 min
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

import spattn
from spattn.bench.env import machine_info
from spattn.eval import stats
from spattn.eval.tasks import IGNORE_INDEX
from spattn.hierarchical import HierarchicalAttention, branch_layouts, fine_layout
from spattn.learned.train import lm_batches, sequence_loss, task_batches
from spattn.nn import TransformerLM

VARIANTS = ("dense", "window", "hierarchical")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/cpu/hierarchical_train.json")
    p.add_argument("--quick", action="store_true", help="tiny smoke settings")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=900.0, help="seconds; runs that would not fit are skipped")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lm-steps", type=int, default=200)
    p.add_argument("--task-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lm-eval-batches", type=int, default=4)
    p.add_argument("--filler", type=int, default=32, help="filler vocabulary of the retrieval task")
    p.add_argument("--keys", type=int, default=16, help="pass-key classes (chance = 1 / keys)")
    p.add_argument("--queries", type=int, default=64, help="labelled query positions at the end")
    p.add_argument("--needle", type=int, default=16, help="consecutive copies of the pass key")
    p.add_argument("--task-train", type=int, default=4000)
    p.add_argument("--task-test", type=int, default=256)
    p.add_argument("--compress-block", type=int, default=32)
    p.add_argument("--compress-stride", type=int, default=16)
    p.add_argument("--select-block", type=int, default=32)
    p.add_argument("--select-count", type=int, default=3)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--tasks", default="retrieval,lm", help="comma-separated subset of retrieval, lm")
    args = p.parse_args(argv)
    args.variants = tuple(v for v in args.variants.split(",") if v)
    args.tasks = tuple(t for t in args.tasks.split(",") if t)
    if not args.variants or set(args.variants) - set(VARIANTS):
        p.error(f"--variants must be a subset of {VARIANTS}, got {args.variants}")
    if not args.tasks or set(args.tasks) - {"retrieval", "lm"}:
        p.error(f"--tasks must be a subset of retrieval, lm, got {args.tasks}")
    if args.quick:
        args.length, args.lm_steps, args.task_steps, args.eval_every = 192, 3, 3, 3
        args.task_train, args.task_test, args.lm_eval_batches, args.batch_size = 16, 16, 1, 2
        args.compress_block, args.compress_stride, args.select_block, args.select_count, args.window = 16, 8, 16, 2, 16
        args.queries, args.needle = 16, 4
    return args


# ----------------------------------------------------------------------------------------------- budget
def hierarchical_config(args) -> spattn.Hierarchical:
    return spattn.Hierarchical(compress_block=args.compress_block, compress_stride=args.compress_stride,
                               select_block=args.select_block, select_count=args.select_count, window=args.window,
                               pooling="learned")


def layout_keys_per_query(pattern, length: int, block_size: int) -> float:
    """Mean keys per query of a static pattern, from the compiled layout (causal)."""
    if pattern is None:
        return (length + 1) / 2
    layout = spattn.compile(pattern, length, length, causal=True, block_size=block_size)
    return float(layout.allowed_pairs().double().mean()) / length


@torch.no_grad()
def hierarchical_keys_per_query(model: TransformerLM, ids: torch.Tensor) -> dict:
    """Keys per query of every hierarchical layer on ``ids [B, L]`` (the model's own queries and keys)."""
    captured = []
    hooks = [layer.register_forward_pre_hook(lambda mod, inp: captured.append((mod, inp[0])))
             for layer in model.attention_layers()]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    per_layer = []
    for mod, x in captured:
        q, k, _ = mod.project(x)
        pat = mod.pattern
        pool = None if pat.pool_key is None else (pat.pool_key, pat.pool_value)
        scale = 1.0 / math.sqrt(q.shape[-1])
        lays = branch_layouts(q, k, pat.config, scale=scale, pool_logits=pool)
        L = q.shape[2]
        row = {}
        for name in ("compressed", "selected", "window"):
            lay = lays[name]
            if lay is None:
                row[name] = 0.0
                continue
            pairs = lay.allowed_pairs().double()
            row[name] = float(pairs.mean()) / L  # the compressed layout is over L padded block tokens
        row["branches_total"] = row["compressed"] + row["selected"] + row["window"]
        fine = fine_layout(q, k, pat.config, scale=scale, pool_logits=pool)
        row["fine_distinct"] = float(fine.allowed_pairs().double().mean()) / L
        row["gate_mean"] = [float(x) for x in pat.last["gate_mean"]]
        per_layer.append(row)
    keys = ("compressed", "selected", "window", "branches_total", "fine_distinct")
    return {"per_layer": per_layer, **{k: sum(r[k] for r in per_layer) / len(per_layer) for k in keys}}


def matched_window(target: float, sinks: int, length: int, block_size: int) -> tuple[int, float]:
    """The smallest ``w`` with keys/query of ``Sinks(sinks) | Window(w)`` >= ``target``."""
    lo, hi = 0, length
    while lo < hi:
        mid = (lo + hi) // 2
        if layout_keys_per_query(spattn.Sinks(sinks) | spattn.Window(mid), length, block_size) >= target:
            hi = mid
        else:
            lo = mid + 1
    return lo, layout_keys_per_query(spattn.Sinks(sinks) | spattn.Window(lo), length, block_size)


# ----------------------------------------------------------------------------------------------- models
def make_model(variant: str, vocab: int, args, window_pattern) -> TransformerLM:
    torch.manual_seed(args.seed)
    head_dim = args.dim // args.heads
    if variant == "dense":
        pattern = None
    elif variant == "window":
        pattern = window_pattern
    else:
        config = hierarchical_config(args)

        def pattern(_layer):
            return HierarchicalAttention(config, args.heads, args.kv_heads, head_dim, backend="auto")
    return TransformerLM(vocab, dim=args.dim, layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         pattern=pattern, block_size=args.select_block).to(args.device)


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 10)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model, batches, steps: int, lr: float, loss_fn, evaluate, eval_every: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    curve, start = [], time.perf_counter()
    train_loss = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        inputs, labels = next(batches)
        loss = loss_fn(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_loss.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_loss": sum(train_loss[-eval_every:]) / len(train_loss[-eval_every:]),
                          **evaluate(model), "seconds": time.perf_counter() - start})
            print(f"  step {step + 1}: {curve[-1]}", flush=True)
    return {"curve": curve, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- tasks
def retrieval_data(args, num: int, seed: int):
    """Pass-key retrieval: inputs, labels ``[N, length]`` and, per labelled position, the distance to the key.

    Filler tokens ``0 .. filler - 1`` (random); ``needle`` consecutive copies of one pass-key token (``filler ..
    filler + keys - 1``, the only token of that range in the sequence) starting at a random position in
    ``[sinks + 8, length - queries - far - needle)``; the
    last ``queries`` positions hold the query token ``filler + keys`` and are labelled with the pass key. Every
    query is further than ``far`` (the window baseline's reach) from its key."""
    gen = torch.Generator().manual_seed(seed + 99)
    L, q, far = args.length, args.queries, args.far
    query_token = args.filler + args.keys
    low, high = args.sinks + 8, L - q - far - args.needle
    if high <= low:
        raise ValueError(f"--length {L} is too short for {q} queries beyond {far} tokens of the key")
    inputs = torch.randint(0, args.filler, (num, L), generator=gen)
    key = torch.randint(0, args.keys, (num,), generator=gen) + args.filler
    where = torch.randint(low, high, (num,), generator=gen)
    rows = torch.arange(num)
    for j in range(args.needle):
        inputs[rows, where + j] = key
    inputs[:, L - q:] = query_token
    labels = torch.full((num, L), IGNORE_INDEX, dtype=torch.long)
    labels[:, L - q:] = key[:, None]
    distance = torch.full_like(labels, -1)
    distance[:, L - q:] = torch.arange(L - q, L)[None, :] - (where[:, None] + args.needle - 1)  # to the last copy
    return inputs, labels, distance


@torch.no_grad()
def retrieval_scores(model, inputs, labels, distance, far: int, batch: int) -> dict:
    model.eval()
    correct = []
    for i in range(0, inputs.shape[0], batch):
        logits = model(inputs[i:i + batch].to(next(model.parameters()).device))
        correct.append(logits.argmax(-1).cpu() == labels[i:i + batch])
    model.train()
    correct = torch.cat(correct)
    mask = labels != IGNORE_INDEX
    per_example = [float(correct[r][mask[r]].float().mean()) for r in range(inputs.shape[0])]
    far_mask, near_mask = mask & (distance > far), mask & (distance <= far)
    out = {"accuracy": stats.estimate(per_example).to_dict(), "per_example": per_example,
           "queries": int(mask.sum()), "far_queries": int(far_mask.sum()), "far_threshold": far}
    for name, m in (("far", far_mask), ("near", near_mask)):
        values = correct[m].float().tolist()
        out[f"{name}_accuracy"] = stats.estimate(values).to_dict() if values else None
    return out


def austen_bytes() -> torch.Tensor:
    from spattn.data import load_text

    text = load_text("austen")
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out_path = Path(os.environ["OUT"]) / "hierarchical_train.json" if os.environ.get("OUT") and args.out == \
        parse([]).out else Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    config = hierarchical_config(args)
    result: dict = {
        "benchmark": "hierarchical_train", "command": "python " + " ".join(sys.argv),
        "machine": machine_info(args.device), "settings": vars(args), "hierarchical_config": config.to_dict(),
        "note": "CPU, one thread, on a machine shared with other developers: seconds are indicative only",
        "budget": {}, "retrieval": {}, "lm": {}, "skipped": [],
    }

    def save():
        result["seconds"] = time.perf_counter() - start
        out_path.write_text(json.dumps(result, indent=1))

    # budget: the hierarchical keys/query measured on a fresh model (structural: it hardly moves with training)
    probe = make_model("hierarchical", 256, args, None)
    ids = torch.randint(0, 256, (2, args.length), generator=torch.Generator().manual_seed(1)).to(args.device)
    fresh = hierarchical_keys_per_query(probe, ids)
    w, window_keys = matched_window(fresh["branches_total"], args.sinks, args.length, args.select_block)
    window_pattern = spattn.Sinks(args.sinks) | spattn.Window(w)
    result["budget"] = {
        "rule": "window = the smallest Sinks|Window whose keys/query reach the hierarchical branches' total "
                "(compressed tokens + selected keys + window keys, overlaps counted twice)",
        "hierarchical_fresh": fresh, "window_pattern": window_pattern.to_dict(), "window": w,
        "keys_per_query": {"dense": layout_keys_per_query(None, args.length, args.select_block),
                           "window": window_keys, "hierarchical": fresh["branches_total"]},
    }
    print("budget:", result["budget"]["keys_per_query"], "window", w, flush=True)
    save()
    # a stack of windows reaches layers * window tokens back (the first run, with one window's reach, let the
    # 2-layer window baseline relay the key): every query is further than that from its key
    args.far = args.layers * (w + args.sinks)
    far = args.far
    vocab = args.filler + args.keys + 1
    seconds_per_run: list[float] = []

    def fits(label: str) -> bool:
        elapsed = time.perf_counter() - start
        estimate = max(seconds_per_run) if seconds_per_run else 0.0
        if elapsed + estimate > args.time_budget:
            result["skipped"].append({"run": label, "elapsed": elapsed, "estimate": estimate})
            save()
            print("skip", label, flush=True)
            return False
        return True

    # 1. retrieval
    tr = retrieval_data(args, args.task_train, seed=args.seed)
    te = retrieval_data(args, args.task_test, seed=args.seed + 1)
    result["settings"]["far"] = far
    result["retrieval_task"] = {"kind": "pass key: one key token among random filler, queried by the last "
                                        f"{args.queries} positions, every query more than {far} tokens after it",
                                "seq_len": args.length, "filler": args.filler, "keys": args.keys,
                                "chance": 1 / args.keys, "vocab": vocab,
                                "train_examples": args.task_train, "test_examples": args.task_test,
                                "far_threshold": far, "test_far_queries": int((te[2] > far).sum()),
                                "test_queries": int((te[1] != IGNORE_INDEX).sum())}

    def task_loss(model, inputs, labels):
        return sequence_loss(model(inputs.to(args.device)), labels.to(args.device))

    for variant in args.variants if "retrieval" in args.tasks else ():
        if not fits(f"retrieval/{variant}"):
            continue
        print(f"retrieval {variant}", flush=True)
        model = make_model(variant, vocab, args, window_pattern)
        small = (te[0][:64], te[1][:64], te[2][:64])
        run = train(model, task_batches(tr[0], tr[1], args.batch_size, seed=args.seed), args.task_steps, args.lr,
                    task_loss,
                    lambda m, small=small: {
                        "held_accuracy_64": retrieval_scores(m, *small, far, 16)["accuracy"]["value"]},
                    args.eval_every)
        run["test"] = retrieval_scores(model, *te, far, 32)
        if variant == "hierarchical":
            run["keys_per_query"] = hierarchical_keys_per_query(model, te[0][:4].to(args.device))
        seconds_per_run.append(run["seconds"])
        result["retrieval"][variant] = run
        save()
    done = [v for v in VARIANTS if v in result["retrieval"]]
    result["retrieval_comparisons"] = {
        f"hierarchical_vs_{v}": stats.compare(result["retrieval"]["hierarchical"]["test"]["per_example"],
                                              result["retrieval"][v]["test"]["per_example"]).to_dict()
        for v in ("dense", "window") if "hierarchical" in done and v in done}
    save()

    # 2. language modelling on Austen bytes
    ids = austen_bytes()
    split = int(ids.numel() * 0.95)
    stream = lm_batches(ids[split:], args.length, args.batch_size, seed=1234)
    held = [next(stream) for _ in range(args.lm_eval_batches)]
    result["lm_task"] = {"corpus": "austen", "tokens": "utf-8 bytes (vocabulary 256)", "train_tokens": split,
                         "held_out_tokens": int(ids.numel() - split), "length": args.length,
                         "eval_batches": args.lm_eval_batches}

    @torch.no_grad()
    def held_loss(model):
        model.eval()
        losses = [float(sequence_loss(model(x.to(args.device)), y.to(args.device))) for x, y in held]
        model.train()
        return {"held_loss": sum(losses) / len(losses)}

    def lm_loss(model, inputs, labels):
        return sequence_loss(model(inputs.to(args.device)), labels.to(args.device))

    for variant in args.variants if "lm" in args.tasks else ():
        if not fits(f"lm/{variant}"):
            continue
        print(f"lm {variant}", flush=True)
        model = make_model(variant, 256, args, window_pattern)
        run = train(model, lm_batches(ids[:split], args.length, args.batch_size, seed=args.seed), args.lm_steps,
                    args.lr, lm_loss, held_loss, args.eval_every)
        if variant == "hierarchical":
            run["keys_per_query"] = hierarchical_keys_per_query(model, held[0][0][:4].to(args.device))
        seconds_per_run.append(run["seconds"])
        result["lm"][variant] = run
        save()
    save()
    print(f"wrote {out_path} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
