"""Small LMs trained from scratch at equal attention budget, on one GPU, variants in parallel (issues 14 and 15).

The same ``spattn.nn.TransformerLM`` (byte-level, ``--dim`` 256, ``--layers`` 2, 4 query / 2 key-value heads)
with one attention per run, every sparse one at the **same measured keys per query**:

* ``dense``: causal SDPA;
* ``window``: ``Sinks(4) | Window(w)``, ``w`` the smallest window reaching the hierarchical budget;
* ``hierarchical``: ``spattn.hierarchical.HierarchicalAttention`` (learned gates and pooling) on
  ``Hierarchical(32, 16, select_block=64, select_count=4, window=128)``; its keys per query (compressed tokens +
  selected keys + window keys, summed: the branches load separately) set the budget;
* ``learned`` / ``learned-reg`` / ``learned+entropy`` / ``+density`` / ``+drop`` / ``+balance``: a
  ``spattn.learned.LearnedTopK`` gate router (straight-through, temperature 1 -> 0.1) keeping the current block
  and the ``n`` routed blocks, ``n`` the block count nearest the budget; ``-reg`` = ``Regularisers.anti_collapse()``,
  the ``+name`` rows one regulariser each (the ablation);
* ``pooled``: MoBA's parameter-free mean-pooled routing at the same block count; ``distill``: the gate trained
  by KL to block-pooled dense attention (DeepSeek's indexer recipe) (section ``routers``, not in the default).

Training is ``spattn.learned.train.fit`` for every run (AdamW, warm-up + cosine, bf16 autocast on CUDA).

**How a run spends its time.** The parent process runs the correctness gate (one small shape, the training
dtype, head dim and configs, so its triton kernels are the ones training reuses from the on-disk cache), measures
the budgets, then runs the sections in *waves*: whole sections, in ``--sections`` order, as many as fit in
``--workers`` subprocesses (one per variant). A wave gets its share of what is left of ``--time-budget``
(``SECTION_WEIGHTS``). Every worker builds its data and model, runs a few calibration steps (JIT included; the
step time is the median of the steps after the JIT, measured while the wave's other workers run too), and
waits; the parent then gives every variant of a section the **same step count**: as many as the section's
slowest variant fits before the wave's deadline (``--max-steps`` at most; a section short of ``--min-steps`` is
skipped and recorded). A worker still stops at the deadline (``fit(deadline=)``); the comparisons are then made
at the last evaluation step every variant of the section reached. Each worker writes its JSON-lines log as it
trains; the parent merges them into one JSON every few seconds (a killed run keeps what it had).

Sections (the JSON names them ``lm@2048`` ...):

* ``lm0``: 2048 tokens, seed 0: hierarchical, dense, window, learned-reg, learned: held-out loss curves on
  Austen and on KJV (the last 5% of each; per eval batch, mean with a bootstrap interval over batches), paired
  comparisons on the same batches, the routers' collapse metrics (distinct blocks, usage and gate entropy) along
  the curve on held-out text (eval mode: no noise, no drop) and in training, measured keys per query;
* ``seed1``: the same with seed 1 (intervals over both seeds when both trained the same step count);
* ``ablation``: learned with each regulariser alone (entropy, density, drop, balance);
* ``lm1``: 8192 tokens: hierarchical, dense, window, learned-reg, learned;
* ``passkey``: pass-key retrieval at 2048 (``benchmarks/hierarchical_train.py``'s task: every query further
  than the window stack's reach from its key): accuracy at equal budget with bootstrap intervals;
* ``routers``: pooled and distill routers (optional).

    SPATTN_TRITON_AUTOTUNE=0 PYTHONPATH=src python benchmarks/train_from_scratch.py --time-budget 440 --workers 14
    PYTHONPATH=src python benchmarks/train_from_scratch.py --quick --device cpu --workers 4 --out /tmp/tfs.json
    python benchmarks/train_from_scratch.py --plot benchmarks/results/h200/learned/train_from_scratch.json \\
        --figure docs/learned-from-scratch.png                   # the curves' figure (matplotlib)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
from spattn.learned.train import (  # noqa: E402
    Regularisers,
    fit,
    lm_batches,
    routers,
    selection_metrics,
    sequence_loss,
    task_batches,
)
from spattn.nn import TransformerLM  # noqa: E402
from spattn.patterns import BlockLayout  # noqa: E402

MAIN = ("hierarchical", "dense", "window", "learned-reg", "learned")
ABLATION = ("learned+entropy", "learned+density", "learned+drop", "learned+balance")
TASK = ("hierarchical", "dense", "window", "learned-reg")
ROUTERS = ("pooled", "distill")
# section key -> (variants, seed, which length, weight of its share of the time, JSON name prefix)
SECTIONS = {"lm0": (MAIN, 0, 0, 6.0, "lm"), "seed1": (MAIN, 1, 0, 1.0, "seed1"),
            "ablation": (ABLATION, 0, 0, 1.5, "ablation"), "lm1": (MAIN, 0, 1, 3.0, "lm"),
            "passkey": (TASK, 0, 0, 1.5, "passkey"), "routers": (ROUTERS, 0, 0, 1.0, "routers")}
SECTION_WEIGHTS = {k: v[3] for k, v in SECTIONS.items()}
SINKS = 4
SAFETY = 0.85  # of the computed step count: concurrency changes step times after the calibration


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
                                               "benchmarks/results/h200/learned/train_from_scratch.json); the "
                                               "workers' files go to the folder <out stem>-runs beside it")
    p.add_argument("--quick", action="store_true", help="tiny settings (a CPU smoke run of the same code)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp32"), help="autocast dtype (default bf16 on CUDA)")
    p.add_argument("--time-budget", type=float, default=440.0,
                   help="seconds for the whole run (gate, JIT, every wave); what would not fit is skipped, recorded")
    p.add_argument("--workers", type=int, default=14, help="concurrent training subprocesses (one per variant)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cpus // workers)")
    p.add_argument("--in-process", action="store_true",
                   help="workers on threads of this process instead of subprocesses (tests, debugging)")
    p.add_argument("--lengths", default="2048,8192", help="two training lengths: the main one and the long one")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="batch = tokens-per-step // length")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-steps", type=int, default=50, help="a section that cannot give this many is skipped")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--fixed-steps", type=int, default=None,
                   help="train every section for exactly this many steps (no sizing from the calibration)")
    p.add_argument("--calibration-steps", type=int, default=8, help="per worker; the first 3 are not timed")
    p.add_argument("--variants", default=None, help="keep only these variants in every section (comma-separated)")
    p.add_argument("--skip-gate", action="store_true", help="no correctness section (tests of the script only)")
    p.add_argument("--eval-batches", type=int, default=6, help="held-out batches per corpus")
    p.add_argument("--eval-points", type=int, default=12, help="points on each loss curve")
    p.add_argument("--compress-block", type=int, default=32)
    p.add_argument("--compress-stride", type=int, default=16)
    p.add_argument("--select-block", type=int, default=64)
    p.add_argument("--select-count", type=int, default=4)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--task-dim", type=int, default=128)
    p.add_argument("--task-layers", type=int, default=2)
    p.add_argument("--task-batch", type=int, default=16)
    p.add_argument("--sections", default="lm0,seed1,ablation,lm1,passkey",
                   help="in priority order, a subset of " + ",".join(SECTIONS))
    p.add_argument("--plot", default=None, metavar="JSON", help="only draw the figure of a finished run's JSON")
    p.add_argument("--figure", default="docs/learned-from-scratch.png", help="PNG path of --plot")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)  # a worker: the path of its spec JSON
    args = p.parse_args(argv)
    if args.job or args.plot:
        return args
    args.lengths = tuple(int(x) for x in args.lengths.split(","))
    args.sections = tuple(s for s in args.sections.split(",") if s)
    if len(args.lengths) != 2:
        p.error(f"--lengths needs two lengths (main, long), got {args.lengths}")
    if set(args.sections) - set(SECTIONS):
        p.error(f"--sections must be a subset of {tuple(SECTIONS)}, got {args.sections}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.quick:
        args.lengths, args.tokens_per_step, args.dim, args.layers = (256, 512), 512, 32, 2
        args.heads, args.kv_heads, args.eval_batches, args.eval_points = 2, 1, 2, 2
        args.min_steps, args.max_steps, args.task_layers, args.calibration_steps = 1, 3, 1, 4
        args.compress_block, args.compress_stride, args.select_block, args.select_count, args.window = 16, 8, 32, 2, 32
        args.task_dim, args.task_batch = 32, 2
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
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
def held_losses(model, held: dict, context) -> tuple[dict, dict]:
    """Per corpus: the loss (nats/byte) of every held-out batch, in eval mode; and the routers' collapse metrics
    on those batches (``selection_metrics``, eval mode: no noise, no drop), averaged over batches (empty
    without routers)."""
    was = model.training
    model.eval()
    out, collapse = {}, {}
    with context():
        for name, batches in held.items():
            out[name], rows = [], []
            for x, y in batches:
                out[name].append(float(sequence_loss(model(x), y)))
                rows.append(selection_metrics(model))
            if rows and rows[0]:
                collapse[name] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    model.train(was)
    return out, collapse


def curve_point(model, held, context) -> dict:
    """Per corpus: the mean held-out loss with its bootstrap interval over batches, and the batches' losses;
    with routers, their held-out collapse metrics per corpus and averaged (``held_<metric>``)."""
    losses, collapse = held_losses(model, held, context)
    point = {**{f"{name}_loss": stats.estimate(values).to_dict() for name, values in losses.items()},
             "batch_losses": losses}
    if collapse:
        point["held_collapse"] = collapse
        for key in next(iter(collapse.values())):
            point[f"held_{key}"] = sum(c[key] for c in collapse.values()) / len(collapse)
    return point
# ----------------------------------------------------------------------------------------------- gate
def gate(args, device: torch.device) -> list[dict]:
    """Correctness of the three sparse attentions training uses, on ONE small shape with training's dtype,
    head dim, block sizes and configs (so the kernels JIT here are the ones the workers reuse): hierarchical
    fast path == float64 reference forward + backward (and the cost model's pairs == the layouts');
    ``LearnedTopK`` straight-through + eval passes and the ``Sinks | Window`` layer against the float64 dense
    oracle (tolerance rule). Raises on failure; each check records its seconds."""
    import hierarchical as hier_bench
    import learned as learned_bench

    dtype = torch.bfloat16 if device.type == "cuda" and args.dtype == "bf16" else torch.float32
    L = 256 if args.quick else 512  # >= 4 router blocks of learned_block: something is routed
    head_dim = args.dim // args.heads
    block = learned_block(args.lengths[0])
    checks: list[dict] = []
    t = time.perf_counter()
    row = hier_bench.gate(device, dtype, args.quick, shape=(L, args.heads, args.kv_heads, head_dim),
                          config=hierarchical_pattern(args))
    checks.append({**row, "seconds": time.perf_counter() - t})
    learned_bench.timed(checks, f"LearnedTopK (local=1, block {block}, 2 routed) straight-through + eval passes, "
                                f"L={L}, tolerance rule",
                        lambda: learned_bench.router_check(device, dtype, length=L, dim=args.dim, heads=args.heads,
                                                           kv_heads=args.kv_heads, block=block, blocks=2, local=1))
    window = spattn.Sinks(SINKS) | spattn.Window(L // 4 + 3)
    learned_bench.timed(checks, f"SparseAttention({window}) L={L}, tolerance rule",
                        lambda: learned_bench.static_check(device, dtype, window, length=L, dim=args.dim,
                                                           heads=args.heads, kv_heads=args.kv_heads,
                                                           block=args.select_block))
    for c in checks:
        print(f"gate: {c['check']}: {c['seconds']:.1f} s", flush=True)
    return checks


def hierarchical_pattern(args) -> spattn.Hierarchical:
    return spattn.Hierarchical(compress_block=args.compress_block, compress_stride=args.compress_stride,
                               select_block=args.select_block, select_count=args.select_count, window=args.window,
                               pooling="learned")


# ----------------------------------------------------------------------------------------------- parent
def section_name(key: str, args) -> str:
    variants, _seed, which, _w, prefix = SECTIONS[key]
    return f"{prefix}@{args.lengths[which]}"


def job_name(section: str, variant: str) -> str:
    """A worker's file stem: letters, digits and dashes only (``ablation@2048``, ``learned+drop`` ->
    ``ablation-2048-learned-with-drop``)."""
    return f"{section}-{variant}".replace("@", "-").replace("+", "-with-")


def plan_waves(args) -> list[list[tuple[str, tuple[str, ...]]]]:
    """Whole sections in ``--sections`` order, grouped into waves of at most ``--workers`` jobs (a section
    larger than ``--workers`` runs alone in its wave, all its variants at once)."""
    keep = None if args.variants is None else set(args.variants.split(","))
    waves: list[list] = []
    size = args.workers + 1  # forces a new wave for the first section
    for key in args.sections:
        variants = tuple(v for v in SECTIONS[key][0] if keep is None or v in keep)
        if not variants:
            continue
        if size + len(variants) > args.workers:
            waves.append([])
            size = 0
        waves[-1].append((key, variants))
        size += len(variants)
    return waves


def main(argv=None) -> dict:
    args = parse(argv)
    if args.plot:
        return plot(Path(args.plot), Path(args.figure))
    if args.job:
        return worker(Path(args.job))
    start = time.perf_counter()
    deadline = start + args.time_budget
    device = torch.device(args.device)
    if args.out:
        out_path = Path(args.out)
    elif os.environ.get("OUT"):
        out_path = Path(os.environ["OUT"]) / "train_from_scratch.json"
    else:
        out_path = Path("benchmarks/results/h200/learned/train_from_scratch.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    run_dir = out_path.parent / f"{out_path.stem}-runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]

    def context():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                                  enabled=False)

    result: dict = {"benchmark": "train_from_scratch", "command": "python " + " ".join(sys.argv),
                    "machine": machine_info(args.device), "settings": vars(args), "gate": [], "phases": {},
                    "sections": {}, "skipped": [], "errors": []}

    def save():
        result["seconds"] = time.perf_counter() - start
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(out_path)

    def phase(name: str, t0: float) -> None:
        result["phases"][name] = time.perf_counter() - t0
        print(f"phase {name}: {result['phases'][name]:.1f} s (at {time.perf_counter() - start:.1f} s)", flush=True)
        save()

    save()
    t0 = time.perf_counter()
    if args.skip_gate:
        result["gate_ok"] = None  # not run (--skip-gate)
    else:
        try:
            result["gate"] = gate(args, device)
            result["gate_ok"] = True
        except Exception as exc:  # recorded; the training still runs (it reports losses, not speed)
            result["gate_ok"] = False
            result["errors"].append({"where": "gate", "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
    phase("gate", t0)

    t0 = time.perf_counter()
    waves = plan_waves(args)
    budgets: dict[tuple, dict] = {}  # by (length, dim, layers)
    for wave in waves:
        for key, variants in wave:
            dim, layers = (args.task_dim, args.task_layers) if key == "passkey" else (args.dim, args.layers)
            length = args.lengths[SECTIONS[key][2]]
            if (length, dim, layers) not in budgets:
                with context():
                    budgets[(length, dim, layers)] = {"length": length, "dim": dim, "layers": layers,
                                                      **matched_budget(args, length, dim, layers)}
            result["sections"][section_name(key, args)] = {"key": key, "length": length, "seed": SECTIONS[key][1],
                                                           "variants": list(variants),
                                                           "budget": budgets[(length, dim, layers)]}
    phase("budgets", t0)

    for index, wave in enumerate(waves):
        weights = [sum(SECTION_WEIGHTS[k] for k, _ in w) for w in waves[index:]]
        share = (deadline - time.perf_counter()) * weights[0] / sum(weights)
        t0 = time.perf_counter()
        try:
            run_wave(index, wave, share, args, result, run_dir, save)
        except Exception as exc:
            result["errors"].append({"where": f"wave {index}", "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc()})
            print(traceback.format_exc(), flush=True)
        phase(f"wave{index}", t0)

    for name, section in result["sections"].items():
        if section.get("status") == "skipped":
            result["skipped"].append({"section": name, "reason": section.get("reason")})
    if "lm0" in args.sections and "ablation" in args.sections:
        result["ablation_comparisons"] = ablation_comparisons(result["sections"].get(section_name("lm0", args), {}),
                                                              result["sections"].get(section_name("ablation", args),
                                                                                     {}))
    if "lm0" in args.sections and "seed1" in args.sections:
        result["over_seeds"] = over_seeds(result["sections"].get(section_name("lm0", args), {}),
                                          result["sections"].get(section_name("seed1", args), {}))
    save()
    print(f"wrote {out_path} in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def run_wave(index: int, wave, share: float, args, result: dict, run_dir: Path, save) -> None:
    """Launch one worker per (section, variant) of ``wave``, size the sections' step counts from the workers'
    calibrations, and merge their files into ``result`` until they finish or the wave's time is up."""
    t_start = time.time()
    end = t_start + share  # wall clock: shared with the workers
    train_end = end - 4.0  # the workers' fit deadline; the rest is their last evaluation and files
    jobs = []
    go_path = run_dir / f"wave{index}.go.json"
    go_path.unlink(missing_ok=True)
    for key, variants in wave:
        name = section_name(key, args)
        section = result["sections"][name]
        section.update(wave=index, share_seconds=share, runs={})
        for variant in variants:
            job = job_name(name, variant)
            for suffix in (".json", ".jsonl", ".calib.json"):
                (run_dir / f"{job}{suffix}").unlink(missing_ok=True)
            spec = {"job": job, "section": name, "key": key, "variant": variant, "length": section["length"],
                    "seed": section["seed"], "budget": section["budget"], "args": {**vars(args), "job": None},
                    "run_dir": str(run_dir), "go": str(go_path), "train_end": train_end, "end": end}
            spec_path = run_dir / f"{job}.spec.json"
            spec_path.write_text(json.dumps(spec, default=str))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            log = open(run_dir / f"{job}.log", "w", encoding="utf-8")  # noqa: SIM115 - closed below
            if args.in_process:
                proc = InProcess(spec_path)
            else:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--job", str(spec_path)],
                                        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd())
            jobs.append({"job": job, "section": name, "variant": variant, "proc": proc, "log": log})
    print(f"wave {index}: {len(jobs)} workers, {share:.0f} s: " + ", ".join(j["job"] for j in jobs), flush=True)

    # calibration barrier: wait for every worker's calibration (or its exit) up to 40% of the share, then, while
    # a section has no calibrated worker at all, up to 70%
    calibrations: dict[str, dict] = {}
    while True:
        for j in jobs:
            path = run_dir / f"{j['job']}.calib.json"
            if j["job"] not in calibrations and path.exists():
                calibrations[j["job"]] = json.loads(path.read_text())
        pending = [j for j in jobs if j["job"] not in calibrations and j["proc"].poll() is None]
        if not pending:
            break
        elapsed = (time.time() - t_start) / share
        empty = any(not any(j["job"] in calibrations for j in jobs if j["section"] == section_name(key, args))
                    for key, _v in wave)
        if elapsed > 0.7 or (elapsed > 0.4 and not empty):
            break
        time.sleep(0.2)
    result["sections"][section_name(wave[0][0], args)]["calibration_wait_seconds"] = time.time() - t_start
    go: dict[str, int] = {}
    room = train_end - time.time()
    raw: dict[str, int] = {}
    for key, _variants in wave:
        name = section_name(key, args)
        section = result["sections"][name]
        mine = [j for j in jobs if j["section"] == name]
        ready = [j for j in mine if j["job"] in calibrations]
        section["calibration"] = {j["variant"]: calibrations[j["job"]] for j in ready}
        late = "not calibrated in time (40-70% of the wave's share)"
        section["dropped_for_time"] = [{"variant": j["variant"], "reason": late if j["proc"].poll() is None
                                        else "worker exited before its calibration"} for j in mine if j not in ready]
        if ready:
            step = max(calibrations[j["job"]]["step_seconds"] for j in ready)
            evaluation = max(calibrations[j["job"]]["eval_seconds"] for j in ready)
            raw[name] = int(SAFETY * (room - (args.eval_points + 2) * evaluation) / max(step, 1e-6))
        else:
            raw[name] = 0
    # the LM sections of one length (main, second seed, ablation) share one step count: they are compared
    group = {name: (result["sections"][name]["length"], result["sections"][name]["key"] == "passkey") for name in raw}
    for key, _variants in wave:
        name = section_name(key, args)
        section = result["sections"][name]
        mine = [j for j in jobs if j["section"] == name]
        ready = [j for j in mine if j["job"] in calibrations]
        steps = min(raw[n] for n in raw if group[n] == group[name])
        steps = min(args.max_steps, steps) if args.fixed_steps is None else args.fixed_steps
        # a group that trained in an earlier wave keeps its step count (comparisons need equal steps); the
        # deadline stops what does not fit, and the comparisons use the last step every run logged
        earlier = result.setdefault("group_steps", {})
        tag = f"{group[name][0]}{'-task' if group[name][1] else ''}"
        if earlier.get(tag, {}).get("wave", index) != index:
            steps = earlier[tag]["steps"]
            section["steps_from_wave"] = earlier[tag]["wave"]
        elif steps >= args.min_steps:
            earlier[tag] = {"steps": steps, "wave": index}
        section["steps"] = steps
        section["trained_variants"] = [j["variant"] for j in ready] if steps >= args.min_steps else []
        if steps < args.min_steps:
            section["status"] = "skipped"
            section["reason"] = (f"{len(ready)} of {len(mine)} variants calibrated; {room:.0f} s left of the wave "
                                 f"give {steps} steps < --min-steps {args.min_steps}")
        for j in mine:
            go[j["job"]] = steps if (j in ready and steps >= args.min_steps) else 0
    tmp = go_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"steps": go}))
    tmp.replace(go_path)
    print(f"wave {index}: steps " + ", ".join(f"{n}={result['sections'][n]['steps']}"
                                              for n in {j["section"] for j in jobs}), flush=True)
    save()

    # training: merge the workers' files every few seconds
    last_merge = 0.0
    while any(j["proc"].poll() is None for j in jobs) and time.time() < end + 20.0:
        if time.time() - last_merge > 5.0:
            merge(jobs, result, run_dir)
            save()
            last_merge = time.time()
        time.sleep(0.5)
    for j in jobs:
        if j["proc"].poll() is None:  # past the wave's end (+20 s grace): stop this worker (ours, by its pid)
            j["proc"].kill()
            j["proc"].wait()
            j["killed"] = True
        j["log"].close()
    merge(jobs, result, run_dir)
    for key, _variants in wave:
        name = section_name(key, args)
        section = result["sections"][name]
        if section.get("status") != "skipped":
            section["comparisons"] = comparisons(section, key == "passkey")
            section["status"] = "done"
    save()


