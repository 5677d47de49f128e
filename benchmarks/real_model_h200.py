"""Real-model evidence with SmolLM2-135M on one GPU: long-context retrieval (issue 13) and distilled gates (issue 14).

One script, one GPU call (about 6 device minutes on one H200 with the defaults):

    PYTHONPATH=src python benchmarks/real_model_h200.py --time-budget 330 --out $OUT/real_model              # H200
    PYTHONPATH=src python benchmarks/real_model_h200.py --quick --device cpu --out /tmp/real_model_quick    # smoke

0. Correctness: the model patched with spattn full attention against its own attention (SDPA) on a held-out
   chunk: next-token argmax agreement and the largest logit difference; the gate against its float64
   reference. The run stops if either fails.
1. Retrieval (#13): pass key and RULER-style variable tracking in Austen at ``--lengths`` x ``--depths`` x
   ``--seeds``. Dense first on the whole grid; the plans run only in the cells where dense itself succeeds
   (accuracy >= ``--dense-threshold``), paired with dense on the same samples. Plans at 12% of the keys
   (``--budget``: keys per query = 12% of the context length): ``Sinks(64) | Window(budget - 64)`` (the best
   sinks + window split at 12% in ``docs/selection.md``) and ``Adaptive("probe", budget, sinks=64, window=64,
   block=32)``. A depth x length heatmap PNG per task (``spattn.eval.figures``).
2. Distilled gates (#14): SeerAttention gates for all 30 layers on Austen calibration chunks at
   ``--distil-length`` (``spattn.learned.distill``, the ``spattn train distil`` path; default: the longest of
   ``--ppl-lengths``, because a gate reads rotary queries and keys and is not trained for positions past its
   chunks: gates distilled at 4096 closed 84% of the gap at 4096 and none at 8192, ``docs/learned.md``); then,
   on held-out Austen and KJV at each of ``--ppl-lengths``, block recall of the gates against the oracle top-k
   and the window at the same block budget, and perplexity for dense / window / gates at that budget: the share
   of the window -> dense gap the gates close (``spattn.eval.stats.gap_closed``, paired bootstrap over chunks).

``--time-budget SECONDS`` covers the whole script: before each step the time it needs is estimated from what
ran before, and a step that would not fit is skipped and listed under ``skipped``. Results are written to
``OUT/real_model.json`` after every step (a killed run keeps what it measured), with card, versions (torch,
triton, transformers), git commit and the command.
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
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import spattn
from spattn.bench.env import machine_info, versions
from spattn.bench.timing import TimeBudget
from spattn.coverage import measure, oracle_layout
from spattn.data import text_chunks
from spattn.data.corpora import load_text
from spattn.eval import stats
from spattn.eval.retrieval import make_samples, retrieval_grid
from spattn.integrations import Plan, patched
from spattn.integrations.capture import capture
from spattn.integrations.models import load_smollm2
from spattn.learned import distill, load


def correctness(model, tokenizer, length: int, backend: str) -> dict[str, Any]:
    """spattn full attention == the model's own attention; the gate == its float64 reference."""
    from spattn.learned import BlockGate

    device = next(model.parameters()).device
    ids = text_chunks("austen", tokenizer, length, split="held_out", max_chunks=1).to(device)
    with torch.no_grad():
        own = model(input_ids=ids).logits.float()
        with patched(model, None, backend=backend, block_size=64):
            ours = model(input_ids=ids).logits.float()
    agreement = float((own.argmax(-1) == ours.argmax(-1)).float().mean())
    difference = float((own - ours).abs().max())
    gate = BlockGate(9, 3, 64, block_size=64, hidden=64).to(device)
    q, k = torch.randn(1, 9, length, 64, device=device), torch.randn(1, 3, length, 64, device=device)
    with torch.no_grad():
        gate_error = float((gate(q, k).double().cpu() - gate.cpu().reference(q.cpu(), k.cpu())).abs().max())
    result = {"length": length, "top1_agreement": agreement, "max_logit_difference": difference,
              "gate_max_error": gate_error}
    result["passed"] = agreement >= 0.995 and gate_error < 1e-3
    return result


# ---------------------------------------------------------------------------------------------- 1. retrieval
def budget_keys(length: int, share: float) -> int:
    return max(128, int(round(share * length)))


def retrieval_plans(length: int, share: float) -> dict[str, Any]:
    keys = budget_keys(length, share)
    return {
        "sinks+window": spattn.Sinks(64) | spattn.Window(keys - 64),
        "adaptive": spattn.Adaptive("probe", keys, sinks=64, window=64, block=32),
    }


