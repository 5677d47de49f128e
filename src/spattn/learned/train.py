"""Training loops for models with learned sparse attention: regularisers, schedules, collapse metrics, logs.

:func:`fit` trains any model whose ``model(inputs)`` returns logits ``[B, L, V]`` on batches ``(inputs, labels)``
(int ``[B, L]``, label ``-100`` = no target), adding the regularisers of :class:`Regularisers` for every
:class:`~spattn.learned.LearnedTopK` inside, applying temperature / budget :class:`Schedule` s, and logging the
losses and :func:`collapse_metrics` every ``log_every`` steps (JSON lines, and a final JSON summary).
:func:`lm_batches` cuts a token stream into random next-token batches; :func:`task_batches` samples a
synthetic task's ``(inputs, labels)`` tensors. Checkpoints are safetensors (model weights) + JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from spattn._optional import require
from spattn.learned.metrics import collapse_metrics
from spattn.learned.regularisers import balance_loss, density_loss, entropy_loss, expected_density
from spattn.learned.router import LearnedTopK
from spattn.learned.schedule import Schedule

IGNORE_INDEX = -100
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Regularisers:
    """Weights of the regularisers added to the training loss (0 = off), summed over learned layers.

    Attributes:
        entropy: weight of :func:`entropy_loss` (gate entropy, against a peaked gate). Default 0.
        density: weight of :func:`density_loss` with ``density_target`` (default 0.25) at ``density_mass``
            (default 0.9). Default 0.
        balance: weight of :func:`balance_loss` (usage balance over key blocks). Default 0.
        drop: stochastic block pruning rate set on every router during training (0 = off). Default 0.
        noise: Gumbel noise scale on the routers' ranking during training. Default 0.
        distill: weight of the routers' own ``distill_loss`` (``training="distill"``). Default 1.
    """

    entropy: float = 0.0
    density: float = 0.0
    density_target: float = 0.25
    density_mass: float = 0.9
    balance: float = 0.0
    drop: float = 0.0
    noise: float = 0.0
    distill: float = 1.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Regularisers.{f.name} must be a finite number >= 0, got {value!r}")
        if not 0 <= self.drop < 1:
            raise ValueError(f"Regularisers.drop must be in [0, 1), got {self.drop!r}")

    @classmethod
    def anti_collapse(cls) -> Regularisers:
        """The set the recipes use against collapse: entropy 0.05, balance 0.05, drop 0.1, noise 0.5."""
        return cls(entropy=0.05, balance=0.05, drop=0.1, noise=0.5)


def routers(model: torch.nn.Module) -> list[LearnedTopK]:
    """Every :class:`LearnedTopK` inside ``model``."""
    return [m for m in model.modules() if isinstance(m, LearnedTopK)]


def regulariser_losses(model: torch.nn.Module, weights: Regularisers) -> dict[str, torch.Tensor]:
    """The weighted regulariser terms of the last forward pass, by name (only the non-zero ones)."""
    out: dict[str, torch.Tensor] = {}

    def add(name: str, value: torch.Tensor) -> None:
        out[name] = out[name] + value if name in out else value

    for router in routers(model):
        last = router.last
        if not last:
            continue
        probs, routable = last["probs"], last["routable"]
        if weights.entropy:
            add("entropy", weights.entropy * entropy_loss(probs, routable))
        if weights.density:
            add("density", weights.density * density_loss(probs, routable, weights.density_target,
                                                           mass=weights.density_mass))
        if weights.balance:
            add("balance", weights.balance * balance_loss(probs, routable))
        if weights.distill and "distill_loss" in last:
            add("distill", weights.distill * last["distill_loss"])
    return out


def selection_metrics(model: torch.nn.Module, *, mass: float = 0.9) -> dict[str, float]:
    """:func:`collapse_metrics` and the expected ``TopP(mass)`` density of the last pass, averaged over layers."""
    rows = []
    for router in routers(model):
        last = router.last
        if last:
            m = collapse_metrics(last["chosen"], last["probs"], last["routable"])
            m["expected_density"] = float(expected_density(last["probs"].detach(), last["routable"], mass=mass))
            rows.append(m)
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def lm_batches(ids: torch.Tensor, seq_len: int, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
    """Endless random next-token batches from a token stream ``ids [N]``: inputs ``[B, seq_len]`` and
    labels = the inputs shifted by one."""
    ids = torch.as_tensor(ids).reshape(-1).long()
    if ids.numel() < seq_len + 2:
        raise ValueError(f"the token stream has {ids.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        start = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=gen)
        window = ids[start[:, None] + torch.arange(seq_len + 1)]
        yield window[:, :-1], window[:, 1:]


def task_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int, *, seed: int = 0) -> Iterator[Batch]:
    """Endless shuffled batches of a task's ``(inputs, labels)`` (int ``[N, L]``, label -100 = no target)."""
    if inputs.shape != labels.shape or inputs.dim() != 2:
        raise ValueError(f"inputs and labels must both be [N, L], got {tuple(inputs.shape)}, {tuple(labels.shape)}")
    gen = torch.Generator().manual_seed(seed)
    while True:
        for idx in torch.randperm(inputs.shape[0], generator=gen).split(batch_size):
            if idx.numel() == batch_size:
                yield inputs[idx], labels[idx]


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled positions of ``logits [B, L, V]`` / ``labels [B, L]``."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Loss (nats per labelled token) and accuracy of ``model`` in eval mode over ``batches``."""
    was = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for inputs, labels in batches:
        logits = model(inputs)
        mask = labels != IGNORE_INDEX
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                       reduction="sum"))
        correct += int(((logits.argmax(-1) == labels) & mask).sum())
        count += int(mask.sum())
    model.train(was)
    return {"loss": total / max(count, 1), "accuracy": correct / max(count, 1)}


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Model weights to safetensors (shared tensors handled) and ``meta`` in the header as JSON."""
    st = require("safetensors.torch", extra="hf")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_model(model, str(path), metadata={"format": "spattn.model/1", "meta": json.dumps(meta)})
    return path


def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module) -> dict[str, Any]:
    """Load weights saved by :func:`save_checkpoint` into ``model`` (strict); returns the saved ``meta``."""
    st = require("safetensors.torch", extra="hf")
    safe = require("safetensors", extra="hf")
    with safe.safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != "spattn.model/1":
        raise ValueError(f"{path} is not a spattn model checkpoint (format {header.get('format')!r})")
    st.load_model(model, str(path))
    return json.loads(header.get("meta", "{}"))


def fit(
    model: torch.nn.Module,
    batches: Iterator[Batch],
    *,
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 0.01,
    warmup: int = 10,
    regularisers: Regularisers | None = None,
    temperature: Schedule | None = None,
    budget: Schedule | None = None,
    eval_batches: list[Batch] | None = None,
    log_every: int = 10,
    log_path: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    description: str = "train",
    evaluate_with: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    autocast: torch.dtype | None = None,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Train ``model`` for ``steps`` AdamW steps (linear warm-up, cosine decay) on ``batches``.

    Args:
        model: ``model(inputs [B, L]) -> logits [B, L, V]`` (e.g. :class:`spattn.nn.TransformerLM`).
        batches: an iterator of ``(inputs, labels)`` (:func:`lm_batches`, :func:`task_batches`).
        regularisers: weights (default none); ``drop`` / ``noise`` are set on the routers for training.
        temperature, budget: schedules applied to every router's ``temperature`` / ``blocks`` each step.
        eval_batches: held-out batches evaluated at every log step and at the end.
        log_every: steps between log records; log_path: JSON-lines file of the records.
        checkpoint: safetensors path of the final weights (with ``meta`` and the last record as JSON).
        progress: a rich progress bar.
        evaluate_with: ``model -> dict`` called at every log step (model in training mode; switch modes
            inside), its entries merged into the record (e.g. per-corpus held-out losses with intervals).
        autocast: run the forward passes under ``torch.autocast`` in this dtype (e.g. ``torch.bfloat16`` on a
            GPU; default None: the parameters' dtype).
        deadline: a ``time.perf_counter()`` value; training stops after the first step that ends past it
            (default None: never), logging that step. The result then has ``"stopped_early": True``.

    Returns:
        ``{"history": [records], "final": record, "seconds": float, "steps_done": int, "stopped_early":
        bool}``; a record has ``step``, ``loss`` (training LM/task loss), each regulariser term, the collapse
        metrics, ``temperature``, ``blocks``, with ``eval_batches`` ``eval_loss`` / ``eval_accuracy``, and the
        entries of ``evaluate_with``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    weights = regularisers or Regularisers()
    layers = routers(model)
    for router in layers:
        router.drop, router.noise = weights.drop, weights.noise
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    log_file = None
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in the finally below
    history: list[dict[str, Any]] = []
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=False)
        bar.start()
        task = bar.add_task(description, total=steps)
    start = time.perf_counter()
    model.train()
    device_type = next(model.parameters()).device.type
    context = (lambda: torch.autocast(device_type, dtype=autocast)) if autocast is not None \
        else contextlib.nullcontext
    steps_done, stopped_early = 0, False
    try:
        for step in range(steps):
            for router in layers:
                if temperature is not None:
                    router.temperature = temperature.at(step)
                if budget is not None:
                    router.blocks = int(budget.at(step))
            inputs, labels = next(batches)
            with context():
                loss = sequence_loss(model(inputs), labels)
                terms = regulariser_losses(model, weights)
                total = loss + sum(terms.values()) if terms else loss
            opt.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            steps_done = step + 1
            stopped_early = deadline is not None and step < steps - 1 and time.perf_counter() > deadline
            if step % log_every == 0 or step == steps - 1 or stopped_early:
                record: dict[str, Any] = {"step": step, "loss": float(loss.detach()),
                                          **{k: float(v.detach()) for k, v in terms.items()},
                                          **selection_metrics(model)}
                if layers:
                    record["temperature"] = float(layers[0].temperature)
                    record["blocks"] = int(layers[0].blocks)
                with context():
                    if eval_batches:
                        ev = evaluate(model, eval_batches)
                        record["eval_loss"], record["eval_accuracy"] = ev["loss"], ev["accuracy"]
                    if evaluate_with is not None:
                        record.update(evaluate_with(model))
                record["seconds"] = time.perf_counter() - start
                history.append(record)
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
            if bar is not None:
                bar.update(task, advance=1, description=f"{description} loss {float(loss.detach()):.3f}")
            if stopped_early:
                break
    finally:
        if bar is not None:
            bar.stop()
        if log_file is not None:
            log_file.close()
    result = {"history": history, "final": history[-1], "seconds": time.perf_counter() - start,
              "steps_done": steps_done, "stopped_early": stopped_early}
    if checkpoint is not None:
        save_checkpoint(checkpoint, model, {**(meta or {}), "final": history[-1]})
    return result


__all__ = ["Regularisers", "fit", "evaluate", "lm_batches", "task_batches", "sequence_loss", "routers",
           "regulariser_losses", "selection_metrics", "save_checkpoint", "load_checkpoint", "IGNORE_INDEX"]
