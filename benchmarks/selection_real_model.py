"""Dynamic selection against sinks + window at equal measured key budget, on SmolLM2-135M (issue 12).

Tasks (one JSON each: machine, versions, git commit, command; written as results arrive):

    # per layer and head: true recall at equal budget and where the missed mass sits (captured q/k, offline)
    PYTHONPATH=src python benchmarks/selection_real_model.py recall --length 4096 --layers 2 9 16 23 29 \
        --out benchmarks/results/cpu/selection/recall-4096.json
    # perplexity, top-1 agreement, KL against the model's SDPA, intervals over chunks and segments
    PYTHONPATH=src python benchmarks/selection_real_model.py lm --lengths 4096 --chunks 4 --out lm-4096.json
    # a 5-digit pass key (spattn.eval.tasks.passkey) at depths 0.1 / 0.5 / 0.9, exact match by teacher forcing
    PYTHONPATH=src python benchmarks/selection_real_model.py passkey --lengths 4096 --samples 4 --out pk.json
    # H200, everything in one run: correctness gate, lm and passkey at 4096 and 8192 (docs/selection.md)
    PYTHONPATH=src python benchmarks/selection_real_model.py suite --device cuda --lengths 4096 8192 \
        --chunks 12 10 --samples 10 --time-budget 420 --out $OUT/selection_h200.json

lm / passkey variants per budget (``--fractions`` of the length, keys per query token-exact, causal): dense
(the model's SDPA), the best ``Sinks(s) | Window(w)`` over ``s`` in ``--sinks`` (picked by perplexity on a
calibration chunk, then evaluated on held-out chunks) and ``Adaptive(selector, keys, sinks=64, window=w0,
block=32, sharing="head")`` at the same keys. The backend is triton on CUDA (exact: IEEE fp32 dots), else
``dense`` (SDPA with the exact token mask).
"""

# ruff: noqa: E402 - src/ is put on the import path before spattn is imported
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, "..", "src"))

import argparse
import contextlib
import functools
import json
import math
import time
from typing import Any

import torch

import spattn
from spattn.layout import tables as _tables
from spattn.selectors import Adaptive, layer_budgets


# ------------------------------------------------------------------------------------------- variants
@functools.cache
def window_for(budget: float, sinks: int, length: int, block_size: int, device: str = "cpu") -> int:
    """Largest window with ``Sinks(sinks) | Window(w)`` at or under ``budget`` keys per query (causal; a binary
    search over compiled layouts, on ``device``: on CUDA the banded fast build, on the CPU the general compile)."""
    lo, hi = 0, length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if static_keys(spattn.Sinks(sinks) | spattn.Window(mid), length, block_size, device) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def variants(budget: int, length: int, block_size: int, args) -> list[tuple[str, spattn.Pattern]]:
    out = []
    for s in args.sinks:
        w = window_for(budget, s, length, block_size, args.device)
        out.append((f"Sinks({s}) | Window({w})", spattn.Sinks(s) | spattn.Window(w)))
    for sel in args.selectors:
        for w0 in args.local_windows:
            opts = {"queries": args.probe_queries} if sel == "probe" else {}
            p = Adaptive(sel, budget, sinks=64, window=w0, block=args.select_block, sharing=args.sharing,
                         options=opts)
            out.append((f"Adaptive({sel!r}, {budget}, sinks=64, window={w0}, block={args.select_block}, "
                        f"sharing={args.sharing!r})", p))
    return out


# ------------------------------------------------------------------------------------------- helpers
class KeyCounter:
    """``spattn.integrations.hf.layout_hook`` callback: keys per query of the layouts of the first ``calls``
    attention calls (the first chunk's layers), token-exact, read from the layout the model really ran on
    (no second compile)."""

    def __init__(self, pattern, block_size: int, calls: int):
        self.pattern, self.block_size, self.calls, self.keys = pattern, block_size, calls, []

    def __call__(self, module, layer, layout) -> None:
        if len(self.keys) >= self.calls:
            return
        self.keys.append(float(layout.allowed_pairs().float().mean()) / layout.q_len)

    @property
    def mean(self) -> float:
        return sum(self.keys) / len(self.keys)


def load(args):
    from spattn.integrations.models import load_smollm2

    model, tok = load_smollm2()
    if args.quick:  # a dry run of the code paths: SmolLM2's tokenizer and head shapes, 2 random layers
        import copy

        config = copy.deepcopy(model.config)
        config.num_hidden_layers, config.intermediate_size = 2, 256
        torch.manual_seed(args.seed)
        model = type(model)(config)
    model = model.to(args.device).eval()
    return model, tok


# ------------------------------------------------------------------------------------------- tasks
def dense_probabilities(query: torch.Tensor, key: torch.Tensor, scale: float, rows: int = 512) -> torch.Tensor:
    """float16 ``[H, L, L]``: the causal softmax of one sequence, kept once per layer to score many layouts."""
    from spattn.selectors.common import group_matmul

    L = query.shape[2]
    out = torch.empty(query.shape[1], L, L, dtype=torch.float16, device=query.device)
    j = torch.arange(L, device=query.device)[None]
    for i0 in range(0, L, rows):
        i = torch.arange(i0, min(L, i0 + rows), device=query.device)[:, None]
        logits = group_matmul(query[:, :, i0:i0 + rows].float(), key.float())[0] * scale
        out[:, i0:i0 + rows] = torch.softmax(logits.masked_fill(j > i, -math.inf), -1).half()
    return out