def retrieval_task(task: str, model, tokenizer, haystack: str, args, clock: TimeBudget, record: dict, save) -> None:
    entry: dict[str, Any] = {"lengths": {}, "budget_share": args.budget}
    record["retrieval"][task] = entry
    depths = [float(d) for d in args.depths.split(",")]
    seeds = list(range(args.seeds))
    estimate = None  # seconds of the last length, doubled per length step
    for length in [int(x) for x in args.lengths.split(",")]:
        if estimate is not None and estimate * 2.2 > clock.left() - args.reserve:
            record["skipped"].append(f"retrieval/{task}/{length}: needs ~{estimate * 2.2:.0f} s, "
                                     f"{clock.left() - args.reserve:.0f} s left before the distillation reserve")
            break
        started = time.perf_counter()
        samples = make_samples(task, tokenizer, haystack, [length], depths, seeds)
        dense = retrieval_grid(model, tokenizer, samples, {"dense": None}, backend=args.backend, block_size=128)
        cells = dense["plans"]["dense"]["cells"]
        good = {round(c["depth"], 4) for c in cells if c["value"] >= args.dense_threshold}
        row: dict[str, Any] = {"dense": dense["plans"]["dense"], "dense_succeeds_at_depths": sorted(good)}
        subset = [s for s in samples if round(s.depth, 4) in good]
        if subset:
            plans = {"dense": None, **retrieval_plans(length, args.budget)}
            row["plans"] = retrieval_grid(model, tokenizer, subset, plans, backend=args.backend,
                                          block_size=128)["plans"]
            row["keys_per_query"] = budget_keys(length, args.budget)
        row["seconds"] = time.perf_counter() - started
        entry["lengths"][str(length)] = row
        estimate = row["seconds"]
        found = {name: f"{p['found']}/{p['samples']}" for name, p in row.get("plans", {"dense": row["dense"]}).items()}
        print(f"{task} {length}: dense succeeds at depths {sorted(good)}; {found} ({row['seconds']:.0f} s)",
              flush=True)
        save()
    summarise_retrieval(entry)
    try:
        from spattn.eval.figures import heatmap_figure

        panels = {"dense": [c for r in entry["lengths"].values() for c in r["dense"]["cells"]]}
        for name in ("sinks+window", "adaptive"):
            cells = [c for r in entry["lengths"].values() for c in r.get("plans", {}).get(name, {}).get("cells", [])]
            if cells:
                panels[f"{name} (12% keys, where dense succeeds)"] = cells
        entry["figure"] = str(heatmap_figure(panels, Path(args.out) / f"{task}-heatmap.png",
                                             title=f"SmolLM2-135M {task}, Austen"))
    except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
        entry["figure_error"] = f"{type(exc).__name__}: {exc}"
    save()


def summarise_retrieval(entry: dict[str, Any]) -> None:
    """Over every length: each plan's accuracy where dense succeeds, paired with dense on those samples."""
    scores: dict[str, list[float]] = {}
    for row in entry["lengths"].values():
        for name, plan in row.get("plans", {}).items():
            scores.setdefault(name, []).extend(float(s["correct"]) for s in plan["per_sample"])
    summary: dict[str, Any] = {}
    for name, values in scores.items():
        summary[name] = {"accuracy": stats.estimate(values).to_dict(), "samples": len(values)}
        if name != "dense":
            summary[name]["versus_dense"] = stats.compare(values, scores["dense"]).to_dict()
    entry["summary_where_dense_succeeds"] = summary


# ---------------------------------------------------------------------------------------------- 2. gates
def chunk_nll(model, chunk: torch.Tensor, plan: Plan | None, backend: str, block_size: int) -> float:
    """Mean next-token loss (nats) of one chunk ``[L]``, dense (``None``: the model's own attention) or a plan."""
    ids = chunk[None].to(next(model.parameters()).device)
    with torch.no_grad():
        if plan is None:
            logits = model(input_ids=ids).logits
        else:
            with patched(model, plan, backend=backend, block_size=block_size):
                logits = model(input_ids=ids).logits
    return float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


def block_recall(model, chunk: torch.Tensor, gates_path: Path, layers: list[int], budget: int, block_size: int
                 ) -> dict[str, list[float]]:
    """Per layer: true recall (kept share of the dense softmax mass) of the gate, the oracle top-k and the
    window, each keeping ``budget`` key blocks per query block."""
    device = next(model.parameters()).device
    cap = capture(model, chunk[None].to(device), layers=layers, mode="full", block_size=block_size)
    out: dict[str, list[float]] = {"gate": [], "oracle": [], "window": []}
    for layer in layers:
        q, k = cap.queries[layer].to(device), cap.keys[layer].to(device)
        gate = spattn.TopK(load(gates_path, layer), budget)
        window = spattn.Window((budget - 1) * block_size)
        for name, pattern in (("gate", gate), ("window", window)):
            out[name].append(float(measure(q, k, pattern, causal=True, topk=0, block_size=block_size).recall.mean()))
        oracle = oracle_layout(q, k, budget=budget, block_size=block_size, causal=True)
        out["oracle"].append(float(measure(q, k, oracle, causal=True, topk=0).recall.mean()))
        del q, k
    return out


