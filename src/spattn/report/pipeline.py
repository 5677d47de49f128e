"""``run_report``: the stages of ``spattn report`` with progress bars, caching and resume.

At the first length (``chunk_length``) every candidate is fitted on the calibration chunks, picked per budget on
the selection chunks, and scored on the held-out report chunks (bootstrap intervals over 64-token segments). At
each further length the picks and their runners-up are fitted to the same budget rule again and scored, so the
report can say at which lengths a recommendation holds.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

import spattn
from spattn._optional import require
from spattn.bench.env import machine_info
from spattn.eval.lm import dense_reference, token_scores
from spattn.integrations.capture import capture
from spattn.integrations.plan import Plan
from spattn.patterns import Full, pattern_from_dict
from spattn.report import candidates as C
from spattn.report import intervals
from spattn.report.config import ReportConfig, quick_omits
from spattn.report.evaluate import (
    candidate_latency,
    coverage_pass,
    dense_latency,
    dropped_threads,
    kernel_references,
    latency_inputs,
    layout_fingerprint,
    sig,
)
from spattn.report.frontier import carry_over, contenders, holds, pareto, recommend, task_profiles
from spattn.report.stages import StageCache

FORMAT = "spattn.report/2"
REFERENCE_MAX_BLOCK_FRACTION = 0.5  # Note [scoring backend per candidate]
_BATCH = 4  # chunks per patched forward when scoring a split (logits of 4 x 1024 tokens: ~0.8 GB float32)


def _backends(cfg: ReportConfig, length: int) -> tuple[str, str]:
    """(backend of the patched model's forwards, backend timed for latency)."""
    if torch.device(cfg.device).type == "cuda":
        return "auto", "triton"
    # on CPU the dense backend (SDPA with the layout's mask) gives the same numbers as the blockwise reference
    # much faster at these lengths; latency is measured with the reference, spattn's CPU backend
    return ("dense" if length ** 2 <= 1 << 26 else "reference"), "reference"


def candidate_ids(cfg: ReportConfig) -> list[tuple[str, float, str | None]]:
    out = []
    for b in cfg.budgets:
        for fam in cfg.families:
            if fam == "top_p":
                out.extend(("top_p", b, s) for s in cfg.selectors)
            else:
                out.append((fam, b, None))
    return out


def _plan_of(rec: dict[str, Any]) -> Plan:
    """The plan a candidate record applies to the model: its own per-layer plan, or its pattern in every layer."""
    if rec.get("plan") is not None:
        return Plan.from_dict(rec["plan"])
    return Plan.uniform(pattern_from_dict(rec["pattern"]))


def _cid(family: str, budget: float, selector: str | None) -> str:
    return f"top_p:{selector}@{budget:g}" if family == "top_p" else f"{family}@{budget:g}"


class _Bars:
    """One rich progress bar per stage, with the elapsed time and an estimate of the time left."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]{task.description:<38}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[detail]}"), console=console, transient=False)

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def stage(self, name: str, total: int) -> Any:
        return self.progress.add_task(name, total=total, detail="")

    def advance(self, task: Any, detail: str = "", step: float = 1) -> None:
        self.progress.update(task, advance=step, detail=detail)


class _Run:
    """What every stage of one report run needs: configuration, cache, model, bars and timings."""

    def __init__(self, cfg: ReportConfig, cache: StageCache, bars: _Bars, model: Any, facts: dict,
                 retime: bool, deadline: float | None = None) -> None:
        self.cfg, self.cache, self.bars, self.model, self.facts = cfg, cache, bars, model, facts
        self.retime = retime
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}  # process CPU seconds (all threads): the load-independent cost
        self.latency_memo: dict[str, dict[str, Any]] = {}
        self.deadline = deadline
        self.skipped_for_time: list[str] = []
        self.planner_tables: dict[int, Any] = {}  # length -> the planner's candidate table (built once)
        self.first: dict[str, dict[str, Any]] = {}  # id -> record at the first length (plans carry from there)
        self.latency_inputs: dict[int, tuple] = {}  # length -> (query, key, value) of the timed layer
        self.scored_memo: dict[tuple, dict[str, Any]] = {}  # (length, split, layout key) -> split summary

    def out_of_time(self, what: str, estimate: float = 0.0) -> bool:
        """True (and ``what`` recorded as skipped) once the run is past its ``time_budget``, or when ``what``, of
        about ``estimate`` seconds, would end past it."""
        if self.deadline is None or time.perf_counter() + estimate < self.deadline:
            return False
        self.skipped_for_time.append(what)
        return True

    def timed(self, name: str, t0: tuple[float, float]) -> None:
        """Add the wall and the process CPU seconds since ``t0`` (a :func:`_clock`) to stage ``name``."""
        wall, cpu = _clock()
        self.timings[name] = self.timings.get(name, 0.0) + wall - t0[0]
        self.cpu_timings[name] = self.cpu_timings.get(name, 0.0) + cpu - t0[1]


def _clock() -> tuple[float, float]:
    """(wall seconds, process CPU seconds of all threads): on a shared machine the CPU seconds measure a stage's
    own cost, the wall seconds what the user waited."""
    return time.perf_counter(), time.process_time()


def _load_average() -> list[float] | None:
    """The machine's 1-, 5- and 15-minute load averages (None where the OS has none)."""
    return [sig(x, 3) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_report(config: ReportConfig, output: str | os.PathLike, *, overwrite: bool = False, fresh: bool = False,
               retime: bool = False, console: Any = None, command: str | None = None,
               time_budget: float | None = None) -> dict[str, Any]:
    """Run every stage of the report into ``output`` and return the results (also written as results.json).

    Finished stages are cached under ``output/.spattn-report/<config digest>/``; re-running the same command
    after an interruption resumes from them. ``retime`` re-measures every latency (and nothing else).
    ``time_budget`` (seconds, default None: no limit): once it is spent, the candidates not yet measured, the
    further lengths, retrieval and the threads view are skipped (``timings.skipped_for_time`` lists them; a rerun
    without the limit measures them, reusing the cached stages); the figures and the page are always written.
    """
    from rich.console import Console

    console = console or Console()
    t_total, cpu_total = _clock()
    load_start = _load_average()
    require("transformers", extra="hf")
    require("matplotlib", extra="viz")
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked but no CUDA GPU is available; use --device cpu")
    from spattn.report import model as M

    M.preflight(config.model, config.text)
    cache = StageCache(Path(output), config.digest(), overwrite=overwrite, fresh=fresh)
    if cache.resumed:
        console.print(f"[yellow]resuming[/] from cached stages in {cache.root}")
    torch.manual_seed(config.seed)

    with _Bars(console) as bars:
        t = _clock()
        task = bars.stage("load model and text", 2)
        try:
            model, tokenizer, model_name = M.load_model(config.model, config.device)
            facts = M.model_facts(model)
            bars.advance(task, model_name)
            data = _load_data(cache, config, tokenizer)
        except (ValueError, OSError, ImportError):
            cache.discard()  # nothing was computed: leave no half-made output directory behind
            raise
        bars.advance(task, f"{data['info']['tokens']} tokens")
        deadline = None if time_budget is None else t_total + float(time_budget)
        run = _Run(config, cache, bars, model, facts, retime, deadline)
        run.timed("load", t)

        first = config.chunk_length
        wanted = [(_cid(f, b, s), f, b, s) for f, b, s in candidate_ids(config)]
        main = _measure_length(run, first, data["lengths"][str(first)], wanted, select=True)
        run.first = {c["id"]: c for c in main["candidates"]}
        recs = recommend(main["candidates"], list(config.budgets))
        references = _kernel_references(run, [main], recs, first_pass=True)
        # Note [retrieval before the longer lengths]: retrieval and the threads view look at the first length's
        # picks alone (a few short forwards); the longer lengths cost the most, so under a --time-budget the task
        # evidence and the threads view come first
        retrieval = _retrieval(run, main, recs, tokenizer)
        threads = _threads(run, main, recs, data["lengths"][str(first)], tokenizer)
        others = []
        for length in config.lengths:
            if run.out_of_time(f"length {length}"):
                continue
            carried = carry_over(main["candidates"], recs)
            more = [(c["id"], c["family"], c["budget"], c["selector"]) for c in carried]
            others.append(_measure_length(run, length, data["lengths"][str(length)], more, select=False))
            references = _kernel_references(run, others[-1:], recs, first_pass=True, done=references)
            _retrieval_further(run, others[-1:], recs, tokenizer)  # before the next, longer length
        holds(recs, main, others)
        _attach_retrieval(others, recs)
        references = _kernel_references(run, [main, *others], recs, first_pass=False, done=references)

    t = _clock()
    results = _assemble(config, cache, model_name, facts, data["info"], main, others, recs, threads, retrieval,
                        command)
    results["kernel_references"] = references
    from spattn.report.render import write_outputs

    run.timed("report", t)
    results["timings"] = {"stages_s": {k: sig(v, 4) for k, v in run.timings.items()},
                          "stages_cpu_s": {k: sig(v, 4) for k, v in run.cpu_timings.items()},
                          "total_s": sig(time.perf_counter() - t_total, 4),
                          "total_cpu_s": sig(time.process_time() - cpu_total, 4),
                          "torch_threads": torch.get_num_threads(),
                          "load_average_start": load_start,
                          "load_average_end": _load_average(),
                          "resumed": cache.resumed,
                          "retimed": retime, "time_budget_s": time_budget,
                          "skipped_for_time": run.skipped_for_time}
    write_outputs(results, Path(output))
    cache.finish()
    from spattn.report.summary import print_summary

    print_summary(results, console, Path(output))
    return results


def _load_data(cache: StageCache, cfg: ReportConfig, tokenizer: Any) -> dict[str, Any]:
    """Token chunks per length: calibration, selection (first length only) and report splits, never overlapping
    within a length. Cached as tensors and plain data (loaded with ``weights_only=True``)."""
    from spattn.report import model as M

    path = cache.root / "data.pt"
    if path.is_file():
        try:  # tensors and plain data only: a planted pickle payload is refused, never run
            return torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling refusal is reported the same way
            raise ValueError(f"refusing to load the cached chunks {path}: not a spattn report cache "
                             f"({type(exc).__name__}); delete it or run with --overwrite") from exc
    lengths: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for n, length in enumerate((cfg.chunk_length, *cfg.lengths)):
        selection = cfg.selection_chunks if n == 0 else 0
        calib, held, part = M.load_chunks(cfg.text, tokenizer, length, cfg.calibration_chunks,
                                          selection + cfg.eval_chunks)
        lengths[str(length)] = {"calibration": calib, "selection": held[:selection].clone(),
                                "report": held[selection:].clone(), "info": part}
        if n == 0:
            info = {"tokens": part["tokens"], "chunks_available": part["chunks_available"],
                    "calibration_indices": part["calibration_indices"],
                    "selection_indices": part["held_out_indices"][:selection],
                    "held_out_indices": part["held_out_indices"][selection:]}
    data = {"lengths": lengths, "info": info}
    torch.save(data, path)
    return data


def _scored(model: Any, chunks: torch.Tensor, refs: list[dict[str, torch.Tensor]], plan: Any, backend: str,
            block_size: int) -> dict[str, list[float]]:
    """Segment sums of the token scores of ``plan`` (None: the unpatched model) on ``chunks``."""
    from spattn.report import model as M

    parts = []
    for start in range(0, chunks.shape[0], _BATCH):  # a few chunks per forward: one layout compile per layer each
        batch = M.logits(model, chunks[start : start + _BATCH], plan, backend=backend, block_size=block_size)
        for logits, ref in zip(batch, refs[start : start + _BATCH], strict=True):
            parts.append(intervals.segment_sums(token_scores(ref, logits)))
    return intervals.merge(parts)


def _measure_length(run: _Run, length: int, chunks: dict[str, Any], wanted: list[tuple], *,
                    select: bool) -> dict[str, Any]:
    """Fit, cover, time and score ``wanted`` candidates at ``length``; returns dense, candidates and skipped."""
    from spattn.report import model as M

    cfg, cache, bars = run.cfg, run.cache, run.bars
    eval_backend, latency_backend = _backends(cfg, length)
    prefix = f"L{length}/"
    splits = ("selection", "report") if select else ("report",)
    pending = [w for w in wanted if cache.get(prefix + cache.candidate_path(w[0])) is None]
    dense = cache.get(prefix + "dense")
    need_model = bool(pending) or dense is None or run.retime
    refs: dict[str, list[dict[str, torch.Tensor]]] = {s: [] for s in splits}
    captures: list = []
    if need_model:
        t = _clock()
        total = sum(chunks[s].shape[0] for s in splits)
        task = bars.stage(f"dense forward, {length} tokens", total)
        for s in splits:
            for start in range(0, chunks[s].shape[0], _BATCH):  # a few chunks per forward, as in _scored
                batch = chunks[s][start : start + _BATCH]
                for ids, logits in zip(batch, M.logits(run.model, batch), strict=True):
                    refs[s].append(dense_reference(logits, ids) | {"ids": ids})
                    bars.advance(task, s)
        run.timed("dense", t)
        t = _clock()
        task = bars.stage(f"capture attention, {length} tokens", chunks["calibration"].shape[0])
        for ids in chunks["calibration"]:
            cap = capture(run.model, ids[None])
            captures.append([(cap.queries[layer], cap.keys[layer]) for layer in cap.layers])
            bars.advance(task, f"{len(captures[-1])} layers")
        run.latency_inputs[length] = latency_inputs(captures, cfg.seed, cfg.device, cfg.latency_dtype)
        run.timed("capture", t)
    if dense is None:
        t = _clock()
        dense = {"length": length}
        for s in splits:
            seg = intervals.merge([intervals.segment_sums({"nll": -r["logp"].gather(-1, r["target"][:, None])[:, 0]})
                                   for r in refs[s]])
            dense[s] = intervals.summarise(seg, seed=cfg.seed) | {"segments_sums": seg}
        dense["perplexity"] = sig(dense["report"]["perplexity"])
        dense["tokens"] = dense["report"]["tokens"]
        if select:  # the integration's sanity check, once: the patched model with full attention is the model
            full = _scored(run.model, chunks["report"], refs["report"], Plan.uniform(Full()), eval_backend,
                           cfg.block_size)
            dense["patched_full_perplexity"] = sig(intervals.summarise(full)["perplexity"])
        dense["attention_gflops"] = sig(4.0 * C.causal_pairs(length) * run.facts["head_dim"] * run.facts["heads"]
                                        * run.facts["layers"] / 1e9)
        dense["latency"] = dense_latency(captures, latency_backend, cfg.latency_repeats, cfg.seed, cfg.block_size,
                                         cfg.device, cfg.latency_dtype)
        cache.put(prefix + "dense", dense)
        run.timed("dense", t)
    elif run.retime:
        dense["latency"] = dense_latency(captures, latency_backend, cfg.latency_repeats, cfg.seed, cfg.block_size,
                                         cfg.device, cfg.latency_dtype)
        cache.put(prefix + "dense", dense)

    cov_key = lambda cid: prefix + "coverage/" + cache.candidate_path(cid).split("/", 1)[1]  # noqa: E731
    need_cov = [w for w in pending if cache.get(cov_key(w[0])) is None]
    if need_cov:
        t = _clock()
        task = bars.stage(f"fit candidates, {length} tokens", len(need_cov))
        fitted = []
        for cid, fam, b, sel in need_cov:
            cand = _fit(run, length, fam, b, sel, captures)
            if cand.pattern is None:
                cache.put(cov_key(cid), _base(cand, fam, b, sel) | {"pattern": None, "note": cand.note})
            else:
                fitted.append(cand)
            bars.advance(task, cid)
        run.timed("fit", t)
        t = _clock()
        task = bars.stage(f"coverage, {length} tokens", len(captures) * len(captures[0]))
        cov = {} if not fitted else coverage_pass(fitted, captures, block_size=cfg.block_size,
                                                  head_dim=run.facts["head_dim"],
                                                  progress=lambda d: bars.advance(task, d), device=cfg.device)
        for cand in fitted:
            cache.put(cov_key(cand.id), _base(cand, cand.family, cand.budget, cand.selector)
                      | {"label": cand.label, "pattern": cand.pattern.to_dict(), "parameter": cand.parameter}
                      | ({"plan": cand.plan.to_dict()} if cand.plan is not None else {})
                      | cov[cand.id])
        run.timed("coverage", t)

    t = _clock()
    task = bars.stage(f"model damage and latency, {length} tokens", len(wanted))
    records, skipped, partial = [], [], {}
    first_split = splits[0]
    for cid, *_ in wanted:  # latency and the first split (selection at the first length) for every candidate
        rec = cache.get(prefix + cache.candidate_path(cid))
        if rec is None:
            rec = cache.get(prefix + "scored/" + cache.candidate_path(cid).split("/", 1)[1])
        if rec is None:
            rec = cache.get(cov_key(cid))
            if rec.get("pattern") is not None and run.out_of_time(f"{cid} at {length} tokens"):
                rec = {k: rec[k] for k in ("id", "family", "family_title", "budget", "selector", "dynamic")} | {
                    "pattern": None, "note": "not measured: the run's --time-budget was spent", "out_of_time": True}
            elif rec.get("pattern") is not None:
                rec = _finish_candidate(run, rec, captures, {first_split: refs[first_split]}, dense, eval_backend,
                                        latency_backend)
                cache.put(prefix + "scored/" + cache.candidate_path(cid).split("/", 1)[1], rec)
        elif run.retime and rec.get("pattern") is not None:
            rec["latency"] = candidate_latency(pattern_from_dict(rec["pattern"]), captures,
                                               block_size=cfg.block_size, backend=latency_backend,
                                               repeats=cfg.latency_repeats, seed=cfg.seed, memo=run.latency_memo,
                                               device=cfg.device, dtype=cfg.latency_dtype)
        partial[cid] = rec
        bars.advance(task, cid)
    # Note [report split only for contenders]: the report split is scored only for the candidates that can still
    # be recommended or compared with a recommendation (each budget's best, the candidates tied with it and the
    # runner-up, all decided on the selection split); the others keep their selection-split numbers, marked so.
    scored = [r for r in partial.values() if r.get("pattern") is not None]
    want_report = contenders(scored, list(cfg.budgets)) if select else {r["id"] for r in scored}
    if select:
        task = bars.stage(f"report split of {len(want_report)} contenders", len(want_report))
    for cid, *_ in wanted:
        rec = partial[cid]
        if rec.get("pattern") is not None and "report" not in rec["model"]["splits"] and cid in want_report:
            rec = _finish_candidate(run, rec, captures, {"report": refs["report"]}, dense, eval_backend,
                                    latency_backend, keep=rec)
            bars.advance(task, cid)
        if rec.get("pattern") is not None and "report" not in rec["model"]["splits"]:
            rec = rec | {"model": _shown_numbers(rec["model"]["splits"], dense, "selection")
                         | {"backend": rec["model"].get("backend", eval_backend)}}
        if not rec.get("out_of_time"):
            cache.put(prefix + cache.candidate_path(cid), rec)
        (records if rec.get("pattern") is not None else skipped).append(rec)
    run.timed("model", t)
    for r in records:
        r["within_budget"] = r["cost"]["keys_fraction"] <= r["budget"]
    return {"length": length, "dense": dense, "candidates": records, "skipped": skipped,
            "backends": {"model_eval": eval_backend, "latency": latency_backend, "latency_dtype": cfg.latency_dtype}}


def _fit(run: _Run, length: int, family: str, budget: float, selector: str | None,
         captures: list) -> C.Candidate:
    cfg = run.cfg
    n_layers = len(captures[0])
    if family in ("plan", "learned") and length != cfg.chunk_length:
        # the budget rule of a plan picked at the first length carries it here (Plan.at_length)
        cid = _cid(family, budget, selector)
        plan = Plan.from_dict(run.first[cid]["plan"]).at_length(length)
        cand = C.plan_candidate(cid, family, budget, plan, n_layers)
        cand.label = run.first[cid]["label"]
        return cand
    if family == "plan":
        if length not in run.planner_tables:
            run.planner_tables[length] = C.planner_table(captures, length, cfg.block_size, cfg.device)
        return C.fit_plan(run.planner_tables[length], budget, length, cfg.block_size)
    if family == "learned":
        if cfg.gates is None:
            return C.Candidate(_cid(family, budget, selector), family, budget, None, "", {}, True,
                               note="no saved gate was given for this model (--gates PATH: a checkpoint written by "
                                    "spattn.learned.save_gates), so the learned family was not measured")
        return C.fit_learned(cfg.gates, budget, length, cfg.block_size, n_layers)
    if family == "hierarchical":
        return C.fit_hierarchical(budget, length, cfg.block_size)
    if family != "top_p":
        return C.static_candidates(family, budget, length, cfg.block_size, cfg.seed)
    layers = captures[0]
    picks = sorted({0, len(layers) // 3, (2 * len(layers)) // 3, len(layers) - 1})
    probes = [(layers[i][0].to(cfg.device), layers[i][1].to(cfg.device)) for i in picks]
    return C.fit_dynamic(selector, budget, length, cfg.block_size, probes)


def _base(cand: C.Candidate, family: str, budget: float, selector: str | None) -> dict[str, Any]:
    return {"id": cand.id, "family": family, "family_title": C.FAMILY_TITLES[family], "budget": budget,
            "selector": selector, "dynamic": cand.dynamic}


def _finish_candidate(run: _Run, rec: dict[str, Any], captures: list, refs: dict[str, list], dense: dict,
                      eval_backend: str, latency_backend: str, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Latency and model damage on the ``refs`` splits (with intervals) of a candidate whose coverage is measured;
    ``keep``: a record already timed and scored on other splits (its latency and splits are kept)."""
    cfg = run.cfg
    pattern = pattern_from_dict(rec["pattern"])
    if keep is not None:
        latency, model = keep["latency"], dict(keep["model"]["splits"])
    else:
        latency = candidate_latency(pattern, captures, block_size=cfg.block_size, backend=latency_backend,
                                    repeats=cfg.latency_repeats, seed=cfg.seed, memo=run.latency_memo,
                                    device=cfg.device, dtype=cfg.latency_dtype)
        model = {}
    plan = _plan_of(rec)
    length = int(refs[next(iter(refs))][0]["ids"].shape[-1])
    eval_backend = _scoring_backend(eval_backend, rec)
    key = _layout_key(plan, length, cfg.block_size, run.facts["layers"], run.facts["heads"])
    for split, split_refs in refs.items():
        memo_key = None if key is None else (length, split, key)
        if memo_key in run.scored_memo:  # Note [one forward per layout]
            model[split] = run.scored_memo[memo_key]
            continue
        chunks = torch.stack([r["ids"] for r in split_refs])
        seg = _scored(run.model, chunks, split_refs, plan, eval_backend, cfg.block_size)
        model[split] = intervals.summarise(seg, seed=cfg.seed) | {"segments_sums": seg}
        if memo_key is not None:
            run.scored_memo[memo_key] = model[split]
    shown = "report" if "report" in model else next(iter(model))
    return rec | {"latency": latency, "model": _shown_numbers(model, dense, shown) | {"backend": eval_backend}}


def _scoring_backend(default: str, rec: dict[str, Any]) -> str:
    """The backend of a candidate's patched forwards: ``default``, or on the CPU the reference backend for the
    layouts it runs faster than the dense backend (Note [scoring backend per candidate])."""
    # Note [scoring backend per candidate]: on the CPU the dense backend (SDPA under the layout's token mask)
    # costs a full L x L product per head whatever the layout; the reference backend visits only the kept
    # blocks, about 1.6 ms per 64 x 64 block of SmolLM2's 9 heads against the dense backend's ~120 ms at 1024
    # tokens (one layer, one thread, this machine: dense causal 214 ms on the reference), so it is faster below
    # about half of the causal blocks; a dynamic selection with token-level partial blocks runs it several times
    # slower (session 5: 250 ms), and a Hierarchical layer 3x faster (0.2-0.3 s against 0.7-1.0 s). The rule is
    # on the layout's cost, not on a timing, so the same configuration always takes the same backend (and gives
    # the same numbers: Note [one forward per layout]). Both backends compute the same attention (the reference is
    # the oracle the dense backend is tested against); results.json records which ran (candidates[].model.backend).
    if default != "dense":
        return default
    if rec["family"] == "hierarchical":
        return "reference"
    if rec.get("dynamic") or rec["cost"]["block_fraction"] > REFERENCE_MAX_BLOCK_FRACTION:
        return default
    return "reference"


def _layout_key(plan: Plan, length: int, block_size: int, layers: int, heads: int) -> str | None:
    """A digest of the layouts ``plan`` compiles to in every layer at ``length`` (None for a dynamic plan, whose
    layouts depend on the input): two candidates with the same key give the same model numbers."""
    # Note [one forward per layout]: families often meet at a budget (Budgeted(k) compiles to the same Sinks |
    # Window layout as the sinks_window candidate; a plan may choose one pattern everywhere): the patched forward
    # is the report's largest cost on a CPU (a few seconds per 512 tokens for SmolLM2 on 2 cores), so each
    # distinct static layout is scored once per split and length, and its twins reuse the numbers, which are
    # exactly theirs (the same layouts give the same logits).
    import hashlib

    patterns = [plan.pattern_for(i) for i in range(layers)]
    if any(p is not None and p.contains_dynamic() for p in patterns):
        return None
    digest = hashlib.sha256()
    compiled: dict[str, str] = {}
    for pattern in patterns:
        spec = "full" if pattern is None else repr(pattern.to_dict())
        if spec not in compiled:
            lay = spattn.compile(pattern or Full(), length, length, causal=True, block_size=block_size,
                                 heads=heads)
            compiled[spec] = layout_fingerprint(lay)
        digest.update(compiled[spec].encode())
    return digest.hexdigest()[:16]


def _shown_numbers(splits: dict[str, Any], dense: dict, split: str) -> dict[str, Any]:
    """The numbers a candidate shows, from ``split`` (the report split, or the selection split for a candidate
    that could not win a budget there: ``split`` says which), against dense on the same split."""
    summary = splits[split]
    ppl = summary["perplexity"]
    dense_ppl = dense[split]["perplexity"]
    return {
        "split": split,
        "perplexity": sig(ppl),
        "perplexity_interval": [sig(x) for x in summary["perplexity_interval"]],
        "perplexity_delta": sig(ppl - dense_ppl),
        "perplexity_ratio": sig(ppl / dense_ppl),
        "top1_agreement": sig(summary["top1_agreement"]),
        "top1_agreement_interval": [sig(x) for x in summary["top1_agreement_interval"]],
        "kl": sig(summary["kl"]),
        "kl_interval": [sig(x) for x in summary["kl_interval"]],
        "splits": splits,
    }


def _retrieval_at(run: _Run, part: dict[str, Any], recs: list[dict[str, Any]], tokenizer: Any, length: int,
                  key: str) -> dict[str, Any] | None:
    """Pass-key accuracy of dense and of each pick and runner-up of ``part`` (one measured length) on the same
    samples at ``length`` tokens, cached as stage ``key``; None when there is no time left for it."""
    cfg = run.cfg
    cached = run.cache.get(key)
    if cached is not None:
        return cached
    if run.out_of_time(key):
        return None
    from spattn.data.corpora import load_text
    from spattn.eval.retrieval import make_samples, retrieval_accuracy

    t = _clock()
    by_id = {c["id"]: c for c in part["candidates"]}
    wanted = dict.fromkeys(x for r in recs for x in (r.get("candidate"), r.get("runner_up")))
    ids = [i for i in wanted if i in by_id]
    task = run.bars.stage("pass-key retrieval" + ("" if length == cfg.chunk_length else f", {length} tokens"),
                          len(ids) + 1)
    depths = (0.1, 0.5, 0.9)
    seeds = range(-(-cfg.retrieval_samples // len(depths)))
    samples = make_samples("passkey", tokenizer, load_text(cfg.text), [length], depths, seeds)[: cfg.retrieval_samples]
    eval_backend = part["backends"]["model_eval"]
    results = {}
    for cid in [None, *ids]:  # one batched forward per configuration (the samples have equal lengths)
        plan = None if cid is None else _plan_of(by_id[cid])
        backend = eval_backend if cid is None else by_id[cid]["model"].get("backend", eval_backend)
        got = retrieval_accuracy(run.model, tokenizer, samples, plan, backend, block_size=cfg.block_size,
                                 batch_size=len(samples))
        results["dense" if cid is None else cid] = {
            "accuracy": sig(got.accuracy.value), "interval": [sig(got.accuracy.low), sig(got.accuracy.high)],
            "correct": got.correct}
        run.bars.advance(task, cid or "dense")
    cached = {"task": "passkey", "length": length, "depths": list(depths), "samples": len(samples),
              "results": results}
    run.cache.put(key, cached)
    run.timed("retrieval", t)
    return cached


def _retrieval(run: _Run, main: dict[str, Any], recs: list[dict[str, Any]], tokenizer: Any) -> dict[str, Any] | None:
    """Pass-key retrieval (the evaluation suite's task) of dense, each pick and its runner-up at the first length,
    on the same samples; each recommendation learns whether retrieval agrees with it (paired bootstrap)."""
    if run.cfg.retrieval_samples == 0:
        return None
    cached = _retrieval_at(run, main, recs, tokenizer, run.cfg.chunk_length, "retrieval")
    if cached is None:
        return None
    from spattn.eval.stats import compare

    res = cached["results"]
    for rec in recs:
        pick, runner = res.get(rec.get("candidate")), res.get(rec.get("runner_up"))
        if pick is None:
            continue
        rec["retrieval"] = {"accuracy": pick["accuracy"], "dense_accuracy": res["dense"]["accuracy"]}
        if runner is not None:
            verdict = compare([float(x) for x in pick["correct"]], [float(x) for x in runner["correct"]])
            rec["retrieval"]["against_runner_up"] = {"a": "better", "b": "worse", "tie": "tie"}[verdict.winner]
            if verdict.winner == "b":
                rec["for_retrieval"] = rec["runner_up"]
        rec["profiles"] = task_profiles(rec, res)
    return cached


def _retrieval_further(run: _Run, others: list[dict[str, Any]], recs: list[dict[str, Any]], tokenizer: Any) -> None:
    """Note [retrieval at every length]: the pass keys at each further length, for dense and the picks and
    runners-up re-fitted there, right after that length is measured (so that a --time-budget spent on a longer
    length does not take the evidence of a shorter one); the length's part gets ``retrieval`` (the same record
    as the first length's)."""
    if run.cfg.retrieval_samples == 0 or not run.cfg.retrieval_at_every_length:
        return
    for part in others:
        length = part["length"]
        got = _retrieval_at(run, part, recs, tokenizer, length, f"retrieval@{length}")
        if got is not None:
            part["retrieval"] = got


def _attach_retrieval(others: list[dict[str, Any]], recs: list[dict[str, Any]]) -> None:
    """Each recommendation's entry for a further length gets the pick's and dense's pass-key accuracy there
    (after :func:`holds` has made the entries)."""
    for part in others:
        got, length = part.get("retrieval"), part["length"]
        if got is None:
            continue
        res = got["results"]
        for rec in recs:
            # the pick keeps its id at every length (carry_over re-fits the same family and budget)
            pick = res.get(rec.get("candidate"))
            entry = next((e for e in rec.get("lengths", []) if e["length"] == length), None)
            if pick is not None and entry is not None:
                entry["retrieval"] = {"accuracy": pick["accuracy"], "dense_accuracy": res["dense"]["accuracy"]}


def _kernel_references(run: _Run, measured: list[dict[str, Any]], recs: list[dict[str, Any]], *,
                       first_pass: bool, done: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """spattn's kernel against FlexAttention and SDPA (:func:`~spattn.report.evaluate.kernel_references`) for dense
    causal and each budget's pick, at every measured length, on that length's timed layer (``kernel_references``
    of the configuration: on by default on CUDA).

    Two passes (Note [kernel references first]): ``first_pass`` times dense causal and the middle budget's pick of
    the lengths in ``measured`` (called after each length is measured); the second, after retrieval, the other
    picks at every length (``done``: the record so far, extended in place). A row is
    skipped, and said so, when the time it would take (the slowest row so far, which holds a JIT compile) does not
    fit the run's ``--time-budget``. Rows go to the stage cache as soon as they are timed."""
    # Note [kernel references first]: on the GPU the Flex reference is what the CUDA report is run for, and each
    # row holds a torch.compile of flex_attention (a new BlockMask shape), so the most telling rows go first, each
    # length's right after it is measured (while its attention inputs are at hand and before a --time-budget runs
    # out on the longer lengths).
    cfg = run.cfg
    if not cfg.kernel_references:
        return None
    if done is not None and done.get("complete"):  # read back from the cache by an earlier pass
        return done
    cached = run.cache.get("kernel_references")
    if cached is not None and not run.retime:
        return cached
    t = _clock()
    backend = _backends(cfg, cfg.chunk_length)[1]
    out: dict[str, Any] = done or {"backend": backend, "rows": [], "skipped": [], "row_seconds": []}
    middle = recs[len(recs) // 2]["budget"] if recs else None
    todo = []
    for part in measured:
        by_id = {c["id"]: c for c in part["candidates"]}
        rows = [("dense causal", None, Full().to_dict())]  # compiled with causal=True
        for rec in recs:
            cand = by_id.get(rec.get("candidate"))
            if cand is not None:
                rows.append((cand["label"], rec["budget"], cand["pattern"]))
        seen = []
        for label, budget, pattern in rows:
            if pattern in seen:
                continue
            seen.append(pattern)
            if first_pass == (budget is None or budget == middle):
                todo.append((part["length"], label, budget, pattern))
    task = run.bars.stage("kernel references (Flex, SDPA)" + ("" if first_pass else ", other picks"), len(todo))
    for length, label, budget, pattern in todo:
        what = f"kernel references of {label} at {length} tokens"
        inputs = run.latency_inputs.get(length)
        estimate = max(out["row_seconds"], default=0.0)
        if inputs is None:
            out["skipped"].append(f"{what}: no attention inputs in this run (all of its stages were cached); "
                                  "rerun with --retime")
        elif run.out_of_time(what, estimate):
            out["skipped"].append(f"{what}: would not fit the run's --time-budget (a row took up to "
                                  f"{estimate:.1f} s)")
        else:
            t_row = time.perf_counter()
            try:
                row = kernel_references(pattern_from_dict(pattern), *inputs, block_size=cfg.block_size,
                                        backend=backend)
            except Exception as exc:  # noqa: BLE001 - a reference that cannot run is reported, the report goes on
                out["skipped"].append(f"{what}: failed ({type(exc).__name__}: {str(exc)[:300]})")
            else:
                out["rows"].append({"length": length, "label": label, "budget": budget} | row)
            out["row_seconds"].append(sig(time.perf_counter() - t_row, 3))
            run.cache.put("kernel_references_partial", out)
        run.bars.advance(task, f"{label} @ {length}")
    if not first_pass:
        out["complete"] = True
        run.cache.put("kernel_references", out)
    run.timed("kernel_references", t)
    return out


def _threads(run: _Run, main: dict[str, Any], recs: list[dict[str, Any]], chunks: dict[str, Any],
             tokenizer: Any) -> dict[str, Any] | None:
    """Which threads the pick of the middle budget cuts, on the first held-out report chunk."""
    if not run.cfg.threads:
        return None
    by_id = {c["id"]: c for c in main["candidates"]}
    picked = [x for x in recs if x["candidate"] in by_id]
    if not picked:
        return None
    choice = picked[len(picked) // 2]
    cached = run.cache.get("threads")
    if cached is not None and cached.get("candidate") == choice["candidate"]:
        return cached
    if run.out_of_time("threads"):
        return None
    t = _clock()
    task = run.bars.stage("threads the pick cuts", 1)
    ids = chunks["report"][0]
    cap = capture(run.model, ids[None])
    layers = [(cap.queries[layer], cap.keys[layer]) for layer in cap.layers]
    cand = by_id[choice["candidate"]]
    out = dropped_threads(_plan_of(cand), layers, block_size=run.cfg.block_size,
                          device=run.cfg.device)
    out |= {"candidate": cand["id"], "budget": choice["budget"], "label": cand["label"],
            "tokens": [tokenizer.decode([int(t)]) for t in ids]}
    run.cache.put("threads", out)
    run.bars.advance(task, cand["id"])
    run.timed("threads", t)
    return out


def _frontier(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {
        # perplexity over dense on the same split: candidates shown with selection-split numbers compare fairly
        "perplexity": pareto([(r["id"], r["cost"]["keys_fraction"], r["model"]["perplexity_ratio"]) for r in records]),
        "recall": pareto([(r["id"], r["cost"]["keys_fraction"], r["recall"]["mean"]) for r in records], maximize=True),
    }


def _assemble(cfg: ReportConfig, cache: StageCache, model_name: str, facts: dict, data_info: dict,
              main: dict[str, Any], others: list[dict[str, Any]], recs: list[dict[str, Any]],
              threads: dict[str, Any] | None, retrieval: dict[str, Any] | None, command: str | None) -> dict:
    if command is None:
        command = " ".join(shlex.quote(a) for a in ["spattn", *sys.argv[1:]]) if sys.argv else "spattn report"
    lengths = [{"length": o["length"], "dense": o["dense"], "candidates": o["candidates"], "skipped": o["skipped"],
                "backends": o["backends"], "frontier": _frontier(o["candidates"]), "retrieval": o.get("retrieval")}
               for o in others]
    return {
        "format": FORMAT,
        "command": command,
        "config": cfg.to_dict(),
        "digest": cache.digest,
        "environment": machine_info(cfg.device),
        "model": {"name": model_name, "source": cfg.model, **facts},
        "data": {"text": cfg.text, "chunk_length": cfg.chunk_length, **data_info},
        "backends": main["backends"],
        "definitions": {"recall_percentile": 5, "cost": "kept (query, key) pairs / dense causal pairs",
                        "block_cost": "visited key blocks / causally visible key blocks",
                        "top_k_agreement": 1, "interval": "95% percentile bootstrap over 64-token segments",
                        "tie": "a paired-bootstrap interval of the per-token log-likelihood difference that "
                               "contains 0"},
        "dense": main["dense"],
        "candidates": main["candidates"],
        "skipped": main["skipped"],
        "frontier": _frontier(main["candidates"]),
        "recommendations": recs,
        "lengths": lengths,
        "threads": threads,
        "retrieval": retrieval,
        "quick": {"omits": quick_omits(cfg)} if cfg.quick else None,
    }
