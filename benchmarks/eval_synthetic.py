"""Synthetic long-range tasks trained from scratch with spattn attention inside: MQAR and ListOps (issues 13, 14).

One script, one GPU call (about 7 device minutes on one H200 with the defaults):

    PYTHONPATH=src python benchmarks/eval_synthetic.py --time-budget 400 --out $OUT/eval_synthetic.json   # H200
    PYTHONPATH=src python benchmarks/eval_synthetic.py --quick --device cpu --out /tmp/eval_quick.json     # smoke

1. Correctness gate: for every plan below, the attention on the device and backend used for training (forward
   and the gradients of query, key, value; the learned router in its straight-through training pass) against
   the float64 dense oracle on the layout's exact token mask, with the tolerance rule
   ``err <= 2 * err(same-dtype dense) + eps`` (``spattn.testing``). A failing plan is not trained.
2. MQAR (Zoology): sequences of 256 with 16 key-value pairs, vocabulary 8192, 2 layers, one head, no MLP,
   learned positions, d_model 64 then 128, best of the learning rates (picked on seed 0; the other seeds run
   at the best rate). Plans, most important first: dense; Window(64); dynamic selection
   Window(32) | TopK("pooled", 1) at block size 32 (about 64 keys, the window-64 budget); learned attention
   (``spattn.learned.LearnedTopK``: Window(32) kept + 1 routed block of 32, the same budget, trained with the
   model, straight-through); Sinks(16) | Window(48) (64 keys); Window(32); Window(128). Causal.
3. ListOps (LRA): 4 layers, 512 wide, 8 heads, MLP, 500-2000 tokens. Plans: dense; dynamic
   Window(64, 64) | TopK("pooled", 2); learned (Window(64, 64) kept + 2 routed blocks of 64); Window(128, 128);
   BigBird-style Global(first 64) | Window(96, 96) | RandomBlocks(2); local (non-overlapping 128-token chunks).
   Bidirectional, padding masked (the learned router holds padded positions at zero instead: see
   ``spattn.eval.train.Learned``).

Time: ``--time-budget SECONDS`` covers the whole script. After the gate, each task gets its share; a short
probe measures every plan's step time, and every plan of a task trains for the same number of steps, the most
the slowest plan fits in the share. A plan or width that would not fit in what is left is skipped and listed
under ``skipped``. The JSON is rewritten after every gate, probe and sweep, so a killed run keeps what it
measured. The published runs are far longer (Zoology: tens of thousands of steps; LRA ListOps: 5000 steps of
32), so absolute accuracies here are lower; the JSON says how many steps were run. Every accuracy carries a
bootstrap interval (seeds, then test examples); differences inside the paired interval are ties.

Writes JSON: card, versions (torch, triton, transformers), git commit, command, gate results, per-run
results, summary (ordering, versus dense), skipped items.
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import argparse
import json
import math
import time
import traceback
from typing import Any

import torch

import spattn
from spattn.bench.env import machine_info, versions
from spattn.bench.timing import TimeBudget
from spattn.eval import stats
from spattn.eval.train import Learned, TrainConfig, build_model, listops_config, mqar_config, sweep, train
from spattn.testing import assert_within, dense_attention, max_err, plain_attention

Plans = dict[str, tuple[Any, int]]  # name -> (pattern / Learned / None, block size)


def mqar_plans() -> Plans:
    """name -> (pattern / Learned / None, block size), most important first (the learned router last: its
    straight-through pass needs kernels of its own, compiled only if it is reached)."""
    return {
        "dense": (None, 32),
        "window64": (spattn.Window(64), 32),
        "window32+topk_pooled1": (spattn.Window(32) | spattn.TopK("pooled", 1), 32),
        "sinks16+window48": (spattn.Sinks(16) | spattn.Window(48), 32),
        "window32": (spattn.Window(32), 32),
        "window128": (spattn.Window(128), 32),
        "window32+learned1": (Learned(1, safeguard=spattn.Window(32)), 32),
    }


def listops_plans() -> Plans:
    return {
        "dense": (None, 64),
        "window64+topk_pooled2": (spattn.Window(64, 64) | spattn.TopK("pooled", 2), 64),
        "window128": (spattn.Window(128, 128), 64),
        "bigbird": (spattn.Global(tuple(range(64))) | spattn.Window(96, 96) | spattn.RandomBlocks(2, block=64), 64),
        # (i // 128 - j // 128) % 100000 == 0: the same 128-token chunk at these lengths (LRA's local attention)
        "local128": (spattn.Strided(100_000, block=128), 64),
        "window64+learned2": (Learned(2, safeguard=spattn.Window(64, 64)), 64),
    }


# ---------------------------------------------------------------------------------------------- 1. gate
def gate(config: TrainConfig, plan: Any, length: int, padded: bool) -> dict[str, Any]:
    """The attention of one layer of the model trained below, at the training batch, width and length, built the
    way the model builds it (``TinyTransformer.layout_for``: cached static layouts, the LayoutBuilder, padding
    removed on the device; the learned router's straight-through pass), forward and the gradients of query,
    key and value, against the float64 dense oracle on the layout's token mask (``spattn.testing``: ``err <= 2
    * err(same-dtype dense) + eps``). The kernels it compiles are the ones training runs next."""
    torch.manual_seed(0)
    model = build_model(config, plan)
    B, H, D = config.batch_size, config.heads, config.d_model // config.heads
    packed = torch.randn(B, length, 3, H, D, device=config.device)  # q, k, v as views, as the model has them
    q, k, v = (t.requires_grad_(True) for t in packed.permute(2, 0, 3, 1, 4).unbind(0))
    causal = config.task == "mqar"
    lengths = None
    if padded:  # right padding: rows end at every offset inside a block, some blocks wholly padded
        lengths = torch.randint(length // 2, length + 1, (B,), device=config.device)
        lengths[0] = length
    if isinstance(plan, Learned):  # the router's straight-through training pass, on the layout it chose
        router = model.blocks[0].pattern.train()
        out = router.attend(q, k, v, causal=causal, scale=1.0 / math.sqrt(D))
        layout = router.layout(q.detach(), k.detach(), router.last["chosen"], causal=causal)
    else:
        layout = model.layout_for(0, q.detach(), k.detach(), lengths)
        out = spattn.attention(q, k, v, layout, causal=causal, backend=config.backend)
    allowed = layout.to_dense().to(config.device)
    grad = torch.randn_like(out)
    if lengths is not None:  # padded query rows are never read (see spattn.eval.train): compare real rows
        real = (torch.arange(length, device=config.device)[None, :] < lengths[:, None])[:, None, :, None]
        grad = grad * real
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    results: dict[str, Any] = {"shape": [B, H, length, D], "density": layout.density(),
                               "keys_per_query": float(layout.keys_per_query().float().mean())}
    for name, oracle in (("golden", dense_attention), ("baseline", plain_attention)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        o, _ = oracle(qq, kk, vv, allowed)
        g = torch.autograd.grad(o, (qq, kk, vv), grad.to(o.dtype))
        results[name] = (o, *g)
    golden, baseline = results.pop("golden"), results.pop("baseline")
    for what, fast, gold, base in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, baseline, strict=True):
        if what == "out" and lengths is not None:
            fast, gold, base = fast * real, gold * real.to(gold.dtype), base * real.to(base.dtype)
        assert_within(fast, gold, base, k=2.0, eps=1e-4, what=what)
        results[f"err_{what}"] = max_err(fast, gold)
        results[f"baseline_err_{what}"] = max_err(base, gold)
    return results


# ---------------------------------------------------------------------------------------------- 2./3. training
def probe(config: TrainConfig, name: str, plan: Any, steps: int, log: list[str]) -> tuple[float, float, float]:
    """``(seconds per training step, fixed seconds per run, warm-up seconds)`` of one plan: a warm-up run of a
    few steps (anything left to compile), then runs of ``steps`` and ``2 * steps`` steps; the difference is the
    step time, the rest the run's fixed cost (model, data on the device, evaluation of ``test_examples``)."""
    started = time.perf_counter()
    train(config.replace(steps=3), plan)
    warm = time.perf_counter() - started
    seconds = []
    for n in (steps, 2 * steps):
        started = time.perf_counter()
        train(config.replace(steps=n), plan)
        seconds.append(time.perf_counter() - started)
    per_step = max(seconds[1] - seconds[0], 1e-3 * seconds[1]) / steps
    fixed = max(0.0, seconds[0] - steps * per_step)
    log.append(f"{config.task} d{config.d_model} {name}: {1000 * per_step:.2f} ms/step, {fixed:.2f} s fixed, "
               f"warm-up {warm:.1f} s (probe of {steps} + {2 * steps} steps)")
    print(log[-1], flush=True)
    return per_step, fixed, warm


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    rows = {}
    dense = results.get("dense")
    for name, result in results.items():
        row = {"accuracy": result["accuracy"], "best_learning_rate": result["best_learning_rate"]}
        if dense is not None and name != "dense":
            row["versus_dense"] = stats.compare(result["per_example"], dense["per_example"]).to_dict()
        rows[name] = row
    order = sorted(rows, key=lambda n: -rows[n]["accuracy"]["value"])
    return {"rows": rows, "ordering": order}


