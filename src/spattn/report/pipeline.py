"""``run_report``: the stages of ``spattn report`` with progress bars, caching and resume."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from spattn._optional import require
from spattn.bench.env import machine_info
from spattn.eval.lm import compare_logits, dense_nll, dense_reference
from spattn.integrations.capture import capture
from spattn.report import candidates as C
from spattn.report.config import ReportConfig
from spattn.report.evaluate import candidate_latency, coverage_pass, dense_latency, sig
from spattn.report.frontier import pareto, recommend
from spattn.report.stages import StageCache

FORMAT = "spattn.report/1"


def _backends(cfg: ReportConfig) -> tuple[str, str]:
    """(backend of the patched model's forwards, backend timed for latency)."""
    if torch.device(cfg.device).type == "cuda":
        return "auto", "triton"
    # on CPU the dense backend (SDPA with the layout's mask) gives the same numbers as the blockwise reference
    # much faster at these lengths; latency is measured with the reference, spattn's CPU backend
    return ("dense" if cfg.chunk_length ** 2 <= 1 << 26 else "reference"), "reference"


def candidate_ids(cfg: ReportConfig) -> list[tuple[str, float, str | None]]:
    out = []
    for b in cfg.budgets:
        for fam in cfg.families:
            if fam == "top_p":
                out.extend(("top_p", b, s) for s in cfg.selectors)
            else:
                out.append((fam, b, None))
    return out


def _cid(family: str, budget: float, selector: str | None) -> str:
    return f"top_p:{selector}@{budget:g}" if family == "top_p" else f"{family}@{budget:g}"


class _Bars:
    """One rich progress bar per stage (silent when the console is not a terminal and quiet is asked)."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[detail]}"), console=console,
                                 transient=False)

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def stage(self, name: str, total: int) -> Any:
        return self.progress.add_task(name, total=total, detail="")

    def advance(self, task: Any, detail: str = "", step: float = 1) -> None:
        self.progress.update(task, advance=step, detail=detail)


def run_report(config: ReportConfig, output: str | os.PathLike, *, overwrite: bool = False, fresh: bool = False,
               console: Any = None, command: str | None = None) -> dict[str, Any]:
    """Run every stage of the report into ``output`` and return the results (also written as results.json).

    Finished stages are cached under ``output/.spattn-report/<config digest>/``; re-running the same command
    after an interruption resumes from them.
    """
    from rich.console import Console

    console = console or Console()
    t_total = time.perf_counter()
    require("transformers", extra="hf")
    require("matplotlib", extra="viz")
    if torch.device(config.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked but no CUDA GPU is available; use --device cpu")
    from spattn.report import model as M

    M.preflight(config.model, config.text)
    cache = StageCache(Path(output), config.digest(), overwrite=overwrite, fresh=fresh)
    if cache.resumed:
        console.print(f"[yellow]resuming[/] from cached stages in {cache.root}")
    timings: dict[str, float] = {}
    eval_backend, latency_backend = _backends(config)
    torch.manual_seed(config.seed)

    with _Bars(console) as bars:
        t = time.perf_counter()
        task = bars.stage("load model and text", 2)
        try:
            model, tokenizer, model_name = M.load_model(config.model, config.device)
            facts = M.model_facts(model)
            bars.advance(task, model_name)
            data_path = cache.root / "data.pt"
            if data_path.is_file():
                try:  # tensors and plain data only: a planted pickle payload is refused, never run
                    saved = torch.load(data_path, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - any unpickling refusal is reported the same way
                    raise ValueError(f"refusing to load the cached chunks {data_path}: not a spattn report cache "
                                     f"({type(exc).__name__}); delete it or run with --overwrite") from exc
                calib, held, data_info = saved["calibration"], saved["held_out"], saved["info"]
            else:
                calib, held, data_info = M.load_chunks(config.text, tokenizer, config.chunk_length,
                                                       config.calibration_chunks, config.eval_chunks)
                torch.save({"calibration": calib, "held_out": held, "info": data_info}, data_path)
        except (ValueError, OSError, ImportError):
            cache.discard()  # nothing was computed: leave no half-made output directory behind
            raise
        bars.advance(task, f"{data_info['tokens']} tokens")
        timings["load"] = time.perf_counter() - t

        wanted = [(_cid(f, b, s), f, b, s) for f, b, s in candidate_ids(config)]
        pending = [w for w in wanted if cache.get(cache.candidate_path(w[0])) is None]
        dense = cache.get("dense")
        refs: list[dict[str, torch.Tensor]] = []
        captures: list = []
        if pending or dense is None:
            t = time.perf_counter()
            task = bars.stage("dense forward on held-out chunks", held.shape[0])
            nll = tokens = nll_full = 0.0
            for i in range(held.shape[0]):
                ref = dense_reference(M.logits(model, held[i]), held[i])
                ref["ids"] = held[i]
                refs.append(ref)
                if dense is None:
                    nll += dense_nll(ref)
                    tokens += int(ref["target"].numel())
                    import spattn
                    from spattn.integrations.plan import Plan

                    full = compare_logits(ref, M.logits(model, held[i], Plan.uniform(spattn.Full()),
                                                        backend=eval_backend, block_size=config.block_size))
                    nll_full += full["nll"]
                bars.advance(task, f"chunk {i + 1}")
            timings["dense"] = time.perf_counter() - t
            t = time.perf_counter()
            task = bars.stage("capture attention (calibration)", calib.shape[0])
            for i in range(calib.shape[0]):
                cap = capture(model, calib[i][None])
                captures.append([(cap.queries[layer], cap.keys[layer]) for layer in cap.layers])
                bars.advance(task, f"chunk {i + 1}: {len(captures[-1])} layers")
            timings["capture"] = time.perf_counter() - t
            if dense is None:
                dense = {
                    "perplexity": sig(M.perplexity(nll, int(tokens))),
                    "nll_sum": sig(nll, 10),
                    "tokens": int(tokens),
                    "patched_full_perplexity": sig(M.perplexity(nll_full, int(tokens))),
                    "latency": dense_latency(captures, latency_backend, config.latency_repeats, config.seed,
                                             config.block_size),
                    "attention_gflops": sig(4.0 * C.causal_pairs(config.chunk_length) * facts["head_dim"]
                                            * facts["heads"] * facts["layers"] / 1e9),
                }
                cache.put("dense", dense)

        records: list[dict[str, Any]] = []
        skipped: list[dict[str, Any]] = []
        cov_key = lambda cid: "coverage/" + cache.candidate_path(cid).split("/", 1)[1]  # noqa: E731
        need_cov = [w for w in pending if cache.get(cov_key(w[0])) is None]
        if need_cov:
            t = time.perf_counter()
            task = bars.stage("fit candidates to budgets", len(need_cov))
            fitted = []
            for cid, fam, b, sel in need_cov:
                cand = _fit(config, fam, b, sel, captures)
                if cand.pattern is None:
                    cache.put(cov_key(cid), _base(cand, fam, b, sel) | {"pattern": None, "note": cand.note})
                else:
                    fitted.append(cand)
                bars.advance(task, cid)
            timings["fit"] = time.perf_counter() - t
            t = time.perf_counter()
            n_steps = len(captures) * len(captures[0])
            task = bars.stage("coverage on captured attention", n_steps)
            cov = {} if not fitted else coverage_pass(fitted, captures, block_size=config.block_size,
                                                      head_dim=facts["head_dim"],
                                                      progress=lambda d: bars.advance(task, d))
            for cand in fitted:
                cache.put(cov_key(cand.id), _base(cand, cand.family, cand.budget, cand.selector)
                          | {"label": cand.label, "pattern": cand.pattern.to_dict(), "parameter": cand.parameter}
                          | cov[cand.id])
            timings["coverage"] = time.perf_counter() - t

        t = time.perf_counter()
        task = bars.stage("model damage and latency", len(wanted))
        for cid, *_ in wanted:
            rec = cache.get(cache.candidate_path(cid))
            if rec is None:
                rec = cache.get(cov_key(cid))
                if rec.get("pattern") is not None:
                    bars.advance(task, f"{cid}", 0)
                    rec = _finish_candidate(config, rec, captures, refs, model, dense, eval_backend, latency_backend)
                cache.put(cache.candidate_path(cid), rec)
            (records if rec.get("pattern") is not None else skipped).append(rec)
            bars.advance(task, cid)
        timings["model"] = time.perf_counter() - t
    del captures, refs

    t = time.perf_counter()
    results = _assemble(config, cache, model_name, facts, data_info, dense, records, skipped, eval_backend,
                        latency_backend, command)
    from spattn.report.render import write_outputs

    timings["report"] = time.perf_counter() - t
    results["timings"] = {"stages_s": {k: sig(v, 4) for k, v in timings.items()},
                          "total_s": sig(time.perf_counter() - t_total, 4), "resumed": cache.resumed}
    write_outputs(results, Path(output))
    cache.finish()
    from spattn.report.summary import print_summary

    print_summary(results, console, Path(output))
    return results


def _fit(cfg: ReportConfig, family: str, budget: float, selector: str | None, captures: list) -> C.Candidate:
    if family != "top_p":
        return C.static_candidates(family, budget, cfg.chunk_length, cfg.block_size, cfg.seed)
    layers = captures[0]
    picks = sorted({0, len(layers) // 3, (2 * len(layers)) // 3, len(layers) - 1})
    return C.fit_dynamic(selector, budget, cfg.chunk_length, cfg.block_size, [layers[i] for i in picks])


def _base(cand: C.Candidate, family: str, budget: float, selector: str | None) -> dict[str, Any]:
    return {"id": cand.id, "family": family, "family_title": C.FAMILY_TITLES[family], "budget": budget,
            "selector": selector, "dynamic": cand.dynamic}


def _finish_candidate(cfg: ReportConfig, rec: dict[str, Any], captures: list, refs: list, model: Any, dense: dict,
                      eval_backend: str, latency_backend: str) -> dict[str, Any]:
    """Latency and model damage of a candidate whose coverage is measured."""
    import spattn
    from spattn.integrations.plan import Plan
    from spattn.report import model as M

    if rec["dynamic"]:
        import spattn.selectors  # noqa: F401  (registers TopP for pattern_from_dict)
    pattern = spattn.pattern_from_dict(rec["pattern"])
    latency = candidate_latency(pattern, captures, block_size=cfg.block_size, backend=latency_backend,
                                repeats=cfg.latency_repeats, seed=cfg.seed)
    nll = agree = kl = tokens = 0.0
    plan = Plan.uniform(pattern)
    for ref in refs:
        s = compare_logits(ref, M.logits(model, ref["ids"], plan, backend=eval_backend, block_size=cfg.block_size))
        nll += s["nll"]
        agree += s["agree"]
        kl += s["kl"]
        tokens += s["tokens"]
    ppl = M.perplexity(nll, int(tokens))
    return rec | {
        "latency": latency,
        "model": {
            "perplexity": sig(ppl),
            "perplexity_delta": sig(ppl - dense["perplexity"]),
            "perplexity_ratio": sig(ppl / dense["perplexity"]),
            "top1_agreement": sig(agree / tokens),
            "kl": sig(kl / tokens),
        },
    }


def _assemble(cfg: ReportConfig, cache: StageCache, model_name: str, facts: dict, data_info: dict, dense: dict,
              records: list, skipped: list, eval_backend: str, latency_backend: str, command: str | None) -> dict:
    base_ms = dense["latency"]["spattn_causal_ms"]
    sdpa_ms = dense["latency"]["sdpa_ms"]
    for r in records:
        ms = r["latency"]["median_ms"]
        r["latency"]["speedup_vs_dense"] = sig(base_ms / ms, 4) if ms > 0 else None
        r["latency"]["speedup_vs_sdpa"] = sig(sdpa_ms / ms, 4) if ms > 0 else None
        r["within_budget"] = r["cost"]["keys_fraction"] <= r["budget"]
    frontier = {
        "perplexity": pareto([(r["id"], r["cost"]["keys_fraction"], r["model"]["perplexity"]) for r in records]),
        "recall": pareto([(r["id"], r["cost"]["keys_fraction"], r["recall"]["mean"]) for r in records], maximize=True),
    }
    if command is None:
        command = " ".join(shlex.quote(a) for a in ["spattn", *sys.argv[1:]]) if sys.argv else "spattn report"
    return {
        "format": FORMAT,
        "command": command,
        "config": cfg.to_dict(),
        "digest": cache.digest,
        "environment": machine_info(cfg.device),
        "model": {"name": model_name, "source": cfg.model, **facts},
        "data": {"text": cfg.text, "chunk_length": cfg.chunk_length, **data_info},
        "backends": {"model_eval": eval_backend, "latency": latency_backend},
        "definitions": {"recall_percentile": 5, "cost": "kept (query, key) pairs / dense causal pairs",
                        "top_k_agreement": 1},
        "dense": dense,
        "candidates": records,
        "skipped": skipped,
        "frontier": frontier,
        "recommendations": recommend(records, list(cfg.budgets)),
    }
