"""Synthetic long-range tasks trained from scratch with spattn attention inside: MQAR and ListOps (issues 13, 14).

Two commands for one H200 (nothing here is a latency measurement, but every process sharing the GPU slows the
steps, and with them what the runs learn in their budget: run them alone):

    PYTHONPATH=src python benchmarks/eval_synthetic.py mqar --time-budget 460 --out $OUT/eval_mqar.json
    # the focused MQAR run of session 7 (d64, one rate, one seed, the plans in order of importance):
    PLANS=dense,window64,window32+topk_pooled1,window32+learned1,sinks32+window32@prefix32,dense@prefix32,hierarchical
    PYTHONPATH=src python benchmarks/eval_synthetic.py mqar --widths 64 --learning-rates d64:0.003 --seeds 0 \
        --plans $PLANS --steps 6000 --min-steps 4000 --graph-checks window32+learned1 --time-budget 315 \
        --out $OUT/eval_mqar.json
    PYTHONPATH=src python benchmarks/eval_synthetic.py listops --time-budget 430 --out $OUT/eval_listops.json
    PYTHONPATH=src python benchmarks/eval_synthetic.py mqar --quick --device cpu --out /tmp/q.json   # CPU smoke

Every (width, plan, learning rate, seed) is one job, run as its own subprocess, ``--workers`` at a time (default
1). Each writes its own JSON as soon as it finishes, and the parent merges them into ``--out`` after every
finished job, so a killed run keeps every finished job. Session 5 on one H200 without MPS showed that running
jobs at once gains nothing: 2 MQAR processes each ran at ~10.7 ms/step where one alone ran at 5.4, and 34
processes (28 MQAR and 6 ListOps) each ran ~25x slower. The GPU time-slices between processes. More steps per
second would need fewer kernel launches per step (CUDA graphs, or several plans batched in one model) in one
process.

1. Gate (seconds): one sparse plan (MQAR ``Window(32) | TopK("pooled", 1)``; ListOps ``Window(64, 64) |
   TopK("pooled", 2)`` with padding), at one small batch of the training shape and dtype, forward and the
   gradients of query, key and value against the float64 dense oracle on the layout's token mask
   (``spattn.testing``: ``err <= 2 * err(same-dtype dense) + eps``). Every plan runs the same kernels (layouts
   are walked by their tables), so the gate compiles what the jobs reuse (the triton cache is on disk). A
   failing gate stops the script before any training.
2. MQAR (Zoology): sequences of 256, ``--kv-pairs`` pairs (Zoology 16), vocabulary ``--vocab`` (Zoology 8192),
   2 layers, one head, no MLP, learned positions, d_model ``--widths`` (64, 128), batch 256, 100 000 training
   examples, 3000 test, AdamW, warm-up 10% then cosine. Plans: dense; Window(32), Window(64), Window(128);
   Sinks(2 * pairs) | Window(64 - 2 * pairs) (the pairs kept, 64 keys: a task artefact, Zoology's pairs being
   the first tokens; a plan name may end in ``@prefixN``, the same plan on MQAR with ``N`` filler tokens
   before the pairs, ``spattn.eval.tasks.mqar(prefix_length=N)``, which removes it);
   dynamic selection Window(32) | TopK("pooled", 1) at block 32 (about 64
   keys, the window-64 budget); learned Window(32) + 1 routed block of 32 (``spattn.learned.LearnedTopK``,
   the same budget, trained with the model, straight-through). Causal.
3. ListOps (LRA): 4 layers, 512 wide, 8 heads, MLP, 500-2000 tokens, bfloat16 autocast. Plans: dense;
   local (non-overlapping 128-token chunks); Window(128, 128); BigBird-style Global(first 64) | Window(96, 96)
   | RandomBlocks(2); dynamic Window(64, 64) | TopK("pooled", 2); learned Window(64, 64) + 2 routed blocks.
   Bidirectional, padding masked. The data is generated once by the parent (``--data-workers`` processes,
   chunk ``k`` of the training set from seed ``1_000_000 * 2 * seed + k``, of the test set from
   ``1_000_000 * (2 * seed + 1) + k``).

Steps: jobs run most important first (the first seed; in it the first width, then its learning rates, the
plans in ``--plans`` order; further seeds only at the best rate of their plan). Each job gets at least
``--min-steps`` steps or is skipped (``allot``): it may use all the time left but the estimated minimums of the
later jobs, and stops at its ``--steps`` or where ``spattn.eval.train.train(time_limit=...)`` sees its time
run out. Session 7's first H200 run split 455 s fairly over 64 jobs: 19 s each, d64 dense and top-k skipped,
the learned router never trained; now a grid too large for the budget loses whole jobs (the least important),
listed under ``skipped`` with the reason, and the summary marks a run that still ended below its minimum
(``below_min_steps``: a slower pace than estimated). The JSON holds the steps each run made. Every accuracy
carries a bootstrap interval (over seeds, then test examples); ``versus_dense`` is the paired bootstrap over
the same test examples (against dense on the same task variant), a tie when its interval
holds 0. The best learning rate per plan is picked by mean accuracy (Zoology's protocol).

Writes JSON: card, versions (torch, triton, transformers), git commit, command, the gate with its seconds, the
per-run results (config, steps, losses, seconds, accuracy), the summary per task and width, skipped items.
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import argparse
import json
import multiprocessing
import signal
import subprocess
import tempfile
import time
import traceback
from typing import Any

import torch

import spattn
from spattn.bench.env import machine_info, versions
from spattn.bench.timing import TimeBudget
from spattn.eval import stats
from spattn.eval.tasks import listops
from spattn.eval.train import Learned, TrainConfig, build_model, check_graph, listops_config, mqar_config, train
from spattn.testing import assert_within, dense_attention, max_err, plain_attention

Plans = dict[str, tuple[Any, int]]  # name -> (pattern / Learned / None, block size)


def mqar_plans(kv_pairs: int = 16, block: int = 32) -> Plans:
    """name -> (pattern / Learned / None, block size), most important first. The sinks cover the key-value
    pairs (``2 * kv_pairs`` tokens at the start), the window the rest of a 64-key budget. The dynamic, learned
    and hierarchical plans spend the window-64 budget as a 32-key window plus one chosen key block of 32:
    top-k by pooled scores, a learned router (issue 14), and NSA-style hierarchical attention (issue 15: the
    query's own block and one block chosen from the compressed scores, a 32-key window, compressed tokens of 16
    keys; learned gates and pooling)."""
    sinks = min(2 * kv_pairs, 48)
    return {
        "dense": (None, block),
        "window64": (spattn.Window(64), block),
        "window32+topk_pooled1": (spattn.Window(32) | spattn.TopK("pooled", 1), block),
        "window32+learned1": (Learned(1, safeguard=spattn.Window(32)), block),
        "hierarchical": (spattn.Hierarchical(compress_block=16, compress_stride=16, select_block=block,
                                             select_count=2, window=32, pooling="learned"), block),
        f"sinks{sinks}+window{64 - sinks}": (spattn.Sinks(sinks) | spattn.Window(64 - sinks), block),
        "window32": (spattn.Window(32), block),
        "window128": (spattn.Window(128), block),
    }


def listops_plans() -> Plans:
    return {
        "dense": (None, 64),
        # (i // 128 - j // 128) % 100000 == 0: the same 128-token chunk at these lengths (LRA's local attention)
        "local128": (spattn.Strided(100_000, block=128), 64),
        "window128": (spattn.Window(128, 128), 64),
        "bigbird": (spattn.Global(tuple(range(64))) | spattn.Window(96, 96) | spattn.RandomBlocks(2, block=64), 64),
        "window64+topk_pooled2": (spattn.Window(64, 64) | spattn.TopK("pooled", 2), 64),
        "window64+learned2": (Learned(2, safeguard=spattn.Window(64, 64)), 64),
    }


def step_cost(plan: Any, recorded: bool = True) -> float:
    """Prior step time of a plan in milliseconds (MQAR d64 on the H200), for time shares until a run of it has
    measured its own. Recorded in a CUDA graph (session 7, chain A, ded742c): windows and sinks + window
    3.5-4.5 ms; hierarchical 10 (hier6's estimate at block 32, 6-12 ms; chain A's 102.8 was its recording
    check's 8-step average, warm-up included); dense, dynamic top-k and the learned router are guesses
    (dense ~1.4x a window, as at d128: 10.2 against 7.3 ms). Eager (session 5): dense 5.4,
    windows 5.6-6.6, Window(32) | TopK 13.2, learned 34.6 (then compiling its layout at every step; now
    merged on the device: a guess of 20)."""
    if isinstance(plan, Learned):
        return 12.0 if recorded else 20.0
    if isinstance(plan, spattn.Hierarchical):
        return 10.0 if recorded else 150.0
    if plan is None:
        return 5.5
    if plan.contains_dynamic():
        return 8.0 if recorded else 13.2
    return 4.0 if recorded else 6.0


def jit_seconds(plan: Any) -> float:
    """Seconds of triton JIT a plan's first run adds beyond the kernels the gate compiles: hierarchical attention
    has its own (chain A: ~65 s of its recording check's eager steps); every other plan runs the gate's kernels
    (the learned router's wider heads are compiled by its recording check, then read from the disk cache)."""
    return 70.0 if isinstance(plan, spattn.Hierarchical) else 0.0


VARIANT_SEPARATOR = "@"


def split_variant(name: str) -> tuple[str, dict[str, Any]]:
    """A plan name with an optional task variant, ``"sinks32+window32@prefix32"``: the plan and the MQAR
    options that change (``prefixN``: ``N`` random filler tokens before the pairs, ``spattn.eval.tasks.mqar``'s
    ``prefix_length``, which takes the pairs out of reach of sinks over the first tokens)."""
    base, _, variant = name.partition(VARIANT_SEPARATOR)
    if not variant:
        return base, {}
    if variant.startswith("prefix") and variant[len("prefix"):].isdigit():
        return base, {"prefix_length": int(variant[len("prefix"):])}
    raise ValueError(f"plan {name!r}: unknown task variant {variant!r} (known: prefixN, e.g. @prefix32)")


def plans_of(options: dict[str, Any]) -> Plans:
    """The plans of a task (MQAR's sinks follow its key-value pairs)."""
    if options["task"] == "listops":
        return listops_plans()
    return mqar_plans(3 if options["quick"] else options["kv_pairs"], 16 if options["quick"] else 32)


def plan_of(options: dict[str, Any], name: str) -> tuple[Any, int]:
    """(pattern / Learned / None, block size) of a plan name, task variant allowed (``split_variant``)."""
    return plans_of(options)[split_variant(name)[0]]

GATED = {"mqar": "window32+topk_pooled1", "listops": "window64+topk_pooled2"}


def allot(floor: float, later_floors: list[float], left: float) -> float | None:
    """Seconds for the next job, jobs being taken most important first: the ``left`` seconds less the minimums
    (``floor``: the estimated seconds of ``--min-steps``) of the later jobs that still fit after its own, so
    never less than its own minimum; ``None`` when even that does not fit (the job is skipped and the time goes
    to the later ones). The run stops at its ``--steps`` (what it does not use goes to the later jobs) or where
    ``train(time_limit=)`` sees the time run out: a slower pace than estimated eats the slack, not the later
    jobs' minimums. So every run gets at least its minimum steps or does not run at all: no run is cut to a
    share too short to learn."""
    if floor > left:
        return None
    reserve = 0.0
    for later in later_floors:  # in priority order; a later minimum that cannot fit is not kept free
        if floor + reserve + later <= left:
            reserve += later
    return left - reserve


# ---------------------------------------------------------------------------------------------- 1. gate
def gate(config: TrainConfig, plan: Any, batch: int, length: int, padded: bool) -> dict[str, Any]:
    """The attention of one layer of the model trained below, at ``batch`` rows of the training length, head
    size and dtype, built the way the model builds it (``TinyTransformer.layout_for``: cached static layouts,
    the LayoutBuilder, padding removed on the device), forward and the gradients of query, key and value,
    against the float64 dense oracle on the layout's token mask (``spattn.testing``: ``err <= 2 *
    err(same-dtype dense) + eps``). The kernels it compiles are the ones training runs next."""
    torch.manual_seed(0)
    model = build_model(config, plan)
    H, D = config.heads, config.d_model // config.heads
    dtype = torch.bfloat16 if config.precision == "bfloat16" else torch.float32
    packed = torch.randn(batch, length, 3, H, D, device=config.device, dtype=dtype)  # q, k, v as the model has them
    q, k, v = (t.requires_grad_(True) for t in packed.permute(2, 0, 3, 1, 4).unbind(0))
    causal = config.task == "mqar"
    lengths = None
    if padded:  # right padding: rows end inside a block, some blocks wholly padded
        lengths = torch.randint(length // 2, length + 1, (batch,), device=config.device)
        lengths[0] = length
    layout = model.layout_for(0, q.detach(), k.detach(), lengths)
    out = spattn.attention(q, k, v, layout, causal=causal, backend=config.backend)
    allowed = layout.to_dense().to(config.device)
    grad = torch.randn_like(out)
    real = None
    if lengths is not None:  # padded query rows are never read (see spattn.eval.train): compare real rows
        real = (torch.arange(length, device=config.device)[None, :] < lengths[:, None])[:, None, :, None]
        grad = grad * real
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    results: dict[str, Any] = {"shape": [batch, H, length, D], "dtype": str(dtype), "density": layout.density(),
                               "keys_per_query": float(layout.keys_per_query().float().mean())}
    for name, oracle in (("golden", dense_attention), ("baseline", plain_attention)):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        o, _ = oracle(qq, kk, vv, allowed)
        g = torch.autograd.grad(o, (qq, kk, vv), grad.to(o.dtype))
        results[name] = (o, *g)
    golden, baseline = results.pop("golden"), results.pop("baseline")
    for what, fast, gold, base in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), golden, baseline, strict=True):
        if what == "out" and real is not None:
            fast, gold, base = fast * real, gold * real.to(gold.dtype), base * real.to(base.dtype)
        assert_within(fast, gold, base, k=2.0, eps=1e-4, what=what)
        results[f"err_{what}"] = max_err(fast, gold)
        results[f"baseline_err_{what}"] = max_err(base, gold)
    return results


# ---------------------------------------------------------------------------------------------- configs, data
def task_config(options: dict[str, Any], width: int, plan: str | None = None) -> TrainConfig:
    """The TrainConfig of one job (``options``: the parent's arguments that shape the runs; ``plan``: its plan
    name, whose task variant changes the MQAR options)."""
    device, backend = options["device"], options["backend"]
    if options["task"] == "mqar":
        if options["quick"]:
            config = mqar_config("tiny", d_model=width)
        else:
            config = mqar_config(d_model=width, task_options={"seq_len": options["seq_len"],
                                                              "num_kv_pairs": options["kv_pairs"],
                                                              "vocab_size": options["vocab"]})
        changes: dict[str, Any] = {"batch_size": options["batch_size"] or config.batch_size}
    else:
        config = listops_config("tiny") if options["quick"] else listops_config()
        changes = {"precision": options["precision"], "batch_size": options["batch_size"] or config.batch_size}
    variant = split_variant(plan)[1] if plan else {}
    if variant:
        if options["task"] != "mqar":
            raise ValueError(f"plan {plan!r}: task variants are MQAR options")
        changes["task_options"] = {**config.task_options, **variant}
    if options["train_examples"]:
        changes["train_examples"] = options["train_examples"]
    if options["test_examples"]:
        changes["test_examples"] = options["test_examples"]
    for name in ("warmup", "weight_decay", "init_std", "tie_embeddings", "clip_grad"):  # recipe overrides
        if options.get(name) is not None:  # None: the preset's; init_std / clip_grad 0: PyTorch's init / none
            changes[name] = (options[name] or None) if name in ("init_std", "clip_grad") else options[name]
    return config.replace(steps=options["steps"], device=device, backend=backend, **changes)


def _listops_chunk(job: tuple[int, int, dict]) -> tuple[torch.Tensor, torch.Tensor]:
    count, seed, task_options = job
    x, y = listops(count, seed=seed, **task_options)
    return x.to(torch.int16), y


def listops_data(config: TrainConfig, seed: int, processes: int, path: str) -> str:
    """Generate the ListOps train and test sets of ``seed`` in ``processes`` processes (chunks of at most 500
    examples, chunk ``k`` from seed ``1_000_000 * (2 * seed) + k`` / ``1_000_000 * (2 * seed + 1) + k``) and save
    them to ``path`` (int16 inputs, loaded with ``weights_only=True``)."""
    parts = {}
    with multiprocessing.get_context("fork").Pool(processes, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for name, examples, base in (("train", config.train_examples, 2 * seed),
                                     ("test", config.test_examples, 2 * seed + 1)):
            sizes = [min(500, examples - start) for start in range(0, examples, 500)]
            chunks = pool.map(_listops_chunk, [(n, 1_000_000 * base + k, config.task_options)
                                               for k, n in enumerate(sizes)])
            width = max(x.shape[1] for x, _ in chunks)
            parts[f"{name}_inputs"] = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]))
                                                 for x, _ in chunks])
            parts[f"{name}_labels"] = torch.cat([y for _, y in chunks])
    torch.save(parts, path)
    return path