def layout_recall(layout: spattn.Layout, probs: torch.Tensor, sinks: int = 64, local: int = 512) -> dict:
    """Per head: kept mass (recall) and the missed mass on the sinks / local / far keys (mean over queries)."""
    slot, tiles = _tables.unpack(layout)[1], _tables.tiles(layout.masks)
    bs, L = layout.block_size, layout.q_len
    H = probs.shape[0]
    kept = torch.zeros(H, dtype=torch.float64)
    missed = {r: torch.zeros(H, dtype=torch.float64) for r in ("sinks", "local", "far")}
    j = torch.arange(L)[None]
    for qb0 in range(0, layout.num_q_blocks, 4):
        part = tiles[slot[:, :, qb0:qb0 + 4]].cpu()
        n = part.shape[2]
        m = part.permute(0, 1, 2, 4, 3, 5).reshape(part.shape[0], part.shape[1], n * bs, -1)[0, :, :, :L]
        p = probs[:, qb0 * bs:qb0 * bs + n * bs].float().cpu()
        m = m[:, : p.shape[1]]
        kept += (p * m).sum((-1, -2)).double()
        i = torch.arange(qb0 * bs, qb0 * bs + p.shape[1])[:, None]
        region = {"sinks": j < sinks}
        region["local"] = ~region["sinks"] & (i - j < local)
        region["far"] = ~region["sinks"] & ~region["local"]
        lost = p * ~m
        for r in missed:
            missed[r] += (lost * region[r]).sum((-1, -2)).double()
    return {"recall": (kept / L).tolist(), **{f"missed_{r}": (v / L).tolist() for r, v in missed.items()}}


def task_recall(args, model, tok, save) -> dict:
    """Captured q/k of one held-out chunk; per variant and layer the true recall per head (the dense softmax
    computed once per layer), keys per query token-exact, and where the missed mass sits."""
    from spattn.data.chunks import text_chunks

    ids = text_chunks(args.text, tok, args.length, split="held_out", max_chunks=1)
    cap = spattn.capture(model, ids.to(args.device), layers=args.layers, mode="full")
    probs = {layer: dense_probabilities(cap.queries[layer], cap.keys[layer], cap.scale) for layer in cap.layers}
    plans = [(b, n, p) for b in args.budgets for n, p in variants(b, args.length, args.block_size, args)]
    splits = {}
    if args.layer_budgets:  # the split over the layers comes from a calibration chunk, never the evaluated one
        cal = text_chunks(args.text, tok, args.length, split="calibration", max_chunks=1)
        cal_cap = spattn.capture(model, cal.to(args.device), layers=args.layers, mode="full")
        for b in args.budgets:
            name, pattern = adaptive_for(b, args)
            split = layer_budgets(pattern, cal_cap.queries, cal_cap.keys, block_size=args.block_size)
            splits[str(b)] = {str(i): v for i, v in split.items()}
            print(f"layer split of {b} keys per query (calibration chunk): {split}", flush=True)
            plans.append((b, f"{name} split over layers {split}", layer_patterns(pattern, split)))
    plans += [(0, n, p) for n, p in extra_variants(args)]
    rows = []
    for budget, name, pattern in plans:
        per_layer = {}
        for layer in cap.layers:
            q, k = cap.queries[layer], cap.keys[layer]
            lay = spattn.compile(pattern[layer] if isinstance(pattern, dict) else pattern, q.shape[2], causal=True,
                                 block_size=args.block_size, batch=1, heads=q.shape[1], query=q, key=k)
            per_layer[layer] = {"keys_per_query": float(lay.allowed_pairs().mean()) / q.shape[2],
                                **layout_recall(lay, probs[layer])}
        n = len(per_layer)
        row = {"budget": budget, "variant": name, "pattern": pattern_dict(pattern),
               "keys_per_query": sum(v["keys_per_query"] for v in per_layer.values()) / n,
               **{m: sum(sum(v[m]) / len(v[m]) for v in per_layer.values()) / n
                  for m in ("recall", "missed_sinks", "missed_local", "missed_far")},
               "per_layer": per_layer}
        rows.append(row)
        print(f"{budget:5d} {name:75s} keys {row['keys_per_query']:7.1f} recall {row['recall']:.4f} missed sinks "
              f"{row['missed_sinks']:.4f} local {row['missed_local']:.4f} far {row['missed_far']:.4f}", flush=True)
        save({"rows": rows, "layers": cap.layers, "layer_splits": splits})
    return {"rows": rows, "layers": cap.layers, "layer_splits": splits}


def layer_patterns(pattern: Adaptive, split: dict[int, int]) -> dict[int, Adaptive]:
    """``{layer: pattern with keys=split[layer]}``."""
    import dataclasses

    return {layer: dataclasses.replace(pattern, keys=int(k)) for layer, k in split.items()}


def pattern_dict(pattern) -> dict | None:
    """JSON of a pattern, of ``{layer: pattern}`` (a split over layers) or None (dense)."""
    if pattern is None:
        return None
    if isinstance(pattern, dict):
        return {"layers": {str(i): p.to_dict() for i, p in pattern.items()}}
    if isinstance(pattern, spattn.Plan):
        return {"layers": {str(i): pattern.pattern_for(i).to_dict() for i in sorted(pattern.layers)}}
    return pattern.to_dict()


