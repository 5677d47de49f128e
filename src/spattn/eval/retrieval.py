"""Retrieval by a real model, dense or under a plan: pass keys, multi-needle, variable tracking.

* :func:`retrieval_accuracy`: per-sample exact match and the accuracy with its bootstrap interval.
* :func:`retrieval_grid`: task x lengths x depths x seeds for several plans on the same samples; per cell
  accuracy (the depth x length heatmap), per plan overall accuracy, and a paired comparison of every plan
  with the first one (dense), ties called as ties.

Exact match is judged in one forward pass: the prompt followed by the answer's tokens (teacher forcing); the
sample counts as found when the argmax at every answer position is the next answer token, which is exactly
when greedy decoding emits the answer.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from spattn.eval import stats
from spattn.eval.tasks import RetrievalSample, multi_needle, passkey, variable_tracking
from spattn.integrations.hf import patched
from spattn.integrations.plan import Plan, as_plan
from spattn.patterns import Pattern

TASKS: dict[str, Callable[..., RetrievalSample]] = {
    "passkey": passkey,
    "variable_tracking": variable_tracking,
    "multi_needle": multi_needle,
}


@dataclass
class RetrievalResult:
    """Exact-match retrieval of one configuration on a list of samples.

    Attributes:
        correct: one bool per sample, in the order given.
        accuracy: mean of ``correct`` with its percentile bootstrap interval over samples.
        predictions: per sample, the text of the argmax tokens at the answer positions (teacher forced).
        seconds: wall-clock time of the forward passes.
    """

    correct: list[bool]
    accuracy: stats.Estimate
    predictions: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["accuracy"] = self.accuracy.to_dict()
        return out

    def __str__(self) -> str:
        return f"{sum(self.correct)}/{len(self.correct)} found, accuracy {self.accuracy}"


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _configuration(model: torch.nn.Module, plan: Plan | Pattern | None, backend: str, block_size: int):
    """``None``: the model as it is (its own attention); else the model patched with the plan."""
    if plan is None:
        return contextlib.nullcontext()
    return patched(model, as_plan(plan), backend=backend, block_size=block_size)


def _check_samples(samples: Any) -> list[RetrievalSample]:
    if isinstance(samples, RetrievalSample):
        return [samples]
    if not isinstance(samples, Sequence) or not samples:
        raise ValueError("samples must be a non-empty list of RetrievalSample (spattn.eval.tasks)")
    for i, s in enumerate(samples):
        if not isinstance(s, RetrievalSample):
            raise TypeError(f"samples[{i}] must be a RetrievalSample, got {type(s).__name__}")
    return list(samples)


def _progress(items: Iterable, total: int, description: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, total=total, description=description, transient=True, console=_stderr_console())


def _stderr_console():
    from rich.console import Console

    return Console(file=sys.stderr)


def retrieval_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[RetrievalSample],
    plan: Plan | Pattern | None = None,
    backend: str = "auto",
    *,
    block_size: int = 128,
    batch_size: int = 1,
    confidence: float = 0.95,
    progress: bool = False,
) -> RetrievalResult:
    """Exact-match retrieval of ``model`` on ``samples``, dense (``plan=None``) or with a plan.

    Args:
        model: a causal LM from transformers (e.g. :func:`spattn.integrations.models.load_smollm2`).
        tokenizer: its tokenizer (decodes the predictions).
        samples: :class:`~spattn.eval.tasks.RetrievalSample` from :func:`~spattn.eval.tasks.passkey` etc.
        plan: ``None`` (the model's own dense attention), a :class:`~spattn.Plan` or one pattern for every
            layer, applied with :func:`spattn.patched`.
        backend: spattn backend for a plan (``"auto"``, ``"reference"``, ``"triton"``...).
        block_size: block size of the compiled layouts.
        batch_size: samples of equal length per forward pass.
        confidence: coverage of the accuracy's bootstrap interval.
        progress: show a progress bar.

    Returns a :class:`RetrievalResult`.

    Example:
        >>> sample = passkey(tokenizer, load_text("austen"), 1024, 0.5)  # doctest: +SKIP
        >>> retrieval_accuracy(model, tokenizer, [sample], spattn.Sinks(64) | spattn.Window(256))  # doctest: +SKIP
    """
    samples = _check_samples(samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = _device(model)
    correct: list[bool] = [False] * len(samples)
    predictions: list[str] = [""] * len(samples)
    # batches of equal total length (prompt + answer), in input order within each length
    by_length: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_length.setdefault((s.input_ids.shape[1], len(s.answer_ids)), []).append(i)
    batches = [group[j : j + batch_size] for group in by_length.values() for j in range(0, len(group), batch_size)]
    started = time.perf_counter()
    with _configuration(model, plan, backend, block_size), torch.no_grad():
        for batch in _progress(batches, len(batches), "retrieval", progress):
            prompt = torch.cat([samples[i].input_ids for i in batch])
            answers = torch.stack([samples[i].answer_ids for i in batch])
            ids = torch.cat([prompt, answers[:, :-1]], dim=1).to(device)
            # only the answer positions are read (the last answers.shape[1] of ids): logits there alone skip the LM
            # head over the haystack (about a fifth of a small model's forward) and its [B, L, V] output
            logits = model(input_ids=ids, logits_to_keep=answers.shape[1], use_cache=False).logits
            guess = logits.argmax(-1).cpu()
            for row, i in enumerate(batch):
                correct[i] = bool((guess[row] == answers[row]).all())
                predictions[i] = tokenizer.decode(guess[row].tolist())
    seconds = time.perf_counter() - started
    accuracy = stats.estimate([float(c) for c in correct], confidence=confidence)
    return RetrievalResult(correct=correct, accuracy=accuracy, predictions=predictions, seconds=seconds)


def make_samples(
    task: str,
    tokenizer: Any,
    haystack: str | torch.Tensor,
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    **options: Any,
) -> list[RetrievalSample]:
    """Samples of ``task`` (``"passkey"``, ``"variable_tracking"``, ``"multi_needle"``) for every length x
    depth x seed, in that order. ``options`` go to the task (``distractors``, ``noise``, ``answer``, ``hops``...).
    ``multi_needle`` spreads its needles around each depth: ``depths=[d - 0.1, d, d + 0.1]`` clipped to [0, 1]."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {task!r}")
    make = TASKS[task]
    needle_depths = options.pop("needle_depths", None)
    out = []
    for length in lengths:
        for depth in depths:
            for seed in seeds:
                if task == "multi_needle":
                    spots = needle_depths or [min(1.0, max(0.0, depth + d)) for d in (-0.1, 0.0, 0.1)]
                    out.append(make(tokenizer, haystack, length, spots, seed, **options))
                else:
                    out.append(make(tokenizer, haystack, length, depth, seed, **options))
    return out