# ---------------------------------------------------------------------------------------------- a job
def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in this process: the record (the result, or the error). ``job["graph"]`` False trains
    eagerly (``job["graph_reason"]`` says why: an earlier recording of the plan failed or disagreed)."""
    started = time.time()
    record: dict[str, Any] = {"job": {k: v for k, v in job.items() if k != "options"}}
    try:
        torch.set_float32_matmul_precision(job["options"]["matmul_precision"])
        plan, block = plan_of(job["options"], job["plan"])
        config = task_config(job["options"], job["width"], job["plan"]).replace(
            block_size=block, learning_rate=job["learning_rate"], seed=job["seed"],
            cuda_graph=bool(job.get("graph", True)))
        data = None
        if job.get("data"):
            saved = torch.load(job["data"], weights_only=True)
            data = (saved["train_inputs"].long(), saved["train_labels"], saved["test_inputs"].long(),
                    saved["test_labels"])
        time_limit = job["deadline"] - time.time()
        result = train(config, plan, data=data, time_limit=time_limit)
        record["result"] = result.to_dict(per_example=True)
        record["steps"] = result.config["steps"]
        record["steps_asked"] = config.steps
        record["ms_per_step"] = result.ms_per_step  # the step loop only (no data, model, test)
        record["graph"] = dict(result.graph, **({"skipped_because": job["graph_reason"]}
                                                if job.get("graph_reason") else {}))
    except Exception as exc:  # noqa: BLE001 - the parent records it
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        print(record["traceback"], flush=True)
    record["wall_seconds"] = time.time() - started
    return record


def run_job(job: dict[str, Any]) -> None:
    """One training run (a subprocess of the parent, ``--workers`` > 1); writes ``job["out"]``."""
    record = train_job(job)
    with open(job["out"] + ".tmp", "w") as handle:
        json.dump(record, handle)
    os.replace(job["out"] + ".tmp", job["out"])


def run_graph_checks(spec: dict[str, Any]) -> None:
    """The child process of the recording checks: :func:`spattn.eval.train.check_graph` (8 steps eager, 8
    recorded, the losses compared) for every plan in ``spec["plans"]`` in order, at the first width and rate;
    ``spec["out"]`` is rewritten after every plan (a crash keeps the plans before it)."""
    options = spec["options"]
    torch.set_float32_matmul_precision(options["matmul_precision"])
    results: dict[str, Any] = {}
    for name in spec["plans"]:
        plan, block = plan_of(options, name)
        config = task_config(options, spec["width"], name).replace(block_size=block,
                                                                    learning_rate=spec["learning_rate"])
        try:
            results[name] = check_graph(config, plan, steps=8)
        except Exception as exc:  # noqa: BLE001 - recorded; this plan trains eagerly
            results[name] = {"captured": False, "passed": False, "reason": f"{type(exc).__name__}: {exc}"[:600],
                             "traceback": traceback.format_exc(limit=4)}
        print(f"graph check {name}: {'passed' if results[name]['passed'] else 'failed'} "
              f"({results[name].get('seconds', 0):.1f} s)", flush=True)
        with open(spec["out"] + ".tmp", "w") as handle:
            json.dump(results, handle)
        os.replace(spec["out"] + ".tmp", spec["out"])


# ---------------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per width: per plan the best learning rate (mean accuracy over seeds), its accuracy with the two-level
    interval, the steps made, and the paired comparison with dense at dense's best rate (same seeds, same test
    examples); the ordering by accuracy."""
    out: dict[str, Any] = {}
    done = [r for r in runs if "result" in r]
    for width in sorted({r["job"]["width"] for r in done}):
        plans: dict[str, dict[float, list[dict]]] = {}
        for r in done:
            if r["job"]["width"] == width:
                plans.setdefault(r["job"]["plan"], {}).setdefault(r["job"]["learning_rate"], []).append(r)
        rows: dict[str, Any] = {}
        best_runs: dict[str, list[dict]] = {}
        for name, by_rate in plans.items():
            scored = {}
            for rate, group in by_rate.items():
                group.sort(key=lambda r: r["job"]["seed"])
                scored[rate] = stats.seed_interval([g["result"]["per_example"] for g in group])
            # the best rate by the seeds every rate ran (further seeds run at the best rate only), then its
            # interval over all its seeds
            common = set.intersection(*({g["job"]["seed"] for g in group} for group in by_rate.values()))

            def chosen_by(rate: float, common: set = common, by_rate: dict = by_rate) -> float:
                runs = [g for g in by_rate[rate] if g["job"]["seed"] in common]
                return sum(g["result"]["accuracy"]["value"] for g in runs) / max(1, len(runs))

            best = max(scored, key=chosen_by)
            best_runs[name] = by_rate[best]
            rows[name] = {
                "accuracy": scored[best].to_dict(), "best_learning_rate": best,
                "by_learning_rate": {repr(rate): e.to_dict() for rate, e in scored.items()},
                "seeds": [g["job"]["seed"] for g in by_rate[best]],
                "steps": [g["steps"] for g in by_rate[best]],
                "final_loss": [g["result"]["losses"][-1] if g["result"]["losses"] else None for g in by_rate[best]],
                "ms_per_step": [g.get("ms_per_step") for g in by_rate[best]],
                "recorded": [bool(g.get("graph", {}).get("captured")) for g in by_rate[best]],
                "below_min_steps": any(g["steps"] < g["job"].get("min_steps", 0) for g in by_rate[best]),
            }
        for name, group in best_runs.items():
            # paired over the same test examples: against dense on the same task variant only
            _, variant = split_variant(name)
            reference = "dense" + name[len(name.partition(VARIANT_SEPARATOR)[0]):]
            if variant:
                rows[name]["task_variant"] = variant
            if name == reference or reference not in best_runs:
                continue
            dense = {g["job"]["seed"]: g["result"]["per_example"] for g in best_runs[reference]}
            seeds = [g["job"]["seed"] for g in group if g["job"]["seed"] in dense]
            if not seeds:
                continue
            mine = {g["job"]["seed"]: g["result"]["per_example"] for g in group}
            rows[name]["versus_dense"] = stats.compare([x for s in seeds for x in mine[s]],
                                                       [x for s in seeds for x in dense[s]]).to_dict()
        out[f"d{width}"] = {"rows": rows, "ordering": sorted(rows, key=lambda n: -rows[n]["accuracy"]["value"])}
    return out


