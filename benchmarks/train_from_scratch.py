"""Small LMs trained from scratch at equal attention budget, on one GPU (issues 14 and 15).

The same ``spattn.nn.TransformerLM`` (byte-level, ``--dim`` 256, ``--layers`` 2, 4 query / 2 key-value heads)
with one attention per run, every sparse one at the **same measured keys per query**:

* ``dense``: causal SDPA;
* ``window``: ``Sinks(4) | Window(w)``, ``w`` the smallest window reaching the hierarchical budget;
* ``hierarchical``: ``spattn.hierarchical.HierarchicalAttention`` (learned gates and pooling) on
  ``Hierarchical(32, 16, select_block=64, select_count=4, window=128)``; its keys per query (compressed tokens +
  selected keys + window keys, summed: the branches load separately) set the budget;
* ``learned`` / ``learned-reg`` / ``learned+entropy`` / ``+density`` / ``+drop`` / ``+balance``: a
  ``spattn.learned.LearnedTopK`` gate router (straight-through, temperature 1 -> 0.1) keeping the current block
  and the ``n`` routed blocks, ``n`` the smallest reaching the budget; ``-reg`` = ``Regularisers.anti_collapse()``,
  the ``+name`` rows one regulariser each (the ablation);
* ``pooled``: MoBA's parameter-free mean-pooled routing at the same block count; ``distill``: the gate trained
  by KL to block-pooled dense attention (DeepSeek's indexer recipe).

Training is ``spattn.learned.train.fit`` for every run (AdamW, warm-up + cosine, bf16 autocast on CUDA). Every
section first *calibrates* (a few steps of each variant: the triton JIT happens there), then gives all its
variants the **same number of steps**, as many as the section's share of ``--time-budget`` allows (shares by
``SECTION_WEIGHTS`` of what is left; a section drops its slowest variants, recorded, rather than train fewer than
``--min-steps``).

Sections, most important first (the JSON is rewritten after every run; a killed run keeps what it finished):

1. ``gate``: correctness (``benchmarks/learned.py`` and ``benchmarks/hierarchical.py`` gates: the router, the
   static layer and the hierarchical fast path against float64 references, forward and backward);
2. ``lm@<L0>`` (2048): hierarchical, dense, window, learned-reg, learned: held-out loss curves on
   Austen and on KJV (the last 5% of each; loss per eval batch, mean with a bootstrap interval over batches),
   final paired comparisons on the same batches, collapse metrics of the routers, measured keys per query;
3. ``lm@<L1>`` (8192): hierarchical, dense, window, learned-reg;
4. ``ablation@<L0>``: learned with each regulariser alone, pooled and distill (learned and learned-reg are in 2.);
5. ``passkey@<L0>``: pass-key retrieval (``benchmarks/hierarchical_train.py``'s task: every query further than
   the window stack's reach from its key), 2 layers, accuracy with bootstrap intervals;
6. ``seed1@<L0>``: section 2 again with seed 1, then intervals over both seeds.

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python benchmarks/train_from_scratch.py --time-budget 200   # H200
    PYTHONPATH=src python benchmarks/train_from_scratch.py --quick --device cpu --out /tmp/tfs.json  # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks whose helpers we reuse

import hierarchical_train as ht  # noqa: E402 - needs the path above

import spattn  # noqa: E402
from spattn.bench.env import machine_info  # noqa: E402
from spattn.cli.train import attention_factory  # noqa: E402
from spattn.eval import stats  # noqa: E402
from spattn.hierarchical import HierarchicalAttention  # noqa: E402
from spattn.learned import LearnedTopK, Schedule  # noqa: E402
from spattn.learned.train import Regularisers, fit, lm_batches, routers, sequence_loss, task_batches  # noqa: E402
from spattn.nn import TransformerLM  # noqa: E402
from spattn.patterns import BlockLayout  # noqa: E402

MAIN = ("hierarchical", "dense", "window", "learned-reg", "learned")
LONG = ("hierarchical", "dense", "window", "learned-reg")
ABLATION = ("learned+entropy", "learned+density", "learned+drop", "learned+balance", "pooled", "distill")
TASK = ("hierarchical", "dense", "window", "learned-reg")
SECTION_WEIGHTS = {"lm0": 6.0, "lm1": 3.0, "ablation": 1.5, "passkey": 1.5, "seed1": 1.0}
SINKS = 4


def regularisers_of(variant: str) -> Regularisers:
    """The trainer's regularisers for a variant: none, the anti-collapse set, or one term alone."""
    single = {"learned+entropy": Regularisers(entropy=0.05), "learned+density": Regularisers(density=0.5),
              "learned+drop": Regularisers(drop=0.1), "learned+balance": Regularisers(balance=0.05)}
    if variant == "learned-reg":
        return Regularisers.anti_collapse()
    return single.get(variant, Regularisers())


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default $OUT/train_from_scratch.json, else "
                                               "benchmarks/results/h200/train_from_scratch.json)")
    p.add_argument("--quick", action="store_true", help="tiny settings (a CPU smoke run of the same code)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="autocast dtype (default bf16 on CUDA)")
    p.add_argument("--time-budget", type=float, default=200.0,
                   help="seconds for the whole run, JIT included; sections that would not fit are skipped")
    p.add_argument("--lengths", default="2048,8192", help="two training lengths: the main one and the long one")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="batch = tokens-per-step // length")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-steps", type=int, default=25,
                   help="a section drops its slowest variants until it can give this many steps, else is skipped")
    p.add_argument("--max-steps", type=int, default=600)
    p.add_argument("--fixed-steps", type=int, default=None,
                   help="train every section for exactly this many steps (no sizing from the calibration)")
    p.add_argument("--variants", default=None, help="keep only these variants in every section (comma-separated)")
    p.add_argument("--skip-gate", action="store_true", help="no correctness section (tests of the script only)")
    p.add_argument("--eval-batches", type=int, default=6, help="held-out batches per corpus")
    p.add_argument("--eval-points", type=int, default=5, help="points on each loss curve")
    p.add_argument("--compress-block", type=int, default=32)
    p.add_argument("--compress-stride", type=int, default=16)
    p.add_argument("--select-block", type=int, default=64)
    p.add_argument("--select-count", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--task-dim", type=int, default=128)
    p.add_argument("--task-layers", type=int, default=2)
    p.add_argument("--task-batch", type=int, default=16)
    p.add_argument("--sections", default="lm0,lm1,ablation,passkey,seed1", help="subset of " +
                   ",".join(SECTION_WEIGHTS))
    args = p.parse_args(argv)
    args.lengths = tuple(int(x) for x in args.lengths.split(","))
    args.sections = tuple(s for s in args.sections.split(",") if s)
    if len(args.lengths) != 2:
        p.error(f"--lengths needs two lengths (main, long), got {args.lengths}")
    if set(args.sections) - set(SECTION_WEIGHTS):
        p.error(f"--sections must be a subset of {tuple(SECTION_WEIGHTS)}, got {args.sections}")
    if args.quick:
        args.lengths, args.tokens_per_step, args.dim, args.layers = (256, 512), 512, 32, 2
        args.heads, args.kv_heads, args.eval_batches, args.eval_points = 2, 1, 2, 2
        args.min_steps, args.max_steps, args.fixed_steps, args.task_layers = 1, 2, 2, 1
        args.compress_block, args.compress_stride, args.select_block, args.select_count, args.window = 16, 8, 32, 2, 32
        args.task_dim, args.task_batch = 32, 2
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


# ----------------------------------------------------------------------------------------------- budget
def learned_block(length: int) -> int:
    """The routers' block size: 64, or more so that the straight-through pass's extra dims (one per query
    block) stay <= 64 (its attention then runs at head dim <= 128 in the triton kernels)."""
    return max(64, length // 64)


def band_keys_per_query(blocks: int, block: int, length: int) -> float:
    """Keys per query of the ``blocks`` latest key blocks (causal): a router's structural count."""
    router = LearnedTopK(1, 1, 2, blocks=0, block_size=block, local=blocks)
    band = router.local_blocks(length, length, torch.device("cpu"))
    return ht.layout_keys_per_query(BlockLayout(band, block=block), length, block)


def matched_budget(args, length: int, dim: int, layers: int) -> dict:
    """The hierarchical keys per query on a fresh model, and the window / router sizes that reach them."""
    hargs = SimpleNamespace(dim=dim, heads=args.heads, kv_heads=args.kv_heads, layers=layers,
                            select_block=args.select_block, seed=0, device=args.device, length=length,
                            compress_block=args.compress_block, compress_stride=args.compress_stride,
                            select_count=args.select_count, window=args.window)
    probe = ht.make_model("hierarchical", 256, hargs, None)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1)).to(args.device)
    fresh = ht.hierarchical_keys_per_query(probe, ids)
    target = fresh["branches_total"]
    w, window_keys = ht.matched_window(target, SINKS, length, args.select_block)
    block = learned_block(length)
    # the router's count moves by whole blocks: the one nearest the target (the window is token-exact)
    counts = range(1, max(2, -(-length // block) - 1))
    n = min(counts, key=lambda c: (abs(band_keys_per_query(1 + c, block, length) - target), c))
    return {"rule": "the hierarchical branches' total keys/query (compressed tokens + selected keys + window keys, "
                    "overlaps counted twice) is the budget; the window is the smallest Sinks|Window reaching it, "
                    "the router keeps the current block + the routed block count nearest to it",
            "hierarchical_fresh": {k: v for k, v in fresh.items() if k != "per_layer"},
            "window": w, "window_pattern": (spattn.Sinks(SINKS) | spattn.Window(w)).to_dict(),
            "learned_block": block, "learned_routed_blocks": n,
            "keys_per_query": {"dense": (length + 1) / 2, "window": window_keys, "hierarchical": target,
                               "learned": band_keys_per_query(1 + n, block, length)}}


@torch.no_grad()
def measured_keys(model, variant: str, ids: torch.Tensor, budget: dict, context) -> dict | None:
    """Keys per query of the trained model on held-out ``ids`` (eval mode): hierarchical from its branch
    layouts, routers from the blocks they chose (+ the current block's causal band)."""
    if variant == "hierarchical":
        with context():
            out = ht.hierarchical_keys_per_query(model, ids)
        return {k: v for k, v in out.items() if k != "per_layer"} | {"gate_mean": [r["gate_mean"]
                                                                                   for r in out["per_layer"]]}
    layers = routers(model)
    if not layers:
        return None
    was = model.training
    model.eval()
    with context():
        model(ids)
    model.train(was)
    block, L = budget["learned_block"], ids.shape[1]
    per_layer = [band_keys_per_query(1, block, L) + block * float(r.last["chosen"].sum(-1).double().mean())
                 for r in layers]
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)}


# ----------------------------------------------------------------------------------------------- models
def make_model(variant: str, vocab: int, *, dim: int, layers: int, args, budget: dict, seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    head_dim = dim // args.heads
    if variant == "window":
        factory = lambda _i: spattn.Sinks(SINKS) | spattn.Window(budget["window"])  # noqa: E731
    elif variant == "hierarchical":
        config = spattn.Hierarchical(compress_block=args.compress_block, compress_stride=args.compress_stride,
                                     select_block=args.select_block, select_count=args.select_count,
                                     window=args.window, pooling="learned")
        factory = lambda _i: HierarchicalAttention(config, args.heads, args.kv_heads, head_dim)  # noqa: E731
    else:
        name = "learned" if variant.startswith("learned") else variant
        factory = attention_factory(name, heads=args.heads, kv_heads=args.kv_heads, head_dim=head_dim,
                                    budget=budget["learned_routed_blocks"] + 1, block_size=budget["learned_block"])
    return TransformerLM(vocab, dim=dim, layers=layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                         pattern=factory, block_size=args.select_block).to(args.device)


def train_kwargs(variant: str, steps: int) -> dict:
    temperature = Schedule(1.0, 0.1, steps, shape="exponential") if variant.startswith("learned") else None
    return {"regularisers": regularisers_of(variant), "temperature": temperature}


# ----------------------------------------------------------------------------------------------- data
def corpus_bytes(name: str) -> torch.Tensor:
    from spattn.data import load_text

    return torch.frombuffer(bytearray(load_text(name).encode("utf-8")), dtype=torch.uint8).long()


def lm_data(args, length: int, batch: int, seed: int):
    """Training batches (Austen + KJV, first 95% of each, one stream) and held-out batches per corpus."""
    train_parts, held = [], {}
    for name in ("austen", "kjv"):
        ids = corpus_bytes(name)
        split = int(ids.numel() * 0.95)
        train_parts.append(ids[:split])
        stream = lm_batches(ids[split:], length, batch, seed=1234)
        held[name] = [tuple(t.to(args.device) for t in next(stream)) for _ in range(args.eval_batches)]
    train_ids = torch.cat(train_parts)

    def batches():
        return ((x.to(args.device), y.to(args.device)) for x, y in lm_batches(train_ids, length, batch, seed=seed))

    return batches, held, {"corpora": ["austen", "kjv"], "tokens": "utf-8 bytes (vocabulary 256)",
                           "train_tokens": int(train_ids.numel()), "held_out": "last 5% of each corpus",
                           "eval_batches_per_corpus": args.eval_batches, "batch": batch, "length": length}


@torch.no_grad()
def held_losses(model, held: dict, context) -> dict:
    """Per corpus: the loss (nats/byte) of every held-out batch, in eval mode."""
    was = model.training
    model.eval()
    out = {}
    with context():
        for name, batches in held.items():
            out[name] = [float(sequence_loss(model(x), y)) for x, y in batches]
    model.train(was)
    return out


def curve_point(model, held, context) -> dict:
    """Per corpus: the mean held-out loss with its bootstrap interval over batches, and the batches' losses."""
    losses = held_losses(model, held, context)
    return {**{f"{name}_loss": stats.estimate(values).to_dict() for name, values in losses.items()},
            "batch_losses": losses}


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse(argv)
    start = time.perf_counter()
    deadline = start + args.time_budget
    device = torch.device(args.device)
    if args.out:
        out_path = Path(args.out)
    elif os.environ.get("OUT"):
        out_path = Path(os.environ["OUT"]) / "train_from_scratch.json"
    else:
        out_path = Path("benchmarks/results/h200/train_from_scratch.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]

    def context():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                  enabled=False)

    result: dict = {"benchmark": "train_from_scratch", "command": "python " + " ".join(sys.argv),
                    "machine": machine_info(args.device), "settings": vars(args), "gate": [], "sections": {},
                    "skipped": [], "errors": []}

    def save():
        result["seconds"] = time.perf_counter() - start
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out_path)

    def left() -> float:
        return deadline - time.perf_counter()

    save()
    # 1. correctness
    import hierarchical as hier_bench
    import learned as learned_bench

    try:
        if args.skip_gate:
            result["gate_ok"] = None  # not run (--skip-gate)
        else:
            result["gate"] += learned_bench.correctness(device)
            result["gate"].append(hier_bench.gate(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                                  args.quick))
            result["gate_ok"] = True
    except Exception as exc:  # recorded, and the training still runs (it reports losses, not speed)
        result["gate_ok"] = False
        result["errors"].append({"where": "gate", "error": f"{type(exc).__name__}: {exc}",
                                 "traceback": traceback.format_exc()})
        print(traceback.format_exc(), flush=True)
    print(f"gate done at {time.perf_counter() - start:.1f} s ok={result['gate_ok']}", flush=True)
    save()

    L0, L1 = args.lengths
    plan = [("lm0", f"lm@{L0}", L0, MAIN, 0), ("lm1", f"lm@{L1}", L1, LONG, 0),
            ("ablation", f"ablation@{L0}", L0, ABLATION, 0), ("passkey", f"passkey@{L0}", L0, TASK, 0),
            ("seed1", f"seed1@{L0}", L0, MAIN, 1)]
    keep = None if args.variants is None else set(args.variants.split(","))
    plan = [(k, n, length, tuple(v for v in vs if keep is None or v in keep), seed)
            for k, n, length, vs, seed in plan if k in args.sections]
    plan = [p for p in plan if p[3]]
    budgets: dict[tuple, dict] = {}
    timings: dict[tuple, dict] = {}  # calibrations, reused by later sections of the same shapes

    for index, (key, name, length, variants, seed) in enumerate(plan):
        weights = [SECTION_WEIGHTS[p[0]] for p in plan[index:]]
        share = left() * weights[0] / sum(weights)
        section: dict = {"length": length, "seed": seed, "variants": list(variants), "share_seconds": share}
        result["sections"][name] = section
        t_section = time.perf_counter()
        try:
            run_section(key, section, args, length, variants, seed, share, deadline, budgets, timings, context, save)
        except Exception as exc:
            section["status"] = "error"
            result["errors"].append({"where": name, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
        section["seconds"] = time.perf_counter() - t_section
        if section.get("status") == "skipped":
            result["skipped"].append({"section": name, "reason": section["reason"]})
        save()

    if "lm0" in args.sections and "seed1" in args.sections:
        result["over_seeds"] = over_seeds(result["sections"].get(f"lm@{L0}", {}),
                                          result["sections"].get(f"seed1@{L0}", {}))
    save()
    print(f"wrote {out_path} in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def run_section(key, section, args, length, variants, seed, share, deadline, budgets, timings, context,
                save) -> None:
    t0 = time.perf_counter()
    autocast = None if args.dtype == "fp32" else torch.bfloat16
    task = key == "passkey"
    dim, layers = (args.task_dim, args.task_layers) if task else (args.dim, args.layers)
    if (length, dim, layers) not in budgets:
        with context():
            budgets[(length, dim, layers)] = matched_budget(args, length, dim, layers)
    budget = budgets[(length, dim, layers)]
    section["budget"] = budget
    if task:
        batch = args.task_batch
        data = passkey_data(args, length, budget, layers, seed)
        vocab = data["vocab"]
        section["task"] = data["info"]

        def batches():
            return ((x.to(args.device), y.to(args.device)) for x, y in
                    task_batches(data["train"][0], data["train"][1], batch, seed=seed))
    else:
        batch = max(1, args.tokens_per_step // length)
        batches, held, info = lm_data(args, length, batch, seed)
        vocab = 256
        section["data"] = info
    section["batch"] = batch

    def build(variant):
        return make_model(variant, vocab, dim=dim, layers=layers, args=args, budget=budget, seed=seed)

    def evaluator(model):
        if task:
            return {"held_accuracy": passkey_scores(model, data, context, small=True)["accuracy"]}
        return curve_point(model, held, context)

    # calibration: 3 steps of each variant (JIT included), timing the last two, and one evaluation; the
    # learned variants share one architecture, so one calibration
    calibration = {}
    for variant in variants:
        shape = (length, dim, layers, vocab, "learned" if variant.startswith("learned") else variant)
        if shape in timings:
            calibration[variant] = {**timings[shape], "reused": True}
            continue
        if time.perf_counter() - t0 > share and args.fixed_steps is None:
            break
        t = time.perf_counter()
        model = build(variant)
        sync(args.device)
        marks = []

        def mark(_m, marks=marks):
            sync(args.device)
            marks.append(time.perf_counter())
            return {}

        calibration_steps = 2 if args.quick else 3
        fit(model, batches(), steps=calibration_steps, lr=args.lr, warmup=1, log_every=1, evaluate_with=mark,
            autocast=autocast, **train_kwargs(variant, calibration_steps))
        t_eval = time.perf_counter()
        if args.fixed_steps is None:  # only the sizing needs it
            evaluator(model)
        sync(args.device)
        eval_seconds = time.perf_counter() - t_eval
        step = (marks[-1] - marks[0]) / (len(marks) - 1)
        calibration[variant] = {"seconds": time.perf_counter() - t, "step_seconds": step,
                                "eval_seconds": eval_seconds}
        timings[shape] = calibration[variant]
        del model
    section["calibration"] = calibration
    missing = [v for v in variants if v not in calibration]
    spent = time.perf_counter() - t0

    def affordable(names, limit: float) -> tuple[int, float]:
        """Steps every variant of ``names`` can train in ``limit`` seconds (bounded by the whole budget), less
        their evaluations and a margin."""
        per_step = sum(calibration[v]["step_seconds"] for v in names)
        per_eval = sum(calibration[v]["eval_seconds"] for v in names)
        room = min(limit, deadline - time.perf_counter()) - (args.eval_points + 2) * per_eval - 1.0 * len(names)
        return (int(min(args.max_steps, room / max(per_step, 1e-6))) if names else 0), room

    # short of --min-steps in its share, a section may take up to 60% of what is left of the whole budget, then
    # drops its least important variants (the last ones) down to two, then is skipped
    chosen = [v for v in variants if v in calibration]
    steps, room = affordable(chosen, share - spent)
    dropped = []
    while args.fixed_steps is None and steps < args.min_steps:
        if affordable(chosen, 0.6 * (deadline - time.perf_counter()))[0] >= args.min_steps:
            steps, room = args.min_steps, affordable(chosen, 0.6 * (deadline - time.perf_counter()))[1]
            section["extended_share"] = True
            break
        if len(chosen) <= 2:
            break
        last = chosen.pop()
        dropped.append({"variant": last, "step_seconds": calibration[last]["step_seconds"]})
        steps, room = affordable(chosen, share - spent)
    section["dropped_for_time"] = dropped + [{"variant": v, "reason": "not calibrated in the share"} for v in missing]
    variants = tuple(chosen) if args.fixed_steps is None else variants
    if args.fixed_steps is not None:
        steps = args.fixed_steps
    section["steps"] = steps
    section["trained_variants"] = list(variants)
    if args.fixed_steps is None and steps < args.min_steps:
        section["status"] = "skipped"
        section["reason"] = (f"calibration left {room:.0f} s of its {share:.0f} s share: {steps} steps < "
                             f"--min-steps {args.min_steps}")
        return
    save()
    section["runs"] = {}
    log_every = max(1, steps // args.eval_points)
    for variant in variants:
        t = time.perf_counter()
        model = build(variant)
        try:
            run = fit(model, batches(), steps=steps, lr=args.lr, warmup=max(1, steps // 10), log_every=log_every,
                      evaluate_with=evaluator, autocast=autocast, deadline=deadline - 5.0,
                      **train_kwargs(variant, steps))
        except Exception as exc:
            section["runs"][variant] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            print(traceback.format_exc(), flush=True)
            save()
            continue
        record = {"steps_done": run["steps_done"], "stopped_early": run["stopped_early"], "seconds": run["seconds"],
                  "history": run["history"], "regularisers": regularisers_of(variant).__dict__}
        probe = (data["test"][0][:2] if task else held["austen"][0][0][:1]).to(args.device)
        record["keys_per_query"] = measured_keys(model, variant, probe, budget, context)
        if task:
            record["test"] = passkey_scores(model, data, context, small=False)
        else:
            record["final_losses"] = run["final"]["batch_losses"]  # fit logs the last step it trained
            record["final"] = {n: stats.estimate(v).to_dict() for n, v in record["final_losses"].items()}
        section["runs"][variant] = record
        print(f"{key} {variant}: {time.perf_counter() - t:.1f} s, final "
              f"{record.get('final', record.get('test', {}).get('accuracy'))}", flush=True)
        del model
        save()
    section["comparisons"] = comparisons(section, task)
    section["status"] = "done"


def comparisons(section: dict, task: bool) -> dict:
    """Paired comparisons on the same held-out batches (LM: lower loss wins) or examples (task)."""
    runs = {k: v for k, v in section.get("runs", {}).items() if "error" not in v}
    out = {}
    for a in ("hierarchical", "learned-reg", "learned"):
        for b in ("dense", "window", "hierarchical", "learned", "pooled", "learned-reg"):
            if a == b or a not in runs or b not in runs or f"{b}_vs_{a}" in out:
                continue
            if task:
                out[f"{a}_vs_{b}"] = stats.compare(runs[a]["test"]["per_example"],
                                                   runs[b]["test"]["per_example"]).to_dict()
            else:
                out[f"{a}_vs_{b}"] = {c: stats.compare(runs[a]["final_losses"][c], runs[b]["final_losses"][c],
                                                       higher_is_better=False).to_dict()
                                      for c in runs[a]["final_losses"]}
    return out


def over_seeds(first: dict, second: dict) -> dict:
    """Per variant and corpus: the mean over seeds with a two-level bootstrap (seeds, then eval batches)."""
    out = {}
    for variant, run in first.get("runs", {}).items():
        other = second.get("runs", {}).get(variant)
        if "final_losses" not in run or not other or "final_losses" not in other:
            continue
        out[variant] = {c: stats.seed_interval([run["final_losses"][c], other["final_losses"][c]]).to_dict()
                        for c in run["final_losses"]}
    return out


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- pass key
def passkey_data(args, length: int, budget: dict, layers: int, seed: int) -> dict:
    """``hierarchical_train.retrieval_data`` at ``length``: every query beyond layers x (sinks + window)."""
    queries = 64 if not args.quick else 16
    targs = SimpleNamespace(length=length, queries=queries, far=layers * (budget["window"] + SINKS), sinks=SINKS,
                            needle=16 if not args.quick else 4, filler=32, keys=16, seed=seed)
    if length - queries - targs.far - targs.needle <= SINKS + 8:  # the window stack reaches the whole sequence
        raise ValueError(f"pass key at {length} tokens: the {layers}-layer window stack reaches {targs.far} "
                         f"tokens, no room for the key before {queries} queries")
    train_n, test_n = (4000, 256) if not args.quick else (8, 8)
    train = ht.retrieval_data(targs, train_n, seed=seed)
    test = ht.retrieval_data(targs, test_n, seed=seed + 1)
    vocab = targs.filler + targs.keys + 1
    info = {"kind": "pass key: one key token (16 consecutive copies) among random filler, queried by the last "
                    f"{queries} positions, every query more than {targs.far} tokens after it",
            "length": length, "chance": 1 / targs.keys, "vocab": vocab, "train_examples": train_n,
            "test_examples": test_n, "far_threshold": targs.far}
    return {"train": train[:2], "test": test, "vocab": vocab, "far": targs.far, "info": info}


def passkey_scores(model, data: dict, context, *, small: bool) -> dict:
    inputs, labels, distance = data["test"]
    if small:
        inputs, labels, distance = inputs[:64], labels[:64], distance[:64]
    with context():
        out = ht.retrieval_scores(model, inputs, labels, distance, data["far"], 16)
    return {"accuracy": out["accuracy"]["value"]} if small else out


if __name__ == "__main__":
    main()