class InProcess:
    """A worker on a thread of this process (``--in-process``: tests and debugging), with the three methods of
    ``subprocess.Popen`` the parent uses. It cannot be killed: it stops at its own deadline."""

    def __init__(self, spec_path: Path):
        import threading

        self.returncode: int | None = None
        self.thread = threading.Thread(target=self._run, args=(spec_path,), daemon=True)
        self.thread.start()

    def _run(self, spec_path: Path) -> None:
        record = worker(spec_path)
        self.returncode = 0 if record.get("status") in ("done", "dropped") else 1

    def poll(self) -> int | None:
        return None if self.thread.is_alive() else self.returncode

    def wait(self) -> int | None:
        self.thread.join()
        return self.returncode

    def kill(self) -> None:
        self.thread.join()


def merge(jobs: list[dict], result: dict, run_dir: Path) -> None:
    """Each worker's final JSON, or (still training / killed) its JSON-lines history so far."""
    for j in jobs:
        section = result["sections"][j["section"]]
        final = run_dir / f"{j['job']}.json"
        record = None
        if final.exists():
            try:
                record = json.loads(final.read_text())
            except json.JSONDecodeError:  # being replaced; the next merge reads it
                record = None
        if record is None or record.get("status") not in ("done", "error", "dropped"):
            lines = run_dir / f"{j['job']}.jsonl"
            history = []
            if lines.exists():
                for line in lines.read_text().splitlines():
                    try:
                        history.append(json.loads(line))
                    except json.JSONDecodeError:  # a line being written
                        break
            record = {**(record or {}), "status": "killed" if j.get("killed") else "running", "history": history}
        code = j["proc"].poll()
        record["exit_code"] = code
        if code not in (None, 0):
            record["log_tail"] = (run_dir / f"{j['job']}.log").read_text()[-3000:]
        if record.get("status") == "dropped":
            continue
        section["runs"][j["variant"]] = record