# ---------------------------------------------------------------------------------------------- the parent
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("mqar", "listops"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="spattn backend (default: auto on CUDA, reference on CPU)")
    parser.add_argument("--time-budget", type=float, default=470.0, help="seconds for the whole script")
    parser.add_argument("--workers", type=int, default=1,
                        help="jobs trained at once (default 1: on one H200 without MPS, 2 processes made no more "
                             "steps per second than 1, and 34 made each ~25x slower)")
    parser.add_argument("--widths", default=None, help="MQAR d_model values (default 64,128; ListOps: 512)")
    parser.add_argument("--plans", default=None, help="comma-separated plan names (default: all)")
    parser.add_argument("--learning-rates", default=None,
                        help="MQAR default 0.003,0.01 (d64) and 0.002,0.006 (d128) as 'd64:...;d128:...'; "
                             "ListOps default 0.0005")
    parser.add_argument("--seeds", default=None,
                        help="training seeds (default MQAR 0,1, ListOps 0); every plan x rate runs the first seed, "
                             "further seeds run each plan at its best rate, in the time the first seed leaves")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (MQAR 8000, ListOps 5000), cut "
                                                                "to what fits the budget")
    parser.add_argument("--seq-len", type=int, default=256, help="MQAR sequence length (Zoology: 256)")
    parser.add_argument("--kv-pairs", type=int, default=16, help="MQAR pairs (Zoology: 16 at length 256)")
    parser.add_argument("--vocab", type=int, default=8192, help="MQAR vocabulary (Zoology: 8192)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: MQAR 256, ListOps 32")
    parser.add_argument("--train-examples", type=int, default=None, help="default: MQAR 100000, ListOps 24000")
    parser.add_argument("--test-examples", type=int, default=None, help="default: MQAR 3000, ListOps 1000")
    parser.add_argument("--precision", default="bfloat16", choices=("float32", "bfloat16"),
                        help="ListOps autocast (MQAR trains in float32)")
    parser.add_argument("--data-workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--matmul-precision", default="high", choices=("highest", "high", "medium"),
                        help="torch.set_float32_matmul_precision (high: TF32 matmuls on the H200)")
    parser.add_argument("--quick", action="store_true", help="tiny configurations (a CPU smoke run)")
    parser.add_argument("--warmup", type=float, default=None, help="warm-up fraction (default: the preset's)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: preset's)")
    parser.add_argument("--init-std", type=float, default=None,
                        help="normal initialisation std (0: PyTorch's; default: the preset's)")
    parser.add_argument("--tie-embeddings", default=None, action=argparse.BooleanOptionalAction,
                        help="MQAR head tied to the token embedding (default: the preset's)")
    parser.add_argument("--clip-grad", type=float, default=None, help="gradient clipping norm (0: none)")
    parser.add_argument("--min-steps", type=int, default=None,
                        help="a run gets at least this many steps or is skipped (default: half of --steps)")
    parser.add_argument("--graph-checks", default="all",
                        help="plans whose CUDA-graph recording is checked against eager training before the runs "
                             "(8 steps each, in a child process): 'all' (default: every plan), 'none', or names; "
                             "unchecked plans record in their own runs and fall back to eager if that fails")
    parser.add_argument("--no-graph", action="store_true",
                        help="train every MQAR run eagerly (default on CUDA: the step recorded in a CUDA graph)")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job
    parser.add_argument("--graph-checks-spec", default=None, help=argparse.SUPPRESS)  # internal: the checks' child
    parser.add_argument("--out", default="eval_synthetic.json")
    args = parser.parse_args()
    clock = TimeBudget(args.time_budget)
    deadline = time.time() + args.time_budget - 6  # the parent's merge and summary after the last job
    torch.set_float32_matmul_precision(args.matmul_precision)
    backend = args.backend or ("auto" if args.device.startswith("cuda") else "reference")
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.task == "mqar" else "0")).split(",")]
    task = args.task
    widths = [int(w) for w in (args.widths or ("64,128" if task == "mqar" else "512")).split(",")]
    if task == "listops" and args.quick:
        widths = [32]
    if task == "mqar" and args.quick:
        widths = [32] if args.widths is None else widths
    rates: dict[int, list[float]] = {}
    spec = args.learning_rates or ("d64:0.003,0.01;d128:0.002,0.006" if task == "mqar" else "0.0005")
    for part in spec.split(";"):
        if ":" in part:
            name, values = part.split(":")
            rates[int(name.lstrip("d"))] = [float(x) for x in values.split(",")]
        else:
            for width in widths:
                rates[width] = [float(x) for x in part.split(",")]
    for width in widths:
        rates.setdefault(width, rates.get(64) or next(iter(rates.values())))
    steps = args.steps or ((200 if task == "mqar" else 20) if args.quick else (8000 if task == "mqar" else 5000))
    options = {
        "task": task, "device": args.device, "backend": backend, "quick": args.quick, "seq_len": args.seq_len,
        "kv_pairs": args.kv_pairs,
        "vocab": args.vocab, "batch_size": args.batch_size, "steps": steps, "precision": args.precision,
        "train_examples": args.train_examples or (None if task == "mqar" or args.quick else 24_000),
        "test_examples": args.test_examples, "matmul_precision": args.matmul_precision,
        "warmup": args.warmup, "weight_decay": args.weight_decay,
        "init_std": args.init_std, "tie_embeddings": args.tie_embeddings, "clip_grad": args.clip_grad,
    }
    plans = plans_of(options)
    chosen = list(plans) if args.plans is None else args.plans.split(",")
    unknown = [p for p in chosen if split_variant(p)[0] not in plans]
    if unknown:
        parser.error(f"--plans: unknown {unknown}; known: {list(plans)} (a task variant may follow: @prefix32)")
    for name in chosen:
        try:
            if split_variant(name)[1] and task != "mqar":
                parser.error(f"--plans: {name!r}: task variants are MQAR options")
        except ValueError as exc:
            parser.error(f"--plans: {exc}")
    if args.graph_checks in ("all", None):
        checked = list(chosen)
    elif args.graph_checks == "none":
        checked = []
    else:
        checked = args.graph_checks.split(",")
        if [p for p in checked if p not in chosen]:
            parser.error(f"--graph-checks: {[p for p in checked if p not in chosen]} are not in --plans {chosen}")
    min_steps = steps // 2 if args.min_steps is None else min(args.min_steps, steps)
    scratch = tempfile.mkdtemp(prefix="eval_synthetic_")
    data_paths: dict[int, str] = {}
    data_seconds = None
    if task == "listops":  # generated once, before CUDA is touched (the pool forks)
        since = time.perf_counter()
        for seed in seeds:
            data_paths[seed] = listops_data(task_config(options, widths[0]), seed, args.data_workers,
                                            os.path.join(scratch, f"listops_seed{seed}.pt"))
        data_seconds = round(time.perf_counter() - since, 2)
        print(f"[{clock.spent():6.1f} s] data: {data_seconds:.1f} s", flush=True)
    machine = machine_info(args.device)
    record: dict[str, Any] = {
        "benchmark": f"eval_synthetic_{task}", "machine": machine,
        "versions": {"spattn": spattn.__version__, **versions()}, "commit": machine.get("git_commit"),
        "command": machine.get("command"), "backend": backend, "device": args.device,
        "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu", "quick": args.quick,
        "time_budget": args.time_budget, "options": options, "learning_rates": {f"d{w}": r for w, r in rates.items()},
        "seeds": seeds, "triton_autotune": os.environ.get("SPATTN_TRITON_AUTOTUNE", "1"),
        "plans": chosen, "steps": steps, "min_steps": min_steps, "graph_checked": checked,
        "phases": {}, "gate": {}, "runs": [], "skipped": [], "log": [],
    }
    if task == "mqar" and any(n.startswith("sinks") for n in chosen):
        record["notes"] = [
            "Sinks(2 * pairs) | Window(...) on Zoology's layout is a task artefact: the pairs are the first "
            "2 * pairs tokens, so the sinks see every pair from every query; '@prefixN' variants (N filler tokens "
            "before the pairs, spattn.eval.tasks.mqar(prefix_length=N)) remove it"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    summarised = [0.0]

    def save(summary: bool = True) -> None:
        """Write the JSON; the summary (bootstraps) is recomputed when asked, at most every 20 s while
        training (many runs can end at once near the deadline)."""
        record["seconds"] = clock.spent()
        if summary or clock.spent() - summarised[0] > 20:
            record["summary"] = summarise(record["runs"])
            summarised[0] = clock.spent()
        with open(args.out + ".tmp", "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(args.out + ".tmp", args.out)

    def phase(name: str, since: float) -> None:
        record["phases"][name] = round(time.perf_counter() - since, 2)
        print(f"[{clock.spent():6.1f} s] {name}: {record['phases'][name]:.1f} s", flush=True)
        save()

    if data_seconds is not None:
        record["phases"]["data"] = data_seconds
    save()

    since = time.perf_counter()  # 0. the recording checks (--graph-checks), in a child process
    graph_off: dict[str, str] = {}  # plan -> why its runs train eagerly
    check_width = widths[0]
    # on a CPU nothing can be recorded: the checks run there only with --quick (a dry run of this path)
    use_graphs = task == "mqar" and not args.no_graph and (args.device.startswith("cuda") or args.quick)
    record["graph_checks"] = {}
    if use_graphs and checked:
        spec = {"options": options, "plans": checked, "width": check_width, "learning_rate": rates[check_width][0],
                "out": os.path.join(scratch, "graph_checks.json")}
        with open(spec["out"] + ".spec", "w") as handle:
            json.dump(spec, handle)
        limit = max(30.0, min(180.0, 0.35 * clock.left()))
        try:  # a child: a recording that breaks the CUDA context takes only the child down
            subprocess.run([sys.executable, os.path.abspath(__file__), task, "--graph-checks-spec",
                            spec["out"] + ".spec"], timeout=limit, check=False,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        except subprocess.TimeoutExpired:
            record["log"].append(f"the recording checks ran past {limit:.0f} s and were stopped")
        if os.path.exists(spec["out"]):
            with open(spec["out"]) as handle:
                record["graph_checks"] = json.load(handle)
        for name in checked:
            result = record["graph_checks"].get(name)
            if result is None:
                graph_off[name] = "no recording check result (the check process stopped before this plan)"
            elif not result["passed"]:
                graph_off[name] = (f"the recording check at d{check_width} failed: "
                                   + (result.get("reason") or f"loss difference {result.get('max_loss_difference')}"))
            print(f"graph check {name}: " + (
                f"ok, eager {result['eager_ms_per_step']:.1f} / recorded {result['graph_ms_per_step']:.1f} ms a step "
                f"over 8 steps (eager includes JIT), replay {result.get('replay_ms') or 0:.2f} ms, "
                f"loss difference {result['max_loss_difference']:.1e}"
                if name not in graph_off else f"-> eager: {graph_off[name]}"), flush=True)
        dense_check = record["graph_checks"].get("dense", {})
        if dense_check.get("captured") and not dense_check.get("passed"):  # recorded but wrong: trust none
            for name in chosen:
                graph_off.setdefault(name, "the dense recording disagreed with eager training")
        unchecked = [n for n in chosen if n not in checked]
        if unchecked:  # they record in their own runs (a failed recording falls back to eager, and says why)
            record["log"].append(f"no recording check for {unchecked} (--graph-checks): each run's own recording "
                                 "decides")
        phase("graph_checks", since)
    elif task == "mqar":
        reason = "--no-graph" if args.no_graph else f"device {args.device!r}: CUDA graphs need a CUDA device"
        graph_off.update({name: reason for name in chosen})

    since = time.perf_counter()  # 1. the gate
    gated = GATED[task]
    gate_plan, gate_block = plans[gated]  # the kernels of every plan (layouts are walked by their tables)
    for width in widths if task == "mqar" else widths[:1]:
        config = task_config(options, width).replace(block_size=gate_block)
        length = config.task_options["seq_len"] if task == "mqar" else (64 if args.quick else 1024)
        try:
            record["gate"][f"d{width}"] = {"plan": gated, "passed": True,
                                          **gate(config, gate_plan, 2, length, padded=task == "listops")}
        except Exception as exc:  # noqa: BLE001
            record["gate"][f"d{width}"] = {"plan": gated, "passed": False, "error": f"{type(exc).__name__}: {exc}",
                                          "traceback": traceback.format_exc(limit=4)}
        print(f"gate d{width} {gated}: "
              f"{'ok' if record['gate'][f'd{width}']['passed'] else record['gate'][f'd{width}']['error']}", flush=True)
    phase("gate", since)
    if not all(g["passed"] for g in record["gate"].values()):
        record["skipped"].append("all training: the gate failed")
        save()
        sys.exit(1)

    record["graph_off"] = graph_off

    def best_rate(width: int, name: str) -> float | None:
        """The first seed's best learning rate of a plan at a width (None before any of its runs finished)."""
        done = [r for r in record["runs"] if "result" in r and r["job"]["width"] == width
                and r["job"]["plan"] == name and r["job"]["seed"] == seeds[0]]
        if not done:
            return None
        return max(done, key=lambda r: r["result"]["accuracy"]["value"])["job"]["learning_rate"]

    jobs = []  # most important first: the first seed; in it the first width, its rates, the plans in order
    for seed_index, seed in enumerate(seeds):
        for width in widths:
            for rate_index, rate in enumerate(rates[width]):
                for name in chosen:
                    tag = f"d{width}_{name}_lr{rate:g}_s{seed}"
                    jobs.append({"tag": tag, "width": width, "plan": name, "learning_rate": rate,
                                 "seed": seed, "data": data_paths.get(seed), "deadline": deadline,
                                 "out": os.path.join(scratch, tag + ".json"), "options": options,
                                 "graph": name not in graph_off, "graph_reason": graph_off.get(name),
                                 "priority": (seed_index, rate_index), "min_steps": min_steps})
    workers = max(1, args.workers)
    record["log"].append(f"{len(jobs)} jobs, {workers} at a time "
                         f"({'in this process' if workers == 1 else 'subprocesses'}), {steps} steps each at most, "
                         f"{min_steps} at least (or skipped)")
    print(record["log"][-1], flush=True)
    measured: dict[str, float] = {}  # plan -> ms per step of its last finished run

    recorded_on = {name: name not in graph_off for name in chosen}

    def estimate(job: dict[str, Any], count: int | None = None) -> float:
        """Seconds a job needs for ``count`` steps (default ``--steps``): its plan's step time (its last run's,
        else the prior scaled by how the measured plans compared with theirs: another width or device) plus
        ~3 s of model, data and test. A recording check's replay pace stands in for a run of its own (not its
        ``graph_ms_per_step``: an average over 8 steps, 3 of them eager warm-up)."""
        ms = measured.get(job["plan"])
        if not ms and job["graph"]:
            ms = record["graph_checks"].get(job["plan"], {}).get("replay_ms")
        if not ms:
            ratios = sorted(m / step_cost(plan_of(options, name)[0], recorded_on.get(name, False))
                            for name, m in measured.items())
            ms = (step_cost(plan_of(options, job["plan"])[0], job["graph"])
                  * (ratios[len(ratios) // 2] if ratios else 1.0))
        jit = 0.0 if any(r["job"]["plan"] == job["plan"] for r in record["runs"]) else \
            jit_seconds(plan_of(options, job["plan"])[0])
        return (steps if count is None else count) * ms / 1000 + 3.0 + jit

    def finished(tag: str, result: dict[str, Any]) -> None:
        record["runs"].append(result)
        if "result" in result:
            a = result["result"]["accuracy"]
            if result.get("ms_per_step"):
                measured[result["job"]["plan"]] = result["ms_per_step"]
            graph = result.get("graph", {})
            how = ("recorded" if graph.get("captured")
                   else f"eager ({graph.get('skipped_because') or graph.get('reason')})")
            print(f"[{clock.spent():6.1f} s] {tag}: {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] "
                  f"{result['steps']} steps, {result.get('ms_per_step') or 0:.2f} ms/step {how}, "
                  f"{result['wall_seconds']:.0f} s", flush=True)
        else:
            print(f"[{clock.spent():6.1f} s] {tag}: {result['error']}", flush=True)
        save(summary=False)

    since = time.perf_counter()
    pending, running = list(jobs), {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if workers > 1:
        logs = os.path.join(os.path.dirname(os.path.abspath(args.out)), f"eval_{task}_logs")
        os.makedirs(logs, exist_ok=True)
    while pending or running:
        while pending and len(running) < workers:
            # most important first: this job gets its steps if the minimum steps of the later ones still fit
            # after it, else what they leave, never less than its own minimum; a job whose minimum does not fit
            # is skipped (further seeds run only at the first seed's best rate of their plan)
            left = (deadline - time.time()) * workers
            job = pending.pop(0)

            def eligible(j: dict[str, Any]) -> bool:
                return j["priority"][0] == 0 or best_rate(j["width"], j["plan"]) == j["learning_rate"]

            if not eligible(job):
                record["skipped"].append(f"{job['tag']}: further seeds run at the plan's best rate only")
                continue
            floor = 1.1 * estimate(job, min_steps)
            share = allot(floor, [1.1 * estimate(j, min_steps) for j in pending if eligible(j)], left)
            if share is None:
                record["skipped"].append(f"{job['tag']}: its {min_steps} steps at least need ~{floor:.0f} s, "
                                         f"{left:.0f} s left at its turn")
                continue
            job["deadline"] = time.time() + share
            if workers == 1:  # in this process, one run after another (the GPU gains nothing from more)
                finished(job["tag"], train_job(job))
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            path = job["out"] + ".job"
            with open(path, "w") as handle:
                json.dump(job, handle)
            log = open(os.path.join(logs, job["tag"] + ".log"), "w")  # noqa: SIM115 - closed when the job ends
            process = subprocess.Popen([sys.executable, os.path.abspath(__file__), task, "--job", path],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            running[job["tag"]] = (process, job, log)
        if not running:
            continue
        time.sleep(1.0)
        for tag, (process, job, log) in list(running.items()):
            if process.poll() is None:
                if time.time() > min(job["deadline"] + 15, deadline + 3):  # stop it (its own session, by its id)
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    record["skipped"].append(f"{tag}: killed at the deadline")
                else:
                    continue
            log.close()
            del running[tag]
            if os.path.exists(job["out"]):
                with open(job["out"]) as handle:
                    finished(tag, json.load(handle))
            elif not any(s.startswith(tag) for s in record["skipped"]):
                record["skipped"].append(f"{tag}: exited {process.returncode} without a result (see its log)")
                save(summary=False)
    phase("training", since)
    for key, block in record["summary"].items():
        print(f"\n{task} {key}: accuracy [95% interval], steps, vs dense")
        for name in block["ordering"]:
            row = block["rows"][name]
            a, v = row["accuracy"], row.get("versus_dense")
            print(f"  {name:24s} {a['value']:.3f} [{a['low']:.3f}, {a['high']:.3f}] lr {row['best_learning_rate']:g}"
                  f" steps {row['steps']} ms/step {[round(m or 0, 2) for m in row['ms_per_step']]}"
                  + ("" if v is None else f"  {v['winner']} ({v['difference']:+.3f})"))
    if record["skipped"]:
        print("skipped:", *record["skipped"], sep="\n  ")
    print(f"\nwrote {args.out} in {clock.spent():.0f} s")


if __name__ == "__main__":
    if "--job" in sys.argv:
        with open(sys.argv[sys.argv.index("--job") + 1]) as handle:
            run_job(json.load(handle))
    elif "--graph-checks-spec" in sys.argv:
        with open(sys.argv[sys.argv.index("--graph-checks-spec") + 1]) as handle:
            run_graph_checks(json.load(handle))
    else:
        main()