def gates_section(model, tokenizer, args, clock: TimeBudget, record: dict, save) -> None:
    entry: dict[str, Any] = {}
    record["gates"] = entry
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    bs, budget = args.block_size, args.budget_blocks
    started = time.perf_counter()
    train = text_chunks("austen", tokenizer, args.distil_length, split="calibration", max_chunks=args.train_chunks)
    gates_path = Path(args.out) / "gates.safetensors"
    gates = distill(model, train, block_size=bs, hidden=64, steps=args.distil_steps, lr=1e-3, layers=layers,
                    path=gates_path, device=next(model.parameters()).device)
    wanted = sorted(gates)
    entry.update(layers=wanted, train_chunks=int(train.shape[0]), distil_length=args.distil_length,
                 steps=args.distil_steps, block_size=bs, budget_blocks=budget,
                 distil_seconds=time.perf_counter() - started, gates=str(gates_path),
                 budget_note=f"every sparse variant keeps {budget} key blocks of {bs} per query block (causal)")
    print(f"distilled {len(wanted)} gates in {entry['distil_seconds']:.0f} s", flush=True)
    save()
    plans = {"dense": None,
             "window": Plan(layers={i: spattn.Window((budget - 1) * bs) for i in wanted}),
             "gate": Plan(layers={i: spattn.TopK(load(gates_path, i), budget) for i in wanted})}
    entry["recall"], entry["perplexity"] = {}, {}
    corpora = args.eval_corpora.split(",")
    lengths = [int(x) for x in args.ppl_lengths.split(",")]
    estimate, estimate_length = None, 1  # seconds of the last row and its length (rows scale ~linearly here)
    for length, corpus in ((n, c) for n in lengths for c in corpora):  # block recall, keyed "corpus/length"
        need = None if estimate is None else estimate * length / estimate_length * 1.2
        if need is not None and need > clock.left():
            record["skipped"].append(f"gates/recall/{corpus}/{length}: needs ~{need:.0f} s, {clock.left():.0f} s left")
            continue
        held = text_chunks(corpus, tokenizer, length, split="held_out", max_chunks=args.eval_chunks)
        t = time.perf_counter()
        per_chunk = [block_recall(model, c, gates_path, wanted, budget, bs) for c in held]
        means = {name: [sum(r[name]) / len(r[name]) for r in per_chunk] for name in ("gate", "oracle", "window")}
        row = {name: {"mean": stats.estimate(v).to_dict(),
                      "per_layer": [sum(r[name][i] for r in per_chunk) / len(per_chunk) for i in range(len(wanted))]}
               for name, v in means.items()}
        row["gate_over_oracle"] = sum(means["gate"]) / max(sum(means["oracle"]), 1e-12)
        row["gate_versus_window"] = stats.compare(means["gate"], means["window"]).to_dict()
        row.update(chunks=int(held.shape[0]), length=int(held.shape[1]), seconds=time.perf_counter() - t)
        estimate, estimate_length = row["seconds"], length
        entry["recall"][f"{corpus}/{length}"] = row
        print(f"recall {corpus} {length}: gate {row['gate']['mean']['value']:.3f}, "
              f"oracle {row['oracle']['mean']['value']:.3f}, window {row['window']['mean']['value']:.3f}", flush=True)
        save()
    estimate, estimate_length = None, 1  # seconds of the last perplexity row and its length
    for length in lengths:
        for corpus in corpora:
            need = None if estimate is None else estimate * length / estimate_length * 1.2
            if need is not None and need > clock.left():
                record["skipped"].append(f"gates/perplexity/{corpus}/{length}: needs ~{need:.0f} s, "
                                         f"{clock.left():.0f} s left")
                continue
            t = time.perf_counter()
            held = text_chunks(corpus, tokenizer, length, split="held_out", max_chunks=args.eval_chunks)
            nll = {name: [chunk_nll(model, c, plan, args.backend, bs) for c in held] for name, plan in plans.items()}
            row = {"chunks": int(held.shape[0]), "length": length,
                   "perplexity": {n: math.exp(sum(v) / len(v)) for n, v in nll.items()},
                   "nll_per_chunk": nll,
                   "gap_closed": stats.gap_closed(nll["gate"], nll["window"], nll["dense"]).to_dict(),
                   "gate_versus_window": stats.compare(nll["gate"], nll["window"], higher_is_better=False).to_dict()}
            row["seconds"] = estimate = time.perf_counter() - t
            estimate_length = length
            entry["perplexity"][f"{corpus}/{length}"] = row
            ppl = {n: round(v, 3) for n, v in row["perplexity"].items()}
            print(f"perplexity {corpus} {length}: {ppl}; gap closed {row['gap_closed']['value']:.2f} "
                  f"[{row['gap_closed']['low']:.2f}, {row['gap_closed']['high']:.2f}]", flush=True)
            save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="spattn backend (default: auto on CUDA, reference on CPU)")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds for the whole script")
    parser.add_argument("--tasks", default="passkey,variable_tracking")
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="0.1,0.5,0.9")
    parser.add_argument("--seeds", type=int, default=4, help="samples per (length, depth) cell")
    parser.add_argument("--budget", type=float, default=0.12, help="plans' keys per query, share of the length")
    parser.add_argument("--dense-threshold", type=float, default=0.5,
                        help="a cell where dense accuracy reaches this is one where dense succeeds")
    parser.add_argument("--reserve", type=float, default=150.0,
                        help="seconds the retrieval leaves for the gates (distillation, recall, perplexity)")
    parser.add_argument("--distil-length", type=int, default=None,
                        help="tokens per distillation chunk (default: the longest of --ppl-lengths)")
    parser.add_argument("--distil-steps", type=int, default=200)
    parser.add_argument("--train-chunks", type=int, default=4)
    parser.add_argument("--eval-chunks", type=int, default=4, help="held-out chunks per corpus")
    parser.add_argument("--eval-corpora", default="austen,kjv")
    parser.add_argument("--ppl-lengths", default="4096,8192")
    parser.add_argument("--block-size", type=int, default=64, help="gate block size")
    parser.add_argument("--budget-blocks", type=int, default=8, help="key blocks per query block (gates)")
    parser.add_argument("--layers", default=None, help="comma-separated layers to distil (default all 30)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: retrieval,gates")
    parser.add_argument("--quick", action="store_true", help="512 tokens, 2 layers, few samples (CPU smoke run)")
    parser.add_argument("--out", default="real_model")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.depths, args.seeds = "256,512", "0.1,0.9", 1
        args.distil_length, args.ppl_lengths, args.distil_steps = 512, "512", 5
        args.train_chunks, args.eval_chunks, args.layers, args.budget_blocks = 1, 2, args.layers or "0,1", 4
        args.reserve = min(args.reserve, 60.0)
    if args.distil_length is None:  # a gate is trained only for the positions of its chunks
        args.distil_length = max(int(x) for x in args.ppl_lengths.split(","))
    clock = TimeBudget(args.time_budget)
    args.backend = args.backend or ("auto" if args.device.startswith("cuda") else "reference")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    record: dict[str, Any] = {
        "benchmark": "real_model_h200", "model": "SmolLM2-135M", "machine": machine,
        "versions": {"spattn": spattn.__version__, **versions()}, "commit": machine.get("git_commit"),
        "command": machine.get("command"), "device": args.device, "backend": args.backend,
        "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "quick": args.quick, "time_budget": args.time_budget, "arguments": vars(args), "retrieval": {},
        "skipped": [],
    }

    def save() -> None:
        record["seconds"] = clock.spent()
        path = out / "real_model.json"
        path.with_suffix(".tmp").write_text(json.dumps(record, indent=1, default=str))
        os.replace(path.with_suffix(".tmp"), path)

    save()
    model, tokenizer = load_smollm2(device=args.device)  # float32, as spattn train distil
    record["dtype"] = str(next(model.parameters()).dtype)
    record["load_seconds"] = clock.spent()
    record["correctness"] = correctness(model, tokenizer, 512 if args.quick else 1024, args.backend)
    print(f"correctness: {record['correctness']}", flush=True)
    save()
    if not record["correctness"]["passed"]:
        raise SystemExit("correctness check failed: nothing measured")
    skip = set(args.skip.split(","))
    if "retrieval" not in skip:
        haystack = load_text("austen")
        for task in args.tasks.split(","):
            try:
                retrieval_task(task, model, tokenizer, haystack, args, clock, record, save)
            except Exception as exc:  # noqa: BLE001 - keep what was measured
                record["retrieval"][task] = {**record["retrieval"].get(task, {}), "traceback": traceback.format_exc(),
                                             "error": f"{type(exc).__name__}: {exc}"}
                print(record["retrieval"][task]["traceback"], flush=True)
                save()
    if "gates" not in skip:
        try:
            gates_section(model, tokenizer, args, clock, record, save)
        except Exception as exc:  # noqa: BLE001
            record.setdefault("gates", {})["error"] = f"{type(exc).__name__}: {exc}"
            record["gates"]["traceback"] = traceback.format_exc()
            print(record["gates"]["traceback"], flush=True)
    save()
    if record["skipped"]:
        print("skipped:", *record["skipped"], sep="\n  ")
    print(f"wrote {out / 'real_model.json'} in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