def extra_variants(args) -> list[tuple[str, spattn.Pattern]]:
    """The steps of docs/selection.md's table that are not a budget's default variants (``--ablation``)."""
    if not args.ablation:
        return []
    from spattn.selectors import TopK

    S, W = spattn.Sinks, spattn.Window
    out = [("Sinks(64) | Window(64) | TopK('pooled', 1)", S(64) | W(64) | TopK("pooled", 1)),
           ("Sinks(64) | Window(64) | TopK('vertical_slash', 1)", S(64) | W(64) | TopK("vertical_slash", 1))]
    for b in args.budgets:
        out += [(f"Adaptive('pooled', {b}, sinks=64, window=64, block=64)", Adaptive("pooled", b, sinks=64, window=64)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=64)", Adaptive("probe", b, sinks=64, window=64)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=32)",
                 Adaptive("probe", b, sinks=64, window=64, block=32)),
                (f"Adaptive('probe', {b}, sinks=64, window=64, block=64, sharing='head')",
                 Adaptive("probe", b, sinks=64, window=64, sharing="head"))]
    return out


# ------------------------------------------------------------------------------------------- lm and passkey
class Deadline:
    """``--time-budget``: cumulative stage deadlines (a stage may use what earlier stages left, never the share
    of a later one); ``fits(seconds)`` says whether work estimated at ``seconds`` still fits the stage."""

    def __init__(self, budget: float | None, shares: dict[str, float], started: float):
        self.started, self.budget = started, budget
        total, acc, self.until = sum(shares.values()), 0.0, {}
        for name, share in shares.items():
            acc += share
            self.until[name] = None if budget is None else self.started + budget * acc / total
        self.skipped: list[dict] = []

    def fits(self, stage: str, seconds: float) -> bool:
        until = self.until.get(stage)
        return until is None or time.perf_counter() + seconds <= until

    def skip(self, stage: str, what: str, estimate: float) -> None:
        self.skipped.append({"stage": stage, "what": what, "estimated_seconds": round(estimate, 2),
                             "elapsed_seconds": round(time.perf_counter() - self.started, 2)})
        print(f"skipped ({stage}): {what}, estimated {estimate:.1f} s does not fit the time budget", flush=True)


def per_length(values: list[int], lengths: list[int], name: str) -> dict[int, int]:
    """One value for every length, or one per length."""
    if len(values) == 1:
        return {length: values[0] for length in lengths}
    if len(values) != len(lengths):
        raise SystemExit(f"{name}: give one value or one per length ({len(lengths)}), got {values}")
    return dict(zip(lengths, values, strict=True))


def budgets_for(length: int, args) -> list[int]:
    """Keys per query: ``--fractions`` of the length (6% of 4096 = 246)."""
    return [max(1, round(f * length)) for f in args.fractions]


def adaptive_for(budget: int, args) -> tuple[str, spattn.Pattern]:
    """``Adaptive`` at ``budget`` keys per query: the first of ``--selectors`` and ``--local-windows``, 64 sinks."""
    selector, window = args.selectors[0], args.local_windows[0]
    opts = {"queries": args.probe_queries} if selector == "probe" else {}
    pattern = Adaptive(selector, budget, sinks=64, window=window, block=args.select_block, sharing=args.sharing,
                       options=opts)
    name = f"Adaptive({selector!r}, {budget}, sinks=64, window={window}, block={args.select_block}, " \
           f"sharing={args.sharing!r})"
    return name, pattern


@functools.cache
def static_keys(pattern: spattn.Pattern, length: int, block_size: int, device: str = "cpu") -> float:
    """Keys per query of a static pattern, token-exact (causal), compiled on ``device``."""
    lay = spattn.compile(pattern, length, causal=True, block_size=block_size, device=device)
    return float(lay.allowed_pairs().float().mean()) / length


def forward_scores(model, ids: torch.Tensor, pattern, args, reference=None, counter=None):
    """One forward (dense when ``pattern`` is None, else patched with ``args.backend``); the dense reference
    (``spattn.eval.lm.dense_reference``) or the per-token scores against ``reference``; and the seconds."""
    from spattn.eval.lm import dense_reference, token_scores
    from spattn.integrations.hf import layout_hook, patched

    synchronize(args)
    t = time.perf_counter()
    with torch.no_grad():
        if pattern is None:
            logits = model(input_ids=ids).logits
        else:
            with patched(model, pattern, backend=args.backend, block_size=args.block_size), \
                    layout_hook(counter) if counter is not None else contextlib.nullcontext():
                logits = model(input_ids=ids).logits
    synchronize(args)
    seconds = time.perf_counter() - t
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(f"{pattern}: non-finite logits")
    if reference is None:
        return dense_reference(logits, ids), seconds
    return token_scores(reference, logits), seconds


