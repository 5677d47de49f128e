"""Planner, held out: the per-head plan against the best uniform patterns at equal cost (SmolLM2-135M).

For each length (default 4096 and 8192): calibrate the candidate table once on the calibration split of Austen
(the ``spattn plan`` path: :func:`spattn.planner.make_plan`), solve it at each budget, and evaluate the plan and
the ``--uniform-top`` best uniform patterns that fit the same budget (same candidate in every head, ranked by
calibration score) on text the planner never saw:

* held-out Austen and KJV (domain shift: the plan is calibrated on Austen): per-chunk perplexity (NLL), mean
  KL(dense || sparse) of the next-token distributions, top-1 agreement with the dense model;
* recall (attention mass kept) per head on the same held-out chunks, with the *measured* keys per query and
  visited-tile fraction of each configuration (the equal-cost check: dynamic selection's cost follows the input);
* pass-key retrieval (``spattn.eval.retrieval``) in held-out Austen at several depths;
* paired comparisons plan minus uniform (``spattn.eval.stats.compare``: percentile bootstrap over chunks, over
  heads for recall, over samples for retrieval; ``tie`` when the interval holds 0).

Then (``--latency-length``, CUDA) measured-latency plans against FLOP plans at the same millisecond budget
(a latency table timed on this device; the FLOP plan is the largest tile budget whose predicted time fits),
both *measured*: attention time over all layers, whole-forward time, recall, held-out perplexity and KL.

Order (most important first), each result written to the JSON as soon as it exists; ``--time-budget`` skips
what would not fit (estimated from the steps already timed) and records what was skipped. A correctness gate
(a planned layer through the backend against the float64 oracle, ``spattn.testing``) runs before anything is
kept; if it fails, nothing is measured.

    # H200 (the lead's run)
    PYTHONPATH=src python benchmarks/planner_heldout.py --device cuda --time-budget 330 --out $OUT/planner_heldout.json
    # CPU dry run (tiny)
    PYTHONPATH=src python benchmarks/planner_heldout.py --device cpu --quick --out /tmp/planner_heldout.json
    # CPU at 1k, reusing the committed 1k table
    PYTHONPATH=src python benchmarks/planner_heldout.py --device cpu --lengths 1024 --block-size 64 \
        --table benchmarks/results/cpu/planner/smollm2_austen_1k.table.npz --budgets "52 keys;128 keys" \
        --eval-chunks 2 --shift-chunks 2 --passkey-depths 0.2,0.5,0.8 --uniform-top 1 --skip latency \
        --out benchmarks/results/cpu/planner/heldout_1k.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # planner_h200's timing helpers

from planner_h200 import attention_ms, flop_plan_within_ms, forward_ms, gate  # noqa: E402

import spattn  # noqa: E402
from spattn.bench.env import machine_info  # noqa: E402
from spattn.bench.record import finish, record_error
from spattn.data import text_chunks  # noqa: E402
from spattn.eval.retrieval import make_samples, retrieval_accuracy  # noqa: E402
from spattn.eval.stats import compare  # noqa: E402
from spattn.integrations.models import load_smollm2  # noqa: E402
from spattn.patterns import Full  # noqa: E402
from spattn.planner import CandidateTable, InfeasibleBudget, LatencyTable, make_plan  # noqa: E402
from spattn.planner.calibrate import capture_sample  # noqa: E402
from spattn.planner.score import score_layouts  # noqa: E402
from spattn.planner.table import dense_tiles  # noqa: E402
from spattn.planner.validate import plan_layouts  # noqa: E402


class Clock:
    """The time budget: what is left, and estimates of steps from the ones already timed."""

    def __init__(self, budget: float | None) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.timed: dict[str, list[tuple[int, float]]] = {}
        self.until = 1.0  # the current section ends at this fraction of the budget (after the setup)
        self.setup = 0.0

    def setup_done(self) -> None:
        """Sections share what is left of the budget once the model is loaded."""
        self.setup = time.perf_counter() - self.start

    def section(self, until: float) -> None:
        """Steps from now on must end by ``until`` x the budget (later sections keep their share; what an
        earlier section leaves rolls over)."""
        self.until = until

    def left(self) -> float:
        if self.budget is None:
            return math.inf
        end = self.setup + (self.budget - self.setup) * self.until
        return end - (time.perf_counter() - self.start)

    def record(self, kind: str, length: int, seconds: float) -> None:
        self.timed.setdefault(kind, []).append((length, seconds))

    def estimate(self, kind: str, length: int, default: float = 0.0) -> float:
        """The last timing of ``kind`` at ``length``, else one at another length scaled by ``(ratio)^1.5`` (between
        the linear layers and the attention), else ``default``."""
        same = [s for L, s in self.timed.get(kind, []) if L == length]
        if same:
            return same[-1]
        other = self.timed.get(kind, [])
        if other:
            L, s = other[-1]
            return s * (length / L) ** 1.5
        return default

    def fits(self, kind: str, length: int, out: dict, what: str, default: float = 0.0) -> bool:
        need, left = self.estimate(kind, length, default), self.left()
        if need <= left:
            return True
        out["skipped"].append({"what": what, "estimated_seconds": round(need, 1), "seconds_left": round(left, 1)})
        print("skip", what, f"(needs ~{need:.0f} s, {left:.0f} s left)", flush=True)
        return False


def phase(out: dict, name: str, since: float) -> None:
    """Record (and print) the seconds of one phase of the run since ``since`` (``perf_counter``)."""
    seconds = round(time.perf_counter() - since, 2)
    out.setdefault("phase_seconds", {})[name] = seconds
    print(f"[phase] {name}: {seconds:.1f} s", flush=True)


def save(out: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)


def lm_rows(model, chunks, plan, backend, block_size, dense_cache, device):
    """Per chunk: sparse NLL per token, mean KL(dense || sparse), top-1 agreement (dense = the model's own
    attention, cached per chunk); ``plan=None`` gives the dense rows."""
    rows = []
    for n in range(chunks.shape[0]):
        ids = chunks[n : n + 1].to(device)
        with torch.no_grad():
            if n not in dense_cache:
                dense_cache[n] = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            log_d = dense_cache[n]
            if plan is None:
                log_s = log_d
            else:
                with spattn.patched(model, plan, backend=backend, block_size=block_size):
                    log_s = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            target = ids[0, 1:]
            rows.append({"nll": float(F.nll_loss(log_s, target)),
                         "kl": float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).mean()),
                         "top1": float((log_d.argmax(-1) == log_s.argmax(-1)).float().mean())})
    return rows


def lm_summary(rows):
    n = len(rows)
    return {"perplexity": math.exp(sum(r["nll"] for r in rows) / n), "mean_kl": sum(r["kl"] for r in rows) / n,
            "top1_agreement": sum(r["top1"] for r in rows) / n, "chunks": n,
            "per_chunk": [{k: round(v, 6) for k, v in r.items()} for r in rows]}


def capture_chunks(model, chunks):
    """Queries and keys per layer of every chunk (kept on the model's device)."""
    return [capture_sample(model, chunks[n : n + 1], values=False)[0] for n in range(chunks.shape[0])]


def measured_recall(captures, plans, block_size, device):
    """Per configuration: recall per head (mean over chunks) and the measured keys per query and tile fraction,
    all configurations scored from one dense pass per layer and chunk (``score_layouts``)."""
    P = len(plans)
    L = captures[0].queries[captures[0].layers[0]].shape[2]
    per_head = [[] for _ in range(P)]
    keys = [0.0] * P
    tiles = [0.0] * P
    dense = dense_tiles(L, block_size, captures[0].causal)
    static: dict = {}  # static layouts compiled once (as spattn.patched does)
    for cap in captures:
        chunk_rows = [[] for _ in range(P)]
        for layer in cap.layers:
            q, k = cap.queries[layer].to(device), cap.keys[layer].to(device)
            H = q.shape[1]
            layouts = []
            for p in plans:
                pattern = p.pattern_for(layer) or Full()
                if pattern.contains_dynamic():  # selection follows the input
                    layouts.append(plan_layouts(p, layer, q, k, causal=cap.causal, block_size=block_size))
                    continue
                key = (pattern, L, cap.causal, block_size, H, str(q.device))
                if key not in static:
                    static[key] = plan_layouts(p, layer, q, k, causal=cap.causal, block_size=block_size)
                layouts.append(static[key])
            rec = score_layouts(q, k, layouts, causal=cap.causal, scale=cap.scale).recall[:, 0].double().mean(-1)
            for i, lay in enumerate(layouts):
                chunk_rows[i].append(rec[i].cpu())
                keys[i] += float((lay.allowed_pairs()[0] / L).expand(H).mean())
                visited = (lay.kv_num_blocks + lay.full_kv_num_blocks).double().sum(-1)[0]
                tiles[i] += float((visited / dense).expand(H).mean())
        for i in range(P):
            per_head[i].append(torch.stack(chunk_rows[i]))  # [layers, H]
    n = len(captures) * len(captures[0].layers)
    out = []
    for i in range(P):
        heads = torch.stack(per_head[i]).mean(0)  # [layers, H]
        out.append({"recall": float(heads.mean()), "recall_p5": float(heads.flatten().quantile(0.05)),
                    "keys_per_query": keys[i] / n, "tile_fraction": tiles[i] / n,
                    "per_head": heads.flatten().tolist()})
    return out


def paired(a, b, key, higher_is_better):
    return compare([r[key] for r in a], [r[key] for r in b], higher_is_better=higher_is_better).to_dict()


def first_feasible(table, budgets):
    """The plan of the first budget that fits (the correctness gate's plan)."""
    for budget in budgets:
        try:
            return make_plan(None, None, budget=budget, table=table)
        except InfeasibleBudget:
            continue
    return make_plan(None, None, budget=1.0, table=table)


def parse_budget(text):
    text = text.strip()
    return float(text) if text.replace(".", "", 1).isdigit() else text


def calibrate(L, args, ctx, out, clock):
    """The candidate table at ``L`` (calibration split of Austen, or a saved table); None when skipped."""
    model, tok, device, bs = ctx["model"], ctx["tokenizer"], ctx["device"], args.block_size
    entry = out["lengths"].setdefault(str(L), {"length": L, "budgets": []})
    table_path = ctx["tables"].get(L)
    t0 = time.perf_counter()
    if table_path:
        table = CandidateTable.load(table_path)
        entry["table"] = {"reused": str(table_path)}
    else:
        if not clock.fits("calibrate", L, out, f"calibration at {L}"):
            return None
        first = make_plan(model, "austen", tokenizer=tok, budget=1.0, lengths=(L,), samples=args.samples,
                          block_size=bs, device=device)
        table = first.table
        table.save(Path(args.out).with_name(Path(args.out).stem + f"_{L}.table.npz"))
        entry["table"] = {"calibration_seconds": table.seconds, "samples": args.samples}
        clock.record("calibrate", L, time.perf_counter() - t0)
    entry["table"].update(layers=table.layers, heads=table.heads, block_size=table.block_size,
                          candidates=[c.name for c in table.candidates])
    ctx["table"][L] = table
    save(out, Path(args.out))
    print(f"{L}: table ready ({time.perf_counter() - t0:.1f} s)", flush=True)
    return table


def evaluate_length(L, args, ctx, out, clock):
    """Plan vs uniform at every budget on held-out text at ``L``; fills ``out["lengths"][str(L)]``."""
    model, tok, device, backend, bs = ctx["model"], ctx["tokenizer"], ctx["device"], ctx["backend"], args.block_size
    entry, table = out["lengths"][str(L)], ctx["table"][L]
    t0 = time.perf_counter()
    held = text_chunks("austen", tok, L, split="held_out", max_chunks=args.eval_chunks)
    shift = text_chunks("kjv", tok, L, split="held_out", max_chunks=args.shift_chunks)
    haystack = text_chunks("austen", tok, L, split="held_out").flatten()
    depths = [float(x) for x in args.passkey_depths.split(",") if x]
    seeds = list(range(args.passkey_seeds))
    passkeys = make_samples("passkey", tok, haystack, [L], depths, seeds) if depths and seeds else []
    caches = {"austen": {}, "kjv": {}}
    corpora = {"austen": held, "kjv": shift}
    dense = {name: lm_rows(model, chunks, None, backend, bs, caches[name], device) for name, chunks in corpora.items()}
    entry["dense"] = {name: lm_summary(rows) for name, rows in dense.items()}
    if passkeys:
        res = retrieval_accuracy(model, tok, passkeys, None)
        entry["dense"]["passkey"] = {"accuracy": res.accuracy.to_dict(), "correct": res.correct}
    captured = {} if "recall" in ctx["skip"] else {"austen": capture_chunks(model, held[: args.recall_chunks]),
                                                   "kjv": capture_chunks(model, shift[: args.recall_chunks])}
    entry["held_out"] = {"austen_chunks": int(held.shape[0]), "kjv_chunks": int(shift.shape[0]),
                         "recall_chunks": 0 if "recall" in ctx["skip"] else min(args.recall_chunks, int(held.shape[0])),
                         "passkey_samples": len(passkeys), "passkey_depths": depths, "passkey_seeds": seeds}
    clock.record("dense", L, time.perf_counter() - t0)
    phase(out, f"dense_{L}", t0)
    save(out, Path(args.out))

    jobs = []
    for budget in ctx["budgets"]:
        try:
            res = make_plan(None, None, budget=budget, table=table)
        except InfeasibleBudget as err:
            entry["budgets"].append({"budget": budget, "note": str(err)})
            continue
        C = len(table.candidates)
        totals = res.costs.sum(0)
        fits = [c for c in range(C) if float(totals[c]) <= res.capacity * (1 + 1e-9)]
        ranked = sorted(fits, key=lambda c: -float(res.values[:, c].sum()))[: args.uniform_top]
        meta = res.plan.meta["planner"]
        row = {"budget": budget, "rule": res.plan.budget.to_dict(),
               "plan": {"name": "plan", "calibration": {"recall": meta["mean_recall"],
                                                        "keys_per_query": meta["mean_keys_per_query"],
                                                        "tile_fraction": meta["mean_tile_fraction"]},
                        "families": _family_counts(res.per_head)},
               "uniform": []}
        entry["budgets"].append(row)
        tag = str(budget).replace(" ", "")
        res.plan.save(Path(args.out).with_name(Path(args.out).stem + f"_{L}_plan_{tag}.json"))
        configs = [("plan", res.plan, row["plan"])]
        for c in ranked:
            cand = table.candidates[c]
            u = {"name": cand.name, "calibration": {"recall": float(table.recall[..., c].mean()),
                                                    "keys_per_query": float(table.keys[..., c].mean()),
                                                    "tile_fraction": float(table.block_fraction[..., c].mean())}}
            row["uniform"].append(u)
            configs.append((cand.name, spattn.Plan(default=cand.pattern, budget=res.plan.budget), u))
        if not ranked:
            row["note"] = "no uniform candidate fits this budget"
        # recall and measured cost of every configuration, one dense pass per layer and chunk
        if "recall" not in ctx["skip"] and clock.fits("recall", L, out, f"recall at {L}, budget {budget}"):
            t1 = time.perf_counter()
            for name, caps in captured.items():
                scored = measured_recall(caps, [p for _, p, _ in configs], bs, device)
                for (_, _, rec), m in zip(configs, scored, strict=True):
                    rec.setdefault(name, {})["recall"] = m
            clock.record("recall", L, time.perf_counter() - t1)
            save(out, Path(args.out))
        jobs.append((budget, row, configs, {}))
    # LM + pass key, budget by budget: the plan, then the uniform patterns in their rank order (a plan's row is
    # only useful with its comparison, so each budget's pair completes before the next budget starts)
    for budget, row, configs, lm in jobs:
        for rank in range(1 + args.uniform_top):
            if rank >= len(configs) or (rank > 0 and "plan" not in lm):
                continue
            name, plan, rec = configs[rank]
            if not clock.fits("config", L, out, f"LM + pass key of {name} at {L}, budget {budget}"):
                continue
            t1 = time.perf_counter()
            lm[name] = {}
            for corpus, chunks in corpora.items():
                rows = lm_rows(model, chunks, plan, backend, bs, caches[corpus], device)
                lm[name][corpus] = rows
                rec.setdefault(corpus, {})["lm"] = lm_summary(rows)
            if passkeys:
                pk = retrieval_accuracy(model, tok, passkeys, plan, backend, block_size=bs)
                lm[name]["passkey"] = [float(c) for c in pk.correct]
                rec["passkey"] = {"accuracy": pk.accuracy.to_dict(), "correct": pk.correct}
            rec["seconds"] = time.perf_counter() - t1
            clock.record("config", L, rec["seconds"])
            phase(out, f"config_{L}_{budget}_{name}", t1)
            if rank > 0:
                rec["plan_minus_uniform"] = _comparisons(lm["plan"], lm[name], row["plan"], rec)
            save(out, Path(args.out))
            ppl = {c: rec[c]["lm"]["perplexity"] for c in corpora if "lm" in rec.get(c, {})}
            print(L, budget, name, json.dumps(ppl), "passkey", rec.get("passkey", {}).get("accuracy", {}).get("value"),
                  flush=True)
    return table


def _family_counts(per_head):
    counts: dict[str, int] = {}
    for h in per_head:
        counts[h["family"]] = counts.get(h["family"], 0) + 1
    return counts


def _comparisons(plan_lm, uni_lm, plan_rec, uni_rec):
    """plan minus uniform, paired: LM metrics over chunks, recall over heads, pass key over samples."""
    out = {}
    for corpus in ("austen", "kjv"):
        c = {"nll": paired(plan_lm[corpus], uni_lm[corpus], "nll", False),
             "kl": paired(plan_lm[corpus], uni_lm[corpus], "kl", False),
             "top1": paired(plan_lm[corpus], uni_lm[corpus], "top1", True)}
        a, b = plan_rec.get(corpus, {}).get("recall"), uni_rec.get(corpus, {}).get("recall")
        if a and b:
            c["recall_over_heads"] = compare(a["per_head"], b["per_head"]).to_dict()
        out[corpus] = c
    if "passkey" in plan_lm and "passkey" in uni_lm:
        out["passkey"] = compare(plan_lm["passkey"], uni_lm["passkey"]).to_dict()
    return out


def latency_section(L, args, ctx, out, clock):
    """Measured-latency plans against FLOP plans at the same millisecond budget, at ``L``."""
    model, device, backend, bs = ctx["model"], ctx["device"], ctx["backend"], args.block_size
    table = ctx["table"].get(L)
    sec = out.setdefault("latency_vs_flops", {"length": L, "rows": []})
    if table is None:
        sec["note"] = f"no candidate table at {L} (its calibration was skipped)"
        return
    if not clock.fits("latency_table", L, out, f"latency table at {L}", default=30.0):
        return
    t0 = time.perf_counter()
    # beside the JSON (it comes back with the results, and the cache directory may not be writable)
    latency = LatencyTable(Path(args.out).with_name(Path(args.out).stem + "_latency.json"), device=device,
                           backend=backend, repeats=args.repeats, dtype=ctx["dtype"])
    base = make_plan(None, None, budget=1.0, cost="latency", table=table, latency=latency)  # times every candidate
    clock.record("latency_table", L, time.perf_counter() - t0)
    phase(out, f"latency_table_{L}", t0)
    dense_ms = float(table.latency_ms[..., table.index("dense")].sum())
    ids = text_chunks("austen", ctx["tokenizer"], L, split="held_out", max_chunks=args.eval_chunks)
    sec.update(latency_table_seconds=time.perf_counter() - t0, timed_entries=latency.measured,
               dense_attention_ms_predicted=dense_ms, backend=backend, repeats=args.repeats,
               uniform_at_dense_ms=base.uniform)
    t_dense = time.perf_counter()
    save(out, Path(args.out))
    sec["dense_attention_ms_measured"] = attention_ms(spattn.Plan(), table, L, bs, device, args.repeats, backend,
                                                      dtype=ctx["dtype"])
    sec["dense_forward_ms"] = forward_ms(model, ids[:1].to(device), None, bs, max(3, args.repeats // 4), backend)
    phase(out, f"latency_dense_{L}", t_dense)
    save(out, Path(args.out))
    cache: dict = {}
    for f in (float(x) for x in args.fractions.split(",") if x):
        budget_ms = f * dense_ms
        if not clock.fits("latency_row", L, out, f"latency vs flops at {f:g} of dense ms"):
            break
        t1 = time.perf_counter()
        row = {"fraction_of_dense_ms": f, "budget_ms": budget_ms}
        try:
            lat = make_plan(None, None, budget=f"{budget_ms:.6f}ms", cost="latency", table=table, latency=latency)
        except InfeasibleBudget as err:  # no candidate mix is that fast on this device
            row["note"] = str(err)
            sec["rows"].append(row)
            save(out, Path(args.out))
            continue
        flop = flop_plan_within_ms(table, budget_ms)
        for name, res, predicted, tiles in (("latency", lat, lat.solution.cost, None),
                                            ("flops", *(flop if flop else (None, None, None)))):
            if res is None:
                row[name] = {"note": "no FLOP plan's predicted time fits the budget"}
                continue
            rows = lm_rows(model, ids, res.plan, backend, bs, cache, device)
            row[name] = {
                "predicted_ms": float(predicted), "tile_budget": tiles,
                "measured_attention_ms": attention_ms(res.plan, table, L, bs, device, args.repeats, backend,
                                                      dtype=ctx["dtype"]),
                "forward_ms": forward_ms(model, ids[:1].to(device), res.plan, bs, max(3, args.repeats // 4), backend),
                "calibration_recall": res.plan.meta["planner"]["mean_recall"],
                "tile_fraction": res.plan.meta["planner"]["mean_tile_fraction"],
                "families": _family_counts(res.per_head),
                "held_out_austen": lm_summary(rows), "_rows": rows,
            }
            res.plan.save(Path(args.out).with_name(Path(args.out).stem + f"_latency_{name}_{f:g}.json"))
        if "_rows" in row.get("latency", {}) and "_rows" in row.get("flops", {}):
            row["latency_minus_flops"] = {k: paired(row["latency"]["_rows"], row["flops"]["_rows"], k, hib)
                                          for k, hib in (("nll", False), ("kl", False), ("top1", True))}
        for name in ("latency", "flops"):
            row.get(name, {}).pop("_rows", None)
        clock.record("latency_row", L, time.perf_counter() - t1)
        phase(out, f"latency_row_{f:g}", t1)
        sec["rows"].append(row)
        save(out, Path(args.out))
        print("latency vs flops", json.dumps({k: row[k] for k in row if k != "latency_minus_flops"})[:400], flush=True)
    latency.save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", default=None, help="spattn backend of the sparse runs (default triton on CUDA, "
                    "reference on the CPU)")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--budgets", default="0.1;0.25", help="';'-separated budgets as spattn.plan takes them")
    ap.add_argument("--samples", type=int, default=2, help="calibration chunks per length")
    ap.add_argument("--block-size", type=int, default=None, help="default 128 on CUDA, 64 on the CPU")
    ap.add_argument("--table", action="append", default=[], help="a saved candidate table (.npz) to reuse at its "
                    "length instead of calibrating (repeatable)")
    ap.add_argument("--eval-chunks", type=int, default=8, help="held-out Austen chunks")
    ap.add_argument("--shift-chunks", type=int, default=8, help="held-out KJV chunks")
    ap.add_argument("--recall-chunks", type=int, default=2, help="of those, chunks whose recall is measured")
    ap.add_argument("--passkey-depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--passkey-seeds", type=int, default=2)
    ap.add_argument("--uniform-top", type=int, default=2, help="uniform candidates evaluated per budget")
    ap.add_argument("--latency-length", type=int, default=None, help="default the longest length")
    ap.add_argument("--fractions", default="0.25,0.5", help="ms budgets as fractions of the dense attention time")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: quality (the held-out rows), "
                    "recall (the held-out recall rows inside quality), latency")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the model's dtype (the gate and the latency table use it too, so the gate compiles the "
                    "kernels the measurement reuses)")
    ap.add_argument("--latency-share", type=float, default=0.3, help="share of --time-budget kept for the "
                    "latency section (the lengths share the rest in proportion to their length)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (model load "
                    "included); steps that would not fit are skipped and recorded")
    ap.add_argument("--quick", action="store_true", help="tiny CPU dry run (256 tokens, 1 chunk each)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.samples, args.eval_chunks, args.shift_chunks, args.recall_chunks = "256", 1, 1, 1, 1
        args.passkey_depths, args.passkey_seeds, args.budgets, args.repeats = "0.5", 1, "0.8;0.95", 2
        args.uniform_top, args.fractions = 1, "0.8"
    clock = Clock(args.time_budget)
    device = torch.device(args.device)
    backend = args.backend or ("triton" if device.type == "cuda" else "reference")
    args.block_size = args.block_size or (128 if device.type == "cuda" else 64)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.manual_seed(0)
    out = {"what": "planner held out: plan vs best uniform at equal cost (Austen held out, KJV shift, pass key); "
                   "measured-latency plans vs FLOP plans at the same ms budget",
           "machine": machine_info(device), "args": vars(args), "backend": backend, "skipped": [], "lengths": {},
           "note": "CPU timings come from a shared machine" if device.type == "cpu" else None}
    path = Path(args.out)
    save(out, path)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_smollm2(device=device, dtype=dtype)
    out["model_load_seconds"] = time.perf_counter() - clock.start
    phase(out, "model_load", clock.start)
    clock.setup_done()
    ctx = {"model": model, "tokenizer": tokenizer, "device": device, "backend": backend, "table": {},
           "dtype": dtype, "skip": skip,
           "budgets": [parse_budget(b) for b in args.budgets.split(";") if b.strip()], "tables": {}}
    for t in args.table:
        ctx["tables"][CandidateTable.load(t).length] = t
    latency_length = args.latency_length or max(lengths)
    status = "complete"
    try:
        wanted = lengths if "quality" not in skip else [latency_length]
        share = 0.0 if "latency" in skip else args.latency_share
        ends = [(1 - share) * sum(wanted[: i + 1]) / sum(wanted) for i in range(len(wanted))]  # by length
        for n, L in enumerate(wanted):
            clock.section(ends[n])
            table = calibrate(L, args, ctx, out, clock)
            if n == 0 and table is not None:  # the correctness gate, before any number is kept
                res = first_feasible(table, ctx["budgets"] + [0.5, 0.9])
                layers = [i for i in range(table.layers) if res.plan.pattern_for(i) is not None]
                dynamic = [i for i in layers if res.plan.pattern_for(i).contains_dynamic()]
                t_gate = time.perf_counter()
                out["gate"] = [gate(res.plan, table, args.block_size, device, backend, layer=i, length=min(2048, L),
                                    dtype=dtype)
                               for i in sorted(set(layers[:1] + dynamic[:1]))]
                phase(out, "gate", t_gate)
                save(out, path)
                print("gate", json.dumps(out["gate"])[:300], flush=True)
            if table is not None and "quality" not in skip:
                evaluate_length(L, args, ctx, out, clock)
        if "latency" not in skip:
            clock.section(1.0)
            if latency_length not in ctx["table"]:
                calibrate(latency_length, args, ctx, out, clock)
            latency_section(latency_length, args, ctx, out, clock)
    except Exception as err:  # keep the partial JSON, say what broke
        status = record_error(out, err)
    finish(out, path, status, time.perf_counter() - clock.start, save)


if __name__ == "__main__":
    main()