def run_plan(config: TrainConfig, plan: Any, learning_rates: list[float], seeds: list[int]) -> dict[str, Any]:
    """Best learning rate on the first seed, the other seeds at that rate; interval over seeds then examples."""
    picked = sweep(config, plan, learning_rates=learning_rates, seeds=seeds[:1])
    runs = picked.best_runs() + [train(config.replace(learning_rate=picked.best_learning_rate, seed=s), plan)
                                 for s in seeds[1:]]
    accuracy = stats.seed_interval([r.per_example for r in runs])
    # every seed has its own test set (spattn.eval.train: seed 2s+1); concatenated in seed order, the scores of
    # two plans with the same seeds are paired example by example
    per_example = [x for r in runs for x in r.per_example]
    return {"accuracy": accuracy.to_dict(), "best_learning_rate": picked.best_learning_rate,
            "by_learning_rate_seed0": picked.by_learning_rate, "seeds": seeds,
            "runs": [r.to_dict() for r in runs], "per_example": per_example}


def run_task(key: str, config: TrainConfig, plans: Plans, learning_rates: list[float], seeds: list[int],
             share: float, probe_steps: int, clock: TimeBudget, record: dict[str, Any], save, *,
             min_steps: int, gate_length: int, padded: bool) -> None:
    """Gate, probe and train every plan of one task at one step count fitted to ``share`` seconds; results land
    in ``record[key]``. Learned routers come last: they are gated and probed after the other plans trained, and
    trained at the same step count if that still fits (else listed under ``skipped``)."""
    entry: dict[str, Any] = {"config": None, "gate": {}, "results": {}, "ms_per_step": {},
                             "fixed_seconds_per_run": {}, "warmup_seconds": {}, "status": "gating"}
    record[key] = entry
    deadline = clock.spent() + share
    runs_per_plan = len(learning_rates) + len(seeds) - 1
    probe_config = config.replace(test_examples=min(config.test_examples, 256))
    if config.task == "mqar":
        examples = min(config.train_examples, 4 * probe_steps * config.batch_size)
        probe_config = probe_config.replace(train_examples=examples)

    def skip(what: str, why: str) -> None:
        record["skipped"].append(f"{key}/{what}: {why}")
        print(f"skipped {key}/{what}: {why}", flush=True)
        save()

    def ready(name: str, plan: Any, block: int) -> bool:
        """Gate then probe one plan; False when it failed or time ran out."""
        if min(deadline - clock.spent(), clock.left()) < 5:
            skip(name, f"{min(deadline - clock.spent(), clock.left()):.0f} s left for the task")
            return False
        started = time.perf_counter()
        try:
            entry["gate"][name] = {"passed": True, **gate(config.replace(block_size=block), plan, gate_length, padded)}
        except Exception as exc:  # noqa: BLE001 - a failing plan is recorded and not trained
            entry["gate"][name] = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                                   "traceback": traceback.format_exc(limit=4)}
        entry["gate"][name]["seconds"] = time.perf_counter() - started
        g = entry["gate"][name]
        print(f"gate {key}/{name}: {'ok' if g['passed'] else g['error']} ({g['seconds']:.1f} s)", flush=True)
        save()
        if not g["passed"]:
            return False
        try:
            per_step, fixed, warm = probe(probe_config.replace(block_size=block), name, plan, probe_steps,
                                          record["log"])
        except Exception as exc:  # noqa: BLE001
            skip(name, f"probe failed: {type(exc).__name__}: {exc}")
            return False
        entry["ms_per_step"][name], entry["fixed_seconds_per_run"][name] = 1000 * per_step, fixed
        entry["warmup_seconds"][name] = warm
        save()
        return True

    def run_cost(name: str, steps: int) -> float:
        # a run's fixed cost plus its steps; the full test set: forward passes, ~half a step per batch
        per_step, fixed = entry["ms_per_step"][name] / 1000, entry["fixed_seconds_per_run"][name]
        return (fixed + per_step * (steps + config.test_examples / config.batch_size / 2)) * runs_per_plan

    def fit(name: str, plan: Any, block: int, steps: int) -> None:
        started = time.perf_counter()
        try:
            entry["results"][name] = run_plan(config.replace(block_size=block), plan, learning_rates, seeds)
        except Exception as exc:  # noqa: BLE001 - keep what was measured
            entry["results"][name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(entry["results"][name]["traceback"], flush=True)
            save()
            return
        entry["results"][name]["seconds"] = time.perf_counter() - started
        entry["summary"] = summarise({n: r for n, r in entry["results"].items() if "accuracy" in r})
        a = entry["results"][name]["accuracy"]
        print(f"  {key} {name}: {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] "
              f"(lr {entry['results'][name]['best_learning_rate']:g}, {time.perf_counter() - started:.0f} s)",
              flush=True)
        save()

    core = {n: p for n, p in plans.items() if not isinstance(p[0], Learned)}
    late = {n: p for n, p in plans.items() if isinstance(p[0], Learned)}
    ok = [name for name, (plan, block) in core.items() if ready(name, plan, block)]
    if not ok:
        entry["status"] = "nothing passed the gate and the probe"
        save()
        return
    # the learned routers' share, guessed before they are probed: 2.5x the mean step, 15 s of compilation each
    mean_step = sum(entry["ms_per_step"][n] for n in ok) / 1000 / len(ok)
    late_fixed = 15.0 * len(late)
    per_step_all = sum(entry["ms_per_step"][n] / 1000 for n in ok) + 2.5 * mean_step * len(late)
    fixed_all = sum(run_cost(n, 0) for n in ok)
    margin = 1.1
    left = deadline - clock.spent()
    steps = int((left / margin - fixed_all - late_fixed) / (per_step_all * runs_per_plan))
    steps = min(steps, config.steps)
    if steps < min_steps:
        entry["status"] = f"skipped: {left:.0f} s left for the task fits {steps} steps (< {min_steps})"
        record["skipped"].append(f"{key}: {entry['status']} (not trained: {', '.join(plans)})")
        save()
        return
    config = config.replace(steps=steps, train_examples=min(config.train_examples, steps * config.batch_size))
    entry.update(config=config.to_dict(), steps=steps, status="training")
    record["log"].append(f"{key}: {len(ok)} + {len(late)} plans x {runs_per_plan} runs of {steps} steps "
                         f"(batch {config.batch_size})")
    print(record["log"][-1], flush=True)
    save()
    for name in ok:
        need = run_cost(name, steps)
        if need > clock.left():
            skip(name, f"needs ~{need:.0f} s, {clock.left():.0f} s left")
            continue
        fit(name, *core[name], steps)
    for name, (plan, block) in late.items():
        if not ready(name, plan, block):
            continue
        need = run_cost(name, steps)
        if need > min(clock.left(), deadline - clock.spent() + 10):
            skip(name, f"needs ~{need:.0f} s for {steps} steps, {deadline - clock.spent():.0f} s left of the share")
            continue
        fit(name, plan, block, steps)
    entry["status"] = "done"
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="spattn backend (default: auto on CUDA, reference on CPU)")
    parser.add_argument("--time-budget", type=float, default=165.0, help="seconds for the whole script")
    parser.add_argument("--mqar-share", type=float, default=0.62, help="share of the time left for MQAR")
    parser.add_argument("--mqar-widths", default="64")
    parser.add_argument("--mqar-kv-pairs", type=int, default=8, help="Zoology: 16 at length 256")
    parser.add_argument("--mqar-vocab", type=int, default=4096, help="Zoology: 8192")
    parser.add_argument("--mqar-steps", type=int, default=4000, help="most steps per MQAR run")
    parser.add_argument("--mqar-learning-rates", default="0.003")
    parser.add_argument("--listops-learning-rates", default="0.0005")
    parser.add_argument("--listops-train-examples", type=int, default=1024)
    parser.add_argument("--listops-test-examples", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="training seeds (the learning rate is picked on the first)")
    parser.add_argument("--listops-seeds", default="0")
    parser.add_argument("--skip-listops", action="store_true")
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision (high: TF32 matmuls on the H200)")
    parser.add_argument("--quick", action="store_true", help="tiny configurations (a CPU smoke run)")
    parser.add_argument("--out", default="eval_synthetic.json")
    args = parser.parse_args()
    clock = TimeBudget(args.time_budget)
    torch.set_float32_matmul_precision(args.matmul_precision)
    backend = args.backend or ("auto" if args.device.startswith("cuda") else "reference")
    seeds = [int(s) for s in args.seeds.split(",")]
    listops_seeds = [int(s) for s in args.listops_seeds.split(",")]
    machine = machine_info()
    record: dict[str, Any] = {
        "benchmark": "eval_synthetic", "machine": machine, "versions": {"spattn": spattn.__version__, **versions()},
        "commit": machine.get("git_commit"), "command": machine.get("command"), "backend": backend,
        "device": args.device, "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "quick": args.quick, "time_budget": args.time_budget, "matmul_precision": args.matmul_precision,
        "triton_autotune": os.environ.get("SPATTN_TRITON_AUTOTUNE", "1"), "skipped": [], "log": [],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save() -> None:
        record["seconds"] = clock.spent()
        with open(args.out + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(args.out + ".tmp", args.out)

    save()
    total = clock.left()
    widths = [int(w) for w in args.mqar_widths.split(",")]
    mqar_rates = [float(x) for x in args.mqar_learning_rates.split(",")]
    mqar_task = {"seq_len": 256, "num_kv_pairs": args.mqar_kv_pairs, "vocab_size": args.mqar_vocab}
    mqar_until = clock.spent() + (clock.left() if args.skip_listops else total * args.mqar_share)
    for n, width in enumerate(widths):
        share = (mqar_until - clock.spent()) / (len(widths) - n)
        if args.quick:
            config = mqar_config("tiny", d_model=width, steps=40)
        else:
            config = mqar_config(d_model=width, task_options=mqar_task, steps=args.mqar_steps)
        config = config.replace(device=args.device, backend=backend)
        try:
            run_task(f"mqar_d{width}", config, mqar_plans(), mqar_rates, seeds, share, 3 if args.quick else 10,
                     clock, record, save, min_steps=5 if args.quick else 50,
                     gate_length=config.task_options["seq_len"], padded=False)
        except Exception as exc:  # noqa: BLE001 - keep what was measured
            record[f"mqar_d{width}"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(record[f"mqar_d{width}"]["traceback"], flush=True)
            save()
    if args.skip_listops:
        record["skipped"].append("listops: --skip-listops")
    else:
        if args.quick:
            config = listops_config("tiny", steps=20)
        else:
            config = listops_config(train_examples=args.listops_train_examples,
                                    test_examples=args.listops_test_examples)
        config = config.replace(device=args.device, backend=backend)
        try:
            run_task("listops", config, listops_plans(), [float(x) for x in args.listops_learning_rates.split(",")],
                     listops_seeds, clock.left() - 3, 2 if args.quick else 3, clock, record, save,
                     min_steps=5 if args.quick else 10, gate_length=64 if args.quick else 1024, padded=True)
        except Exception as exc:  # noqa: BLE001
            record["listops"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(record["listops"]["traceback"], flush=True)
    save()
    for key in [k for k in record if k.startswith(("mqar_", "listops"))]:
        block = record[key]
        if "summary" not in block:
            continue
        print(f"\n{key} ({block['steps']} steps): accuracy [95% interval], vs dense")
        for name in block["summary"]["ordering"]:
            row = block["summary"]["rows"][name]
            a, v = row["accuracy"], row.get("versus_dense")
            print(f"  {name:24s} {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}]"
                  + ("" if v is None else f"  {v['winner']} ({v['difference']:+.3f})"))
    if record["skipped"]:
        print("skipped:", *record["skipped"], sep="\n  ")
    print(f"\nwrote {args.out} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