def synchronize(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()


def segment_means(values: torch.Tensor, segment: int) -> list[float]:
    """Means of consecutive ``segment``-token pieces of per-token values ``[N]`` (a short tail is dropped)."""
    n = values.numel() // segment
    if n == 0:
        return [float(values.mean())]
    return values[: n * segment].reshape(n, segment).mean(1).tolist()


def calibrate_window(model, budget: int, length: int, args, deadline: Deadline, stage: str) -> dict:
    """The best ``Sinks(s) | Window(w)`` at ``budget`` keys per query: for each ``s`` in ``--sinks`` the largest
    window within the budget, scored by perplexity on one calibration chunk (never an evaluation chunk)."""
    from spattn.data.chunks import text_chunks

    tok = model._selection_tokenizer
    if len(args.sinks) == 1:  # one candidate: nothing to pick, no calibration forward
        s = args.sinks[0]
        w = window_for(budget, s, length, args.block_size, args.device)
        pattern = spattn.Sinks(s) | spattn.Window(w)
        best = {"variant": f"Sinks({s}) | Window({w})", "pattern": pattern.to_dict(),
                "keys_per_query": static_keys(pattern, length, args.block_size, args.device),
                "calibration_perplexity": None, "_pattern": pattern}
        return {"best": best, "candidates": [{k: v for k, v in best.items() if k != "_pattern"}]}
    ids = text_chunks(args.text, tok, length, split="calibration", max_chunks=1).to(args.device)
    reference, _ = forward_scores(model, ids, None, args)
    candidates = []
    for s in args.sinks:
        t_search = time.perf_counter()
        w = window_for(budget, s, length, args.block_size, args.device)
        if w < 1:
            continue
        pattern = spattn.Sinks(s) | spattn.Window(w)
        scores, seconds = forward_scores(model, ids, pattern, args, reference)
        nll = float(scores["nll"].mean())
        candidates.append({"variant": f"Sinks({s}) | Window({w})", "pattern": pattern.to_dict(),
                           "keys_per_query": static_keys(pattern, length, args.block_size, args.device),
                           "calibration_perplexity": math.exp(nll), "seconds": seconds, "_pattern": pattern})
        print(f"calibration {length} {budget:5d} {candidates[-1]['variant']:30s} keys "
              f"{candidates[-1]['keys_per_query']:7.1f} ppl {math.exp(nll):.3f} ({seconds:.2f} s forward, "
              f"{time.perf_counter() - t_search:.2f} s with the window search)", flush=True)
    best = min(candidates, key=lambda c: c["calibration_perplexity"])
    return {"best": best, "candidates": [{k: v for k, v in c.items() if k != "_pattern"} for c in candidates]}


def split_over_layers(model, pattern: Adaptive, length: int, args) -> tuple[dict[int, int], spattn.Plan]:
    """``selectors.layer_budgets`` on the q/k of every layer of one calibration chunk (never an evaluated one):
    the split ``{layer: keys}`` and the Plan of ``Adaptive`` patterns it makes."""
    from spattn.data.chunks import text_chunks

    cached = getattr(model, "_selection_splits", {}).get((pattern, length))
    if cached is not None:
        return cached
    ids = text_chunks(args.text, model._selection_tokenizer, length, split="calibration", max_chunks=1)
    with torch.no_grad():
        cap = spattn.capture(model, ids.to(args.device), mode="full")
        split = layer_budgets(pattern, cap.queries, cap.keys, block_size=args.block_size)
    del cap
    print(f"layer split of {pattern.keys} keys per query at {length} (calibration chunk): {split}", flush=True)
    result = split, spattn.Plan(layers=layer_patterns(pattern, split))
    model.__dict__.setdefault("_selection_splits", {})[(pattern, length)] = result
    return result


def summarise_lm(group: dict, args) -> None:
    """Per variant: means with percentile-bootstrap intervals over chunks and over segments
    (``spattn.eval.stats``); paired comparisons of Adaptive with the best window; the share of the
    window -> dense perplexity gap closed, with its interval over chunks."""
    from spattn.eval import stats

    rows = group["rows"]
    dense = rows[0]
    n = len(dense["per_chunk"])
    if n == 0:
        return
    for r in rows:
        chunks, segs = r["per_chunk"][:n], r["per_segment"]
        nll = [c["nll"] for c in chunks]
        lo, hi = stats.bootstrap_interval(nll)
        r["perplexity"] = math.exp(sum(nll) / len(nll))
        r["interval_perplexity"] = [math.exp(lo), math.exp(hi)]
        for metric in ("agree", "kl"):
            vals = [c[metric] for c in chunks]
            r[{"agree": "top1_agreement", "kl": "mean_kl"}[metric]] = sum(vals) / len(vals)
            r[{"agree": "interval_top1", "kl": "interval_kl"}[metric]] = list(stats.bootstrap_interval(vals))
            seg = [s[metric] for s in segs]
            r[{"agree": "segment_interval_top1", "kl": "segment_interval_kl"}[metric]] = \
                list(stats.bootstrap_interval(seg))
        seg_nll = [s["nll"] for s in segs]
        lo, hi = stats.bootstrap_interval(seg_nll)
        r["segment_interval_perplexity"] = [math.exp(lo), math.exp(hi)]
        r["chunks"], r["segments"] = len(chunks), len(segs)
        if r["keys"]:
            r["keys_per_query"] = sum(r["keys"]) / len(r["keys"])
    window = next((r for r in rows if r["role"] == "best_window" and len(r["per_chunk"]) >= n), None)
    if window is None:
        return
    d_nll = [c["nll"] for c in dense["per_chunk"][:n]]
    w_nll = [c["nll"] for c in window["per_chunk"][:n]]
    for r in rows:
        if r["role"] not in ("adaptive", "adaptive_layers") or len(r["per_chunk"]) < n:
            continue
        versus = {}
        for metric, higher in (("nll", False), ("kl", False), ("agree", True)):
            a = [c[metric] for c in r["per_chunk"][:n]]
            b = [c[metric] for c in window["per_chunk"][:n]]
            versus[metric] = stats.compare(a, b, higher_is_better=higher).to_dict()
            sa = [s[metric] for s in r["per_segment"]]
            sb = [s[metric] for s in window["per_segment"]]
            if len(sa) == len(sb):
                versus[f"segments_{metric}"] = stats.compare(sa, sb, higher_is_better=higher).to_dict()
        r["versus_best_window"] = versus  # a = Adaptive, b = the best window; winner "a": Adaptive is better
        a_nll = [c["nll"] for c in r["per_chunk"][:n]]

        def closed(idx, axis=-1, a_nll=a_nll):
            import numpy as np

            idx = np.asarray(idx).astype(int)
            d, w, a = (np.exp(np.asarray(v)[idx].mean(axis)) for v in (d_nll, w_nll, a_nll))
            return (w - a) / np.where(w - d > 0, w - d, np.nan)

        point = float(closed(list(range(n))))
        interval = list(stats.bootstrap_interval(list(range(n)), statistic=closed)) if n > 1 else [point, point]
        point, interval = finite(point), [finite(v) for v in interval]  # None where the window beats dense
        r["share_of_window_gap_closed"] = {"value": point, "interval": interval,
                                           "window": window["variant"], "chunks": n}


def finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def stage_lm(model, length: int, args, deadline: Deadline, stage: str, report: dict, save) -> None:
    """Calibrate the best window per budget, then dense / best window / Adaptive on held-out chunks."""
    from spattn.data.chunks import text_chunks

    tok = model._selection_tokenizer
    entry = {"length": length, "budgets": {}, "calibration": {}}
    report.setdefault("lm", {})[str(length)] = entry
    groups = []
    for budget in budgets_for(length, args):
        if not deadline.fits(stage, 0.0):
            deadline.skip(stage, f"lm {length} budget {budget}: calibration", 0.0)
            continue
        cal = calibrate_window(model, budget, length, args, deadline, stage)
        entry["calibration"][str(budget)] = cal["candidates"]
        name, adaptive = adaptive_for(budget, args)
        rows = [{"role": "dense", "variant": "dense (the model's SDPA)", "pattern": None, "keys_per_query": None},
                {"role": "best_window", "variant": cal["best"]["variant"], "pattern": cal["best"]["pattern"],
                 "keys_per_query": cal["best"]["keys_per_query"], "_pattern": cal["best"]["_pattern"]},
                {"role": "adaptive", "variant": name, "pattern": adaptive.to_dict(), "_pattern": adaptive}]
        if args.layer_budgets:
            split, plan = split_over_layers(model, adaptive, length, args)
            entry.setdefault("layer_splits", {})[str(budget)] = {str(i): v for i, v in split.items()}
            rows.append({"role": "adaptive_layers", "variant": f"{name} split over layers",
                         "split": {str(i): v for i, v in split.items()},
                         "pattern": pattern_dict(plan), "_pattern": plan})
        for r in rows:
            r.update(per_chunk=[], per_segment=[], keys=[], seconds=[])
        group = {"budget": budget, "fraction": budget / length, "rows": rows}
        entry["budgets"][str(budget)] = group
        groups.append(group)
        save()
    first = getattr(args, "first_chunk", 0)  # resume: held-out chunks first, first + 1, ... (chunk indices kept)
    chunks = text_chunks(args.text, tok, length, split="held_out", max_chunks=first + args.chunks_at[length])[first:]
    entry["held_out_chunks_available"] = int(text_chunks(args.text, tok, length, split="held_out").shape[0])
    last = 0.0
    for c in range(chunks.shape[0]):
        if not deadline.fits(stage, last):
            deadline.skip(stage, f"lm {length}: held-out chunks {first + c}..{first + chunks.shape[0] - 1}", last)
            break
        t0 = time.perf_counter()
        ids = chunks[c:c + 1].to(args.device)
        reference, dense_seconds = forward_scores(model, ids, None, args)
        dense_scores = {"nll": -reference["logp"].gather(-1, reference["target"][:, None])[:, 0],
                        "agree": torch.ones_like(reference["target"], dtype=torch.float64),
                        "kl": torch.zeros_like(reference["target"], dtype=torch.float64)}
        for group in groups:
            for r in group["rows"]:
                pattern = r.get("_pattern")
                counter = None
                if r["role"].startswith("adaptive") and (args.count_chunks == 0 or c < args.count_chunks):
                    counter = KeyCounter(pattern, args.block_size, model.config.num_hidden_layers)
                if pattern is None:
                    scores, seconds = dense_scores, dense_seconds
                else:
                    scores, seconds = forward_scores(model, ids, pattern, args, reference, counter)
                r["per_chunk"].append({k: float(v.mean()) for k, v in scores.items()})
                segs = {k: segment_means(v, args.segment) for k, v in scores.items()}
                r["per_segment"] += [dict(zip(segs, vals, strict=True)) for vals in zip(*segs.values(), strict=True)]
                r["seconds"].append(seconds)
                if counter is not None:
                    r["keys"].append(counter.mean)
                m = r["per_chunk"][-1]
                keys = counter.mean if counter is not None else r["keys_per_query"]
                print(f"lm {length} chunk {first + c} {group['budget']:5d} {r['variant']:70s} keys "
                      f"{'-' if keys is None else f'{keys:7.1f}'} ppl {math.exp(m['nll']):.3f} top1 "
                      f"{m['agree']:.4f} KL {m['kl']:.4f} ({seconds:.2f} s)", flush=True)
            summarise_lm(group, args)
        entry["chunks"] = c + 1
        entry["first_chunk"] = first
        last = time.perf_counter() - t0
        save()


def stage_passkey(model, length: int, args, deadline: Deadline, stage: str, report: dict, save) -> None:
    """Pass keys (``spattn.eval.tasks.passkey``) at ``--depths``, ``--samples`` seeds per depth: dense, then per
    budget the best window of the lm stage (calibrated at this length) and Adaptive; exact match by teacher
    forcing (``spattn.eval.retrieval.retrieval_accuracy``), intervals and paired comparisons (``stats``)."""
    from spattn.data.corpora import load_text
    from spattn.eval import stats
    from spattn.eval.retrieval import make_samples, retrieval_accuracy
    from spattn.integrations.hf import layout_hook

    tok = model._selection_tokenizer
    samples = make_samples("passkey", tok, load_text(args.text), [length], args.depths, range(args.samples))
    plans: list[tuple[str, str, Any, int | None]] = [("dense", "dense (the model's SDPA)", None, None)]
    lm = report.get("lm", {}).get(str(length), {}).get("budgets", {})
    for budget in budgets_for(length, args)[:args.passkey_budgets]:
        group = lm.get(str(budget))
        if group is not None:
            window = next(r for r in group["rows"] if r["role"] == "best_window")
            plans.append(("best_window", window["variant"], window["_pattern"], budget))
        else:  # no lm stage at this length: calibrate here
            cal = calibrate_window(model, budget, length, args, deadline, stage)
            plans.append(("best_window", cal["best"]["variant"], cal["best"]["_pattern"], budget))
        name, adaptive = adaptive_for(budget, args)
        plans.append(("adaptive", name, adaptive, budget))
        if args.layer_budgets:
            plans.append(("adaptive_layers", f"{name} split over layers",
                          split_over_layers(model, adaptive, length, args)[1], budget))
    entry = {"length": length, "depths": args.depths, "samples_per_depth": args.samples, "rows": []}
    report.setdefault("passkey", {})[str(length)] = entry
    dense_scores = None
    seen: dict[str, float] = {}
    for role, name, pattern, budget in plans:
        last = seen.get(role, 4 * max(seen.values(), default=0.0))
        if not deadline.fits(stage, last):
            deadline.skip(stage, f"passkey {length}: {name}", last)
            continue
        counter = None if pattern is None else KeyCounter(pattern, args.block_size, model.config.num_hidden_layers)
        with layout_hook(counter) if counter is not None else contextlib.nullcontext():
            result = retrieval_accuracy(model, tok, samples, pattern, args.backend, block_size=args.block_size)
        seen[role] = result.seconds
        scores = [float(c) for c in result.correct]
        row = {"role": role, "budget": budget, "variant": name,
               "pattern": pattern_dict(pattern),
               "keys_per_query_first_sample": None if counter is None else counter.mean,
               "found": int(sum(result.correct)), "samples": len(samples), "accuracy": result.accuracy.to_dict(),
               "seconds": result.seconds, "per_depth": [], "per_sample": []}
        for depth in args.depths:
            vals = [s for s, smp in zip(scores, samples, strict=True) if abs(smp.depth - depth) < 1e-9]
            row["per_depth"].append({"depth": depth, **stats.estimate(vals).to_dict()})
        row["per_sample"] = [{"depth": s.depth, "seed": s.meta["seed"], "needle_distance": length - s.needle_position,
                              "correct": c, "prediction": p}
                             for s, c, p in zip(samples, result.correct, result.predictions, strict=True)]
        if dense_scores is None and role == "dense":
            dense_scores = scores
        elif dense_scores is not None:
            row["versus_dense"] = stats.compare(scores, dense_scores).to_dict()
        if role.startswith("adaptive"):
            window = next((r for r in entry["rows"] if r["role"] == "best_window" and r["budget"] == budget), None)
            if window is not None:
                row["versus_best_window"] = stats.compare(scores, [float(p["correct"]) for p in window["per_sample"]]
                                                          ).to_dict()
        entry["rows"].append(row)
        per_depth = " ".join(f"{d['depth']}:{d['value']:.2f}" for d in row["per_depth"])
        print(f"passkey {length} {name:70s} found {row['found']}/{len(samples)} ({per_depth}) "
              f"{result.seconds:.1f} s", flush=True)
        save()


def stage_gate(model, args, report: dict, save) -> None:
    """Correctness first: on captured q/k of one real layer, the backend against the float64 oracle on the
    exact masks of the best window and Adaptive (``spattn.testing`` tolerance rule); and the whole model with
    ``Full()`` through the backend against its own SDPA (the KL floor of the backend)."""
    from spattn.data.chunks import text_chunks
    from spattn.testing import assert_within, dense_attention, plain_attention

    tok = model._selection_tokenizer
    length = min(args.gate_length, max(args.lengths))
    ids = text_chunks(args.text, tok, length, split="calibration", max_chunks=1).to(args.device)
    layer = model.config.num_hidden_layers // 2
    seconds: dict[str, float] = {}  # where the gate's time goes (first calls include triton compilation)
    t = time.perf_counter()
    cap = spattn.capture(model, ids, layers=[layer], mode="full")
    q, k = cap.queries[layer].to(args.device), cap.keys[layer].to(args.device)
    v = torch.randn(k.shape, generator=torch.Generator().manual_seed(0)).to(args.device)
    budget, sinks = budgets_for(length, args)[0], min(args.sinks)
    seconds["capture"], t = time.perf_counter() - t, time.perf_counter()
    window = window_for(budget, sinks, length, args.block_size, args.device)
    seconds["window_search"] = time.perf_counter() - t
    checks = []
    for name, pattern in [adaptive_for(budget, args),
                          (f"Sinks({sinks}) | Window({window})", spattn.Sinks(sinks) | spattn.Window(window))]:
        t = time.perf_counter()
        layout = spattn.compile(pattern, length, causal=True, block_size=args.block_size, heads=q.shape[1],
                                query=q, key=k)
        synchronize(args)
        seconds[f"compile {name}"], t = time.perf_counter() - t, time.perf_counter()
        allowed = layout.to_dense().to(args.device)
        fast = spattn.attention(q, k, v, layout, causal=True, scale=cap.scale, backend=args.backend)
        synchronize(args)
        seconds[f"attention {name} (first call)"] = time.perf_counter() - t
        golden, _ = dense_attention(q, k, v, allowed, scale=cap.scale)
        base, _ = plain_attention(q, k, v, allowed, scale=cap.scale)
        try:  # recorded, not raised: one GPU call must still bring back the measurements (judged with it)
            assert_within(fast, golden, base, what=f"{args.backend} vs float64 oracle, {name}, layer {layer}")
            passed, message = True, None
        except AssertionError as exc:
            passed, message = False, str(exc)
        checks.append({"variant": name, "layer": layer, "length": length, "passed": passed, "message": message,
                       "max_error": float((fast.double() - golden).abs().max()),
                       "baseline_max_error": float((base.double() - golden).abs().max()),
                       "keys_per_query": float(layout.allowed_pairs().mean()) / length})
        print(f"gate {name}: {'passed' if passed else 'FAILED'}, max error {checks[-1]['max_error']:.2e} (baseline "
              f"{checks[-1]['baseline_max_error']:.2e})", flush=True)
    reference, seconds["dense forward"] = forward_scores(model, ids, None, args)
    if args.skip_floor:
        report["gate"] = {"kernels": checks, "full_model_floor": "skipped (--skip-floor)", "seconds": seconds,
                          "passed": all(c["passed"] for c in checks)}
        print("gate seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
        save()
        return
    scores, seconds["Full() forward (first call)"] = forward_scores(model, ids, spattn.Full(), args, reference)
    floor = {"length": length, "mean_kl": float(scores["kl"].mean()), "top1_agreement": float(scores["agree"].mean()),
             "max_kl": float(scores["kl"].max())}
    floor["passed"] = floor["mean_kl"] <= 1e-4 and floor["top1_agreement"] >= 0.999
    print(f"gate Full() via {args.backend} vs SDPA: mean KL {floor['mean_kl']:.2e}, top-1 "
          f"{floor['top1_agreement']:.4f}", flush=True)
    report["gate"] = {"kernels": checks, "full_model_floor": floor, "seconds": seconds,
                      "passed": all(c["passed"] for c in checks) and floor["passed"]}
    print("gate seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()), flush=True)
    save()


def stage_cost(stage: str, length: int, args, adaptive: float = 10.0) -> float:
    """Relative cost of a stage for the time-budget shares: forwards x length, an Adaptive forward (selection
    on every layer) counted as ``adaptive`` plain ones."""
    budgets = len(args.fractions)
    dynamic = budgets * (2 if args.layer_budgets else 1)  # Adaptive variants (per layer, split over layers)
    if stage == "lm":
        chunks = args.chunks_at[length]
        plain = budgets * (1 + len(args.sinks)) + chunks * (1 + budgets)
        return length * (plain + adaptive * dynamic * chunks)
    if stage == "passkey":
        n = args.samples * len(args.depths)
        pk = len(args.fractions[:args.passkey_budgets])
        return length * (n * (1 + pk) + adaptive * pk * (2 if args.layer_budgets else 1) * n)
    return 0.0


def run_stages(args, model, tok, which: list[str], save_record) -> dict:
    """The stages in order (most important first), each saving the report as soon as it has a result."""
    model._selection_tokenizer = tok
    args.chunks_at = per_length(args.chunks, args.lengths, "--chunks")
    shares = {"gate": 0.05 * sum(stage_cost(s, length, args) for s in which for length in args.lengths)} \
        if "gate" in which else {}
    for s in which:
        for length in args.lengths:
            if s == "passkey" and args.passkey_lengths is not None and length not in args.passkey_lengths:
                continue
            if s != "gate":
                shares[f"{s}-{length}"] = stage_cost(s, length, args)
    if args.lm_share is not None:  # --lm-share of the measured stages' time for the lm stages, the rest pass key
        groups = {g: [k for k in shares if k.startswith(g + "-")] for g in ("lm", "passkey")}
        totals = {g: sum(shares[k] for k in ks) for g, ks in groups.items()}
        if totals["lm"] > 0 and totals["passkey"] > 0:
            for g, want in (("lm", args.lm_share), ("passkey", 1 - args.lm_share)):
                for k in groups[g]:
                    shares[k] = want * shares[k] / totals[g]
            if "gate" in shares:
                shares["gate"] = 0.05
    if args.length_major:  # gate, then lm and passkey at the first length, then at the next one
        order = [k for k in shares if k == "gate"] + [f"{s}-{length}" for length in args.lengths
                                                      for s in which if f"{s}-{length}" in shares]
    else:
        order = [k for k in shares if k == "gate"] + [k for k in shares if k.startswith("lm-")] + \
            [k for k in shares if k.startswith("passkey-")]
    deadline = Deadline(args.time_budget, {k: shares[k] for k in order}, args.started)
    report: dict = {"skipped": deadline.skipped}

    def save() -> None:
        save_record(clean(report))

    for stage in order:
        t = time.perf_counter()
        if stage == "gate":
            stage_gate(model, args, report, save)
            if args.time_budget is not None:
                # the measured stages share what the model load and the gate left (on a fresh GPU the gate's
                # kernel compiles can take most of a small budget; cumulative deadlines from the start then left
                # the lm stages nothing)
                left = max(0.0, args.time_budget - (time.perf_counter() - args.started))
                rest = Deadline(left, {k: shares[k] for k in order if k != "gate"}, time.perf_counter())
                rest.skipped = deadline.skipped
                deadline = rest
        elif stage.startswith("lm-"):
            stage_lm(model, int(stage[3:]), args, deadline, stage, report, save)
        else:
            stage_passkey(model, int(stage[8:]), args, deadline, stage, report, save)
        report.setdefault("stage_seconds", {})[stage] = time.perf_counter() - t
        save()
    return clean(report)


def clean(value):
    """The report without the pattern objects kept for running (keys starting with ``_``)."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["recall", "lm", "passkey", "suite"])
    parser.add_argument("--length", type=int, default=4096, help="recall: tokens of the captured chunk")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="lm / passkey / suite (default --length)")
    parser.add_argument("--first-chunk", type=int, default=0,
                        help="lm: start at this held-out chunk (to extend an earlier run with new chunks)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8],
                        help="held-out chunks, one value or one per length")
    parser.add_argument("--text", default="austen")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help="recall: keys per query (default 246 492); lm / passkey take --fractions")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.12, 0.06],
                        help="lm / passkey: keys per query as a fraction of the length (0.12 x 4096 = 492)")
    parser.add_argument("--sinks", type=int, nargs="+", default=[4, 16, 64, 128],
                        help="sinks of the sinks + window candidates (lm / passkey: the best on a calibration chunk; "
                             "one value: that one, with no calibration forward)")
    parser.add_argument("--selectors", nargs="+", default=["probe"],
                        help="Adaptive's selector (lm / passkey: the first)")
    parser.add_argument("--local-windows", type=int, nargs="+", default=[64],
                        help="Adaptive's own window (lm / passkey: the first)")
    parser.add_argument("--probe-queries", type=int, default=4)
    parser.add_argument("--ablation", action="store_true", help="recall: also the steps of docs/selection.md")
    parser.add_argument("--layer-budgets", action="store_true",
                        help="also Adaptive with its keys split over the layers (selectors.layer_budgets on a "
                             "calibration chunk; lm / passkey: captured over all layers)")
    parser.add_argument("--select-block", type=int, default=32)
    parser.add_argument("--sharing", default="head", choices=["group", "head"])
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--backend", default=None,
                        help="spattn backend (default triton on cuda, else dense: SDPA with the exact token mask)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--samples", type=int, default=8, help="pass keys (seeds) per depth")
    parser.add_argument("--segment", type=int, default=512, help="lm: tokens per segment of the segment intervals")
    parser.add_argument("--count-chunks", type=int, default=0,
                        help="lm: count Adaptive's keys token-exact on the first N chunks (0: every chunk)")
    parser.add_argument("--gate-length", type=int, default=2048, help="suite: tokens of the correctness gate")
    parser.add_argument("--length-major", action="store_true",
                        help="suite: lm and passkey at the first length before either at the next one")
    parser.add_argument("--skip-floor", action="store_true",
                        help="suite: leave out the gate's whole-model Full() vs SDPA floor (kernel checks only)")
    parser.add_argument("--lm-share", type=float, default=None,
                        help="suite: share of the measured stages' time for the lm stages (default: by estimated cost)")
    parser.add_argument("--passkey-lengths", type=int, nargs="+", default=None,
                        help="suite: pass key only at these of --lengths (default all)")
    parser.add_argument("--passkey-budgets", type=int, default=None,
                        help="passkey / suite: only the first N of --fractions (default all)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for lm / passkey / suite: work that would not fit is skipped and recorded")
    parser.add_argument("--autotune", action="store_true", help="cuda: let the triton kernels autotune (slower start)")
    parser.add_argument("--quick", action="store_true",
                        help="dry run: a 2-layer random model of SmolLM2's shapes (its numbers mean nothing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.lengths = args.lengths or [args.length]
    if args.task != "recall" and args.budgets is not None:
        parser.error("lm / passkey / suite take --fractions (keys per query = fraction x length), not --budgets")
    if args.lm_share is not None and not 0 < args.lm_share < 1:
        parser.error(f"--lm-share must be in (0, 1), got {args.lm_share}")
    args.budgets = args.budgets or [246, 492]
    if args.backend is None:
        args.backend = "triton" if args.device == "cuda" else "dense"
    if args.device == "cuda" and not args.autotune:
        os.environ.setdefault("SPATTN_TRITON_AUTOTUNE", "0")
    torch.manual_seed(args.seed)
    started = args.started = time.perf_counter()  # --time-budget counts from here, model loading included
    model, tok = load(args)
    loaded = time.perf_counter() - started

    def save(result: dict) -> None:
        from spattn.bench.env import machine_info

        record = {"task": args.task, "model": "2-layer random model (--quick)" if args.quick else "SmolLM2-135M",
                  "model_dtype": str(next(model.parameters()).dtype),
                  "text": args.text, "lengths": args.lengths, "fractions": args.fractions, "backend": args.backend,
                  "block_size": args.block_size, "time_budget": args.time_budget,
                  "triton_autotune": os.environ.get("SPATTN_TRITON_AUTOTUNE"),
                  "environment": machine_info(args.device),
                  "note": "CPU timings come from a shared machine and are not speed claims" if args.device == "cpu"
                  else "seconds are wall-clock on the GPU, selection (compile) included",
                  "load_seconds": loaded, "seconds": time.perf_counter() - started,
                  "command": "PYTHONPATH=src python benchmarks/selection_real_model.py " + " ".join(
                      sys.argv[1:] if argv is None else argv), **result}
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
                f.write("\n")
            os.replace(args.out + ".tmp", args.out)

    if args.task == "recall":
        save(task_recall(args, model, tok, save))
        return
    which = {"lm": ["lm"], "passkey": ["passkey"], "suite": ["gate", "lm", "passkey"]}[args.task]
    save(run_stages(args, model, tok, which, save))


if __name__ == "__main__":
    main()