# ----------------------------------------------------------------------------------------------- worker
def worker(spec_path: Path) -> dict:
    """One (section, variant): data, calibration, wait for the step count, train, write its JSON."""
    spec = json.loads(spec_path.read_text())
    args = SimpleNamespace(**spec["args"])
    args.lengths = tuple(args.lengths)
    if not args.in_process:
        torch.set_num_threads(args.threads)
    run_dir, job, variant, length, seed = Path(spec["run_dir"]), spec["job"], spec["variant"], spec["length"], \
        spec["seed"]
    out = run_dir / f"{job}.json"
    record: dict = {"status": "setup", "variant": variant, "section": spec["section"], "pid": os.getpid()}
    t_start = time.perf_counter()

    def write(path: Path, data: dict) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, default=str))
        tmp.replace(path)

    def to_perf(wall: float) -> float:  # a wall-clock deadline on this process's perf_counter
        return time.perf_counter() + (wall - time.time())

    try:
        device = torch.device(args.device)
        dtype = {"bf16": torch.bfloat16, "fp32": None}[args.dtype]

        def context():
            return torch.autocast(device.type, dtype=dtype) if dtype is not None else \
                torch.autocast(device.type, enabled=False)

        task = spec["key"] == "passkey"
        budget = spec["budget"]
        dim, layers = budget["dim"], budget["layers"]
        if task:
            batch = args.task_batch
            data = passkey_data(args, length, budget, layers, seed)
            vocab = data["vocab"]
            record["task"] = data["info"]

            def batches():
                return ((x.to(device), y.to(device)) for x, y in
                        task_batches(data["train"][0], data["train"][1], batch, seed=seed))
        else:
            batch = max(1, args.tokens_per_step // length)
            batches, held, info = lm_data(args, length, batch, seed)
            vocab = 256
            record["data"] = info
        record["batch"] = batch

        def build():
            return make_model(variant, vocab, dim=dim, layers=layers, args=args, budget=budget, seed=seed)

        def evaluator(model):
            if task:
                point = {"held_accuracy": passkey_scores(model, data, context, small=True)["accuracy"]}
                if routers(model):
                    point.update({f"held_{k}": v for k, v in selection_metrics(model).items()})
                return point
            return curve_point(model, held, context)

        autocast = None if args.dtype == "fp32" else torch.bfloat16
        record["setup_seconds"] = time.perf_counter() - t_start
        write(out, record)
        # calibration: a throwaway model, the JIT in the first steps, the median of the later step times
        model = build()
        marks: list[float] = []

        def mark(_m):
            sync(args.device)
            marks.append(time.perf_counter())
            return {}

        steps = args.calibration_steps
        fit(model, batches(), steps=steps, lr=args.lr, warmup=1, log_every=1, evaluate_with=mark, autocast=autocast,
            **train_kwargs(variant, steps))
        t_eval = time.perf_counter()
        evaluator(model)
        sync(args.device)
        gaps = sorted(b - a for a, b in zip(marks[2:], marks[3:], strict=False)) or [marks[-1] - marks[0]]
        calib = {"seconds": time.perf_counter() - t_start, "setup_seconds": record["setup_seconds"],
                 "step_seconds": gaps[len(gaps) // 2], "eval_seconds": time.perf_counter() - t_eval,
                 "timed_steps": len(gaps)}
        del model
        write(run_dir / f"{job}.calib.json", calib)
        record.update(status="calibrated", calibration=calib)
        write(out, record)
        go_path = Path(spec["go"])
        while not go_path.exists():
            if time.time() > spec["end"]:
                raise TimeoutError("no step count from the parent before the wave's end")
            time.sleep(0.1)
        steps = json.loads(go_path.read_text())["steps"].get(job, 0)
        if steps < 1:
            record["status"] = "dropped"
            write(out, record)
            return record
        record.update(status="training", steps=steps)
        write(out, record)
        model = build()
        log_every = max(1, steps // args.eval_points)
        run = fit(model, batches(), steps=steps, lr=args.lr, warmup=max(1, steps // 10), log_every=log_every,
                  evaluate_with=evaluator, autocast=autocast, deadline=to_perf(spec["train_end"]),
                  log_path=run_dir / f"{job}.jsonl", **train_kwargs(variant, steps))
        record.update(steps_done=run["steps_done"], stopped_early=run["stopped_early"], seconds=run["seconds"],
                      history=run["history"], regularisers=regularisers_of(variant).__dict__)
        probe = (data["test"][0][:2] if task else held["austen"][0][0][:1]).to(device)
        record["keys_per_query"] = measured_keys(model, variant, probe, budget, context)
        if task:
            record["test"] = passkey_scores(model, data, context, small=False)
        else:
            record["final_losses"] = run["final"]["batch_losses"]  # fit logs the last step it trained
            record["final"] = {n: stats.estimate(v).to_dict() for n, v in record["final_losses"].items()}
        record["status"] = "done"
        print(f"{job}: {run['steps_done']} steps in {run['seconds']:.1f} s, final "
              f"{record.get('final', record.get('test', {}).get('accuracy'))}", flush=True)
    except Exception as exc:
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        print(traceback.format_exc(), flush=True)
    record["worker_seconds"] = time.perf_counter() - t_start
    write(out, record)
    return record


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- analysis
def common_step(runs: dict) -> int | None:
    """The last step at which every run logged held-out losses (all equal when none stopped early)."""
    sets = [{r["step"] for r in run.get("history", []) if "batch_losses" in r} for run in runs.values()]
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def losses_at(run: dict, step: int) -> dict:
    return next(r["batch_losses"] for r in run["history"] if r["step"] == step and "batch_losses" in r)


def comparisons(section: dict, task: bool) -> dict:
    """Paired comparisons on the same held-out batches (LM: lower loss wins, at the last step every variant
    reached) or test examples (task)."""
    runs = {k: v for k, v in section.get("runs", {}).items() if v.get("status") in ("done", "running", "killed")
            and v.get("history")}
    if task:
        runs = {k: v for k, v in runs.items() if "test" in v}
    out: dict = {}
    step = None if task else common_step(runs)
    if not task:
        out["at_step"] = step
        if step is None:
            return out
    for a in ("hierarchical", "learned-reg", "learned"):
        for b in ("dense", "window", "hierarchical", "learned", "pooled", "learned-reg", *ABLATION):
            if a == b or a not in runs or b not in runs or f"{b}_vs_{a}" in out:
                continue
            if task:
                out[f"{a}_vs_{b}"] = stats.compare(runs[a]["test"]["per_example"],
                                                   runs[b]["test"]["per_example"]).to_dict()
            else:
                la, lb = losses_at(runs[a], step), losses_at(runs[b], step)
                out[f"{a}_vs_{b}"] = {c: stats.compare(la[c], lb[c], higher_is_better=False).to_dict() for c in la}
    return out


def ablation_comparisons(main: dict, ablation: dict) -> dict:
    """Each regulariser alone against ``learned`` (none) and ``learned-reg`` (all) of the main section, on the
    same held-out batches at the last step all of them logged (both sections train the same step count)."""
    if not main.get("steps") or main.get("steps") != ablation.get("steps"):
        return {"skipped": f"the sections trained different step counts ({main.get('steps')} vs "
                           f"{ablation.get('steps')}) or one did not train"}
    runs = {k: v for k, v in {**main.get("runs", {}), **ablation.get("runs", {})}.items()
            if k.startswith("learned") and v.get("history")}
    step = common_step(runs)
    out: dict = {"at_step": step}
    if step is None:
        return out
    for a in ABLATION:
        for b in ("learned", "learned-reg"):
            if a in runs and b in runs:
                la, lb = losses_at(runs[a], step), losses_at(runs[b], step)
                out[f"{a}_vs_{b}"] = {c: stats.compare(la[c], lb[c], higher_is_better=False).to_dict() for c in la}
    return out


def over_seeds(first: dict, second: dict) -> dict:
    """Per variant and corpus: the mean over seeds with a two-level bootstrap (seeds, then eval batches), when
    both seeds trained the same step count."""
    if not first.get("steps") or first.get("steps") != second.get("steps"):
        return {"skipped": f"the seeds trained different step counts ({first.get('steps')} vs "
                           f"{second.get('steps')}) or one did not train"}
    out = {}
    for variant, run in first.get("runs", {}).items():
        other = second.get("runs", {}).get(variant)
        if "final_losses" not in run or not other or "final_losses" not in other:
            continue
        if run.get("steps_done") != other.get("steps_done"):
            continue
        out[variant] = {c: stats.seed_interval([run["final_losses"][c], other["final_losses"][c]]).to_dict()
                        for c in run["final_losses"]}
    return out


def plot(path: Path, figure: Path) -> dict:
    """Held-out loss curves (per LM section and corpus, intervals shaded) and the routers' held-out collapse
    metrics along the curve, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    lm = [(n, s) for n, s in data["sections"].items() if s.get("key") in ("lm0", "lm1", "ablation", "seed1")
          and s.get("runs")]
    tasks = [(n, s) for n, s in data["sections"].items() if s.get("key") == "passkey" and s.get("runs")]
    rows = max(1, len(lm) + len(tasks))
    fig, axes = plt.subplots(rows, 4, figsize=(19, 3.6 * rows), squeeze=False)
    for row, (name, section) in enumerate(tasks, start=len(lm)):
        ax = axes[row][0]
        for variant, run in section["runs"].items():
            pts = [r for r in run.get("history", []) if "held_accuracy" in r]
            if pts:
                ax.plot([r["step"] + 1 for r in pts], [r["held_accuracy"] for r in pts], marker=".", label=variant)
        ax.set_title(f"{name}: held-out pass-key accuracy (64 examples)")
        ax.set_xlabel("step")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
        for col in (1, 2, 3):
            axes[row][col].axis("off")
    main = next((s for s in data["sections"].values() if s.get("key") == "lm0"), {})
    for row, (name, section) in enumerate(lm):
        if section.get("key") == "ablation":  # beside none and all of the regularisers (the main section's runs)
            section = {**section, "runs": {**{k: v for k, v in main.get("runs", {}).items()
                                              if k in ("learned", "learned-reg")}, **section["runs"]}}
        for col, corpus in enumerate(("austen", "kjv")):
            ax = axes[row][col]
            late = (section.get("steps") or 0) // 5  # the first fifth (loss 5.5 -> 1.5) hides the differences
            for variant, run in section["runs"].items():
                pts = [r for r in run.get("history", []) if f"{corpus}_loss" in r and r["step"] >= late]
                if not pts:
                    continue
                x = [r["step"] + 1 for r in pts]
                y = [r[f"{corpus}_loss"]["value"] for r in pts]
                ax.plot(x, y, marker=".", label=variant)
                ax.fill_between(x, [r[f"{corpus}_loss"]["low"] for r in pts],
                                [r[f"{corpus}_loss"]["high"] for r in pts], alpha=0.2)
            ax.set_title(f"{name}: held-out {corpus} (nats/byte), 95% CI")
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        for col, metric in ((2, "held_distinct_blocks"), (3, "held_gate_entropy")):
            ax = axes[row][col]
            for variant, run in section["runs"].items():
                pts = [r for r in run.get("history", []) if metric in r]
                if pts:
                    ax.plot([r["step"] + 1 for r in pts], [r[metric] for r in pts], marker=".", label=variant)
            ax.set_title(f"{name}: {metric.removeprefix('held_')} (held-out)")
            ax.set_xlabel("step")
            ax.set_xscale("log")
            if ax.lines:
                ax.legend(fontsize=7)
    machine = data["machine"]
    fig.suptitle(f"train_from_scratch, {machine.get('device')}, commit {str(machine.get('git_commit'))[:10]}")
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=72)
    print(f"wrote {figure}")
    table = summary(data)
    print(table)
    return {"figure": str(figure), "summary": table}


def summary(data: dict) -> str:
    """Markdown tables of a run: per section and variant the steps, the held-out losses at the comparison step
    (or the pass-key accuracy), the keys per query, and the routers' held-out collapse metrics at the first and
    last curve points."""
    def interval(e: dict | None) -> str:
        return "–" if not e else f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"

    lines = []
    for name, section in data["sections"].items():
        runs = section.get("runs") or {}
        if not runs:
            lines += [f"**{name}**: {section.get('status')} ({section.get('reason', 'no runs')})", ""]
            continue
        step = (section.get("comparisons") or {}).get("at_step")
        task = section.get("key") == "passkey"
        lines.append(f"**{name}** ({section.get('steps')} steps each, batch {next(iter(runs.values())).get('batch')}"
                     + ("" if task else f", compared at step {step}") + ")")
        lines.append("")
        if task:
            lines += ["| variant | steps done | accuracy | far accuracy | keys/query |", "|---|---|---|---|---|"]
        else:
            lines += ["| variant | steps done | Austen loss | KJV loss | keys/query | distinct blocks (held) | "
                      "gate entropy (held) |", "|---|---|---|---|---|---|---|"]
        for variant, run in runs.items():
            keys = run.get("keys_per_query") or {}
            kpq = keys.get("branches_total", keys.get("mean"))
            if kpq is None:
                kpq = section.get("budget", {}).get("keys_per_query", {}).get(variant.split("+")[0])
            kpq = "–" if kpq is None else f"{kpq:.0f}"
            done = run.get("steps_done", f"{run.get('status')}")
            if task:
                test = run.get("test") or {}
                lines.append(f"| {variant} | {done} | {interval(test.get('accuracy'))} | "
                             f"{interval(test.get('far_accuracy'))} | {kpq} |")
                continue
            point = next((r for r in run.get("history", []) if r["step"] == step), None) or {}
            curve = [r for r in run.get("history", []) if "held_distinct_blocks" in r]

            def ends(metric, curve=curve):
                return "–" if not curve else f"{curve[0][metric]:.2f} → {curve[-1][metric]:.2f}"

            lines.append(f"| {variant} | {done} | {interval(point.get('austen_loss'))} | "
                         f"{interval(point.get('kjv_loss'))} | {kpq} | {ends('held_distinct_blocks')} | "
                         f"{ends('held_gate_entropy')} |")
        lines.append("")
    return "\n".join(lines)


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
