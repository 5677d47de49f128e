"""Task profiles: what the plan must protect, as a scorer ``score(model, plan) -> float`` (higher is better).

The planner weighs each layer by how much the task suffers when that layer alone goes sparse (a cheap probe
pattern in every head of the layer, the rest dense): :func:`layer_sensitivity`. Heads are then scored by recall
times their layer's weight, so the same budget lands on different layers for different tasks.

Built in: :class:`LMScorer` (``task="lm"``: minus the mean KL(dense || sparse) of next-token distributions on
held-out chunks) and :class:`EmbeddingScorer` (``task="classification"``: mean cosine agreement of an
encoder's sentence embeddings with the dense ones). ``task="retrieval"`` needs the evaluation suite's scorer
(``spattn plan --task retrieval`` wires it in); any object with ``name`` and ``score(model, plan)`` works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from spattn._optional import require
from spattn.integrations.hf import patched
from spattn.integrations.plan import Plan
from spattn.patterns import Pattern

np = require("numpy", extra="planner")

TASKS = ("lm", "classification", "retrieval")


@runtime_checkable
class TaskScorer(Protocol):
    """Anything with a ``name`` and ``score(model, plan) -> float`` (higher is better; dense is the best).

    ``plan`` is a :class:`spattn.Plan` or ``None`` (dense). The scorer applies it itself (usually with
    ``spattn.patched(model, plan, block_size=...)``), so it may run any task: perplexity, retrieval, a probe.
    """

    name: str

    def score(self, model: torch.nn.Module, plan: Plan | None) -> float: ...


def block_size_of(plan: Plan | None, default: int = 128) -> int:
    """The block size a planner plan was costed with (``plan.budget.block_size``), else ``default``."""
    return plan.budget.block_size if plan is not None and plan.budget is not None else default


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class LMScorer:
    """``task="lm"``: minus the mean KL(dense || sparse) per predicted token on token chunks ``[C, L]``.

    Dense logits are computed once (on the first call) and kept as log-probabilities on the CPU.

    Args:
        chunks: int ``[C, L]`` held-out token chunks (e.g. ``spattn.data.text_chunks(..., split="held_out")``).
        block_size: block size for patched runs when the plan states none.
    """

    name = "lm"

    def __init__(self, chunks: torch.Tensor, *, block_size: int = 128) -> None:
        if not isinstance(chunks, torch.Tensor) or chunks.dim() != 2 or chunks.dtype.is_floating_point:
            raise ValueError(f"chunks must be int token ids [C, L], got {getattr(chunks, 'shape', type(chunks))}")
        self.chunks = chunks
        self.block_size = block_size
        self._dense: list[torch.Tensor] | None = None

    def _log_probs(self, model: torch.nn.Module, plan: Plan | None) -> list[torch.Tensor]:
        out = []
        with torch.no_grad(), patched(model, plan, block_size=block_size_of(plan, self.block_size)):
            for row in self.chunks:
                logits = model(input_ids=row[None].to(_device(model))).logits[0, :-1].float()
                out.append(F.log_softmax(logits, -1).cpu())
        return out

    def score(self, model: torch.nn.Module, plan: Plan | None) -> float:
        if self._dense is None:
            self._dense = self._log_probs(model, None)
        if plan is None or plan.is_dense():
            return 0.0
        total = count = 0.0
        for log_d, log_s in zip(self._dense, self._log_probs(model, plan), strict=True):
            total += float((log_d.exp() * (log_d - log_s)).sum(-1).clamp_min(0).sum())
            count += log_d.shape[0]
        return -total / count


class EmbeddingScorer:
    """``task="classification"``: mean cosine similarity of sparse to dense sentence embeddings (an encoder
    such as MiniLM; masked mean pooling of the last hidden state, L2-normalised).

    Args:
        batch: a tokenizer batch (``input_ids``, ``attention_mask``) of the sentences to embed.
        block_size: block size for patched runs when the plan states none.
    """

    name = "classification"

    def __init__(self, batch: dict[str, torch.Tensor], *, block_size: int = 128) -> None:
        if "input_ids" not in batch:
            raise ValueError("batch must be a tokenizer output with input_ids (and attention_mask)")
        self.batch = dict(batch)
        self.block_size = block_size
        self._dense: torch.Tensor | None = None

    def _embed(self, model: torch.nn.Module, plan: Plan | None) -> torch.Tensor:
        dev = _device(model)
        batch = {k: v.to(dev) for k, v in self.batch.items()}
        with torch.no_grad(), patched(model, plan, block_size=block_size_of(plan, self.block_size)):
            hidden = model(**batch).last_hidden_state.float()
        mask = batch.get("attention_mask")
        mask = torch.ones(hidden.shape[:2], device=dev) if mask is None else mask.float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1).cpu()

    def score(self, model: torch.nn.Module, plan: Plan | None) -> float:
        if self._dense is None:
            self._dense = self._embed(model, None)
        if plan is None or plan.is_dense():
            return 1.0
        return float((self._embed(model, plan) * self._dense).sum(-1).mean())


def layer_sensitivity(
    model: torch.nn.Module,
    scorer: TaskScorer,
    layers: int,
    probe: Pattern,
    *,
    block_size: int = 64,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[np.ndarray, float]:
    """How much the task loses when one layer alone uses ``probe`` in every head: ``(drops [layers], dense)``.

    ``drops[l] = score(dense) - score(layer l sparse)``, floored at 0 (a sparse layer that scores better than
    dense is noise, not a gain).
    """
    from spattn.integrations.plan import BudgetRule

    if not isinstance(scorer, TaskScorer):
        raise TypeError(f"scorer must have a name and score(model, plan) -> float, got {type(scorer).__name__}")
    rule = BudgetRule("fraction", 1.0, length=1, block_size=block_size)  # carries the block size to the scorer
    dense = float(scorer.score(model, None))
    drops = np.zeros(layers)
    for layer in range(layers):
        value = float(scorer.score(model, Plan(layers={layer: probe}, budget=rule)))
        drops[layer] = max(0.0, dense - value)
        if progress is not None:
            progress(f"task sensitivity ({scorer.name})", layer + 1, layers)
    return drops, dense


def layer_weights(drops: np.ndarray, floor: float = 0.05) -> np.ndarray:
    """Weights with mean 1 from the drops (every layer keeps at least ``floor`` of the mean weight)."""
    d = np.asarray(drops, dtype=np.float64)
    if d.sum() <= 0:
        return np.ones_like(d)
    w = d / d.mean()
    w = np.maximum(w, floor)
    return w / w.mean()


def builtin_scorer(task: str, model: torch.nn.Module, tokenizer: Any, text: Any, *, length: int, samples: int = 2,
                   skip: int = 0, block_size: int = 64) -> TaskScorer:
    """The scorer of a built-in task profile on chunks of the calibration split of ``text`` after the first
    ``skip`` (the chunks the planner captured), so that the held-out split stays out of planning."""
    from spattn.planner.calibrate import calibration_chunks

    if task == "lm":
        return LMScorer(calibration_chunks(text, tokenizer, length, skip + samples)[skip:], block_size=block_size)
    if task == "classification":
        ids = calibration_chunks(text, tokenizer, length, skip + samples * 8)[skip:]
        texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
        batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=length)
        return EmbeddingScorer(dict(batch), block_size=block_size)
    if task == "retrieval":
        raise ValueError("task='retrieval' needs the evaluation suite's scorer: pass task=<scorer object> "
                         "(score(model, plan) -> float), or run `spattn plan --task retrieval`")
    raise ValueError(f"task must be one of {TASKS} or a scorer object with score(model, plan), got {task!r}")