def retrieval_grid(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: Sequence[RetrievalSample],
    plans: Mapping[str, Plan | Pattern | None],
    *,
    backend: str = "auto",
    block_size: int = 128,
    batch_size: int = 1,
    confidence: float = 0.95,
    progress: bool = False,
) -> dict[str, Any]:
    """Every plan on the same samples: a JSON-ready record.

    ``plans`` maps a name to a plan (``None`` = the model's dense attention); the first entry is the baseline
    every other plan is compared with (paired bootstrap over the samples, ``"tie"`` inside the interval).

    The record holds, per plan: the overall accuracy with interval, the per-sample results, per
    ``(length, depth)`` cell the accuracy with interval (the heatmap), and the comparison with the baseline.
    """
    samples = _check_samples(samples)
    if not isinstance(plans, Mapping) or not plans:
        raise ValueError("plans must be a non-empty mapping {name: plan or None}")
    results: dict[str, Any] = {}
    baseline_name = next(iter(plans))
    baseline: list[float] | None = None
    for name, plan in plans.items():
        result = retrieval_accuracy(
            model, tokenizer, samples, plan, backend, block_size=block_size, batch_size=batch_size,
            confidence=confidence, progress=progress,
        )
        scores = [float(c) for c in result.correct]
        cells: dict[tuple[int, float], list[float]] = {}
        for s, score in zip(samples, scores, strict=True):
            cells.setdefault((s.context_length, round(s.depth, 4)), []).append(score)
        entry: dict[str, Any] = {
            "plan": None if plan is None else as_plan(plan).to_dict(),
            "accuracy": result.accuracy.to_dict(),
            "found": int(sum(result.correct)),
            "samples": len(samples),
            "seconds": result.seconds,
            "cells": [
                {"length": length, "depth": depth, **stats.estimate(v, confidence=confidence).to_dict()}
                for (length, depth), v in sorted(cells.items())
            ],
            "per_sample": [
                {"length": s.context_length, "depth": s.depth, "seed": s.meta.get("seed"), "correct": c,
                 "answer": s.answer, "prediction": p, "needle_distance": s.context_length - s.needle_position}
                for s, c, p in zip(samples, result.correct, result.predictions, strict=True)
            ],
        }
        if baseline is None:
            baseline = scores
        else:
            entry["versus_" + baseline_name] = stats.compare(scores, baseline, confidence=confidence).to_dict()
        results[name] = entry
    return {"baseline": baseline_name, "plans": results}
