"""``Runtime``: a transformers model served with a sparse :class:`~spattn.Plan`, safely.

``Runtime(model, plan)`` patches the model (``spattn.patch``) and then routes its attention through the
runtime's own attention function (registered in transformers' ``AttentionInterface`` as
``"spattn_runtime"``):

* prefill (more than one query): the plan's patterns through :func:`spattn.integrations.hf.spattn_attention_forward`;
* decode (one query): :mod:`spattn.runtime.decode` — safeguards + pages selected from the
  :class:`~spattn.runtime.cache.SpattnCache` statistics, attention over the gathered pages;
* dense (transformers' own SDPA function): layers the plan leaves dense, sequences with fewer than
  ``min_sparse_tokens`` valid keys, layers the controller switched to dense, and every call whose sparse
  kernel raised or returned a non-finite value (rerun dense, logged and counted).

:meth:`Runtime.generate` runs ``model.generate`` with a fresh ``SpattnCache`` and a step clock that feeds the
controller (latency target) and the metrics.

    >>> runtime = Runtime(model, spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(512)
    ...                   | spattn.TopK("bounds", 8)), min_sparse_tokens=1024)  # doctest: +SKIP
    >>> out = runtime.generate(**tokenizer(text, return_tensors="pt"), max_new_tokens=64)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch

from spattn._optional import require
from spattn.integrations.hf import attention_modules, patch, spattn_attention_forward, unpatch
from spattn.integrations.plan import Plan, as_plan
from spattn.patterns import Pattern
from spattn.runtime.cache import PagedLayer, SpattnCache
from spattn.runtime.controller import Controller, ControllerConfig
from spattn.runtime.decode import (
    DecodePlan,
    auto_paged_attention,
    decode_plan,
    has_triton,
    paged_attention,
    sampled_recall,
    select,
    select_from_row,
    triton_paged_attention,
)
from spattn.runtime.fused import flag_nonfinite, fused_applies, fused_tables, selection_of, tables_attention
from spattn.runtime.monitor import LEVEL, Metrics, instrument, log_event
from spattn.selectors.common import pool

NAME = "spattn_runtime"
Kernel = Callable[..., torch.Tensor]
# what the static loop takes (greedy; output_logits: runtime.decoder.logits)
_STATIC_KWARGS = ("max_new_tokens", "min_new_tokens", "pad_token_id", "eos_token_id", "past_key_values",
                  "output_logits", "logits_processor", "stopping_criteria", "streamer")
KERNELS = {"auto": auto_paged_attention, "torch": paged_attention, "triton": triton_paged_attention}
SELECTIONS = ("auto", "fused", "torch")
DENSE_DECODES = ("auto", "kernel", "sdpa")


def register() -> None:
    """Register ``"spattn_runtime"`` in transformers' attention and mask interfaces (idempotent)."""
    require("transformers", extra="hf")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, runtime_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def runtime_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The transformers attention function of ``"spattn_runtime"``: query ``[B, H, Lq, D]``, key/value
    ``[B, Hkv, Lk, D]``; returns ``([B, Lq, H, D], None)``."""
    runtime = getattr(module, "_spattn_runtime", None)
    if runtime is None:
        raise RuntimeError("this model uses attn_implementation='spattn_runtime' but has no spattn Runtime attached")
    return runtime.attend(module, query, key, value, attention_mask, **kwargs)


def _dense(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _dense_static(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor,
                  kwargs: dict) -> tuple[torch.Tensor, None]:
    """Dense decode attention of the static step: one query ``[B, H, 1, D]`` over the keys ``valid`` marks
    (bool ``[B, C]``) of the whole cache buffer ``[B, Hkv, C, D]``, torch SDPA with a boolean mask, the GQA group
    folded into the query length (``[B, Hkv, G, D]``: K/V not repeated). Returns ``([B, 1, H, Dv], None)``."""
    B, H, _, D = query.shape
    Hkv = key.shape[1]
    scale = kwargs.get("scaling")
    q = query.reshape(B, Hkv, H // Hkv, D)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=valid[:, None, None, :],
                                                           scale=None if scale is None else float(scale))
    return out.reshape(B, H, 1, -1).transpose(1, 2).contiguous(), None


def _valid_keys(attention_mask: torch.Tensor | None, batch: int, kv_len: int, device) -> torch.Tensor:
    """bool ``[B, Lk]``: keys some query may see (False = padding), from transformers' 4D mask."""
    if attention_mask is None:
        return torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4D [B, 1, Lq, Lk], got shape {tuple(attention_mask.shape)}")
    keep = attention_mask[:, 0]
    if keep.dtype != torch.bool:
        keep = keep > torch.finfo(keep.dtype).min / 2
    return keep.any(1).expand(batch, kv_len)


def _leading_padding(valid: torch.Tensor) -> list[int] | None:
    """Per sequence, the slots before its first valid key (left padding), or None when there is none."""
    first = torch.where(valid.any(-1), valid.to(torch.int8).argmax(-1), 0)
    offsets = first.tolist()
    return offsets if any(offsets) else None


class _StepClock:
    """A logits processor: ``generate`` calls it once per step, right after the forward; it times the steps."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.last = time.perf_counter()
        self.first = True

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        now = time.perf_counter()
        self.runtime.end_step(now - self.last, prefill=self.first)
        self.first = False
        self.last = now
        return scores


class Runtime:
    """Sparse attention in a transformers model, with a controller, monitoring and dense fallback.

    Args:
        model: a transformers causal LM (Llama-style attention interface).
        plan: a :class:`~spattn.Plan`, a Pattern for every layer, or None (dense).
        min_sparse_tokens: sequences with fewer valid keys than this run dense (default 1024; dense is
            cheaper there).
        controller: a :class:`ControllerConfig` (latency target, budget bounds, recall floor...).
        recall_sample: fraction of decode steps on which the true recall is measured against dense
            (needs monitoring level >= 1; default 0.0).
        monitor_level: 0 / 1 / 2 (default: ``SPATTN_LOGLEVEL``, see :mod:`spattn.runtime.monitor`).
        backend: spattn backend of the prefill (``"auto"``).
        block_size: block size of the prefill layouts and page size of the cache (default 128).
        check_finite: rerun dense any call whose sparse output is not finite (default True; one host sync
            per layer and step).
        seed: seed of the recall sampling.
        cuda_graph: decode with the static step of :mod:`spattn.runtime.graph` (preallocated cache, device-side
            positions, fixed selection width, no host read inside the step) and, on CUDA, record the whole
            model's decode step in a CUDA graph and replay it (default False: ``model.generate`` step by step).
            Greedy decoding only: ``generate`` with sampling, beams or other options falls back to
            ``model.generate`` (logged); where capture fails the static step runs eagerly (logged).
        decode_kernel: ``"auto"`` (default: spattn's triton split-K decode kernel on CUDA, one launch per layer
            on block tables built on the device; the torch reference :func:`~spattn.runtime.paged_attention`
            elsewhere), ``"triton"`` or ``"torch"``.
        decode_selection: page selection of the static decode step (``cuda_graph=True``): ``"auto"`` (default:
            the fused triton selection, :func:`spattn.ops.decode.select_pages`, on CUDA for the layers it
            covers: top-k on ``bounds`` scores, head-independent safeguards, no dense rows; the torch selection
            elsewhere), ``"fused"`` (the same, also on CPU under ``TRITON_INTERPRET=1``) or ``"torch"``. A
            replaced :attr:`kernel` always gets the torch selection (it takes a ``DecodeSelection``). If the fused
            selection raises, the torch selection takes over for good (logged; ``runtime.fused_off`` says why).
        dense_decode: dense attention of the static decode step: ``"auto"`` (default: spattn's split-K decode
            kernel over exactly the valid keys of each sequence on CUDA with triton, torch's masked SDPA over the
            whole capacity elsewhere), ``"kernel"`` or ``"sdpa"``. Reruns after a failed or non-finite sparse
            call always use SDPA.

    Attributes:
        kernel: the sparse decode kernel, ``kernel(query, key, value, selection, page_size=, scale=)``
            -> ``[B, H, 1, Dv]`` (replace it to inject faults or try another implementation; the built-in
            triton kernels also get ``whole_buffer=True`` when the keys are this runtime's cache).
        controller, metrics: the :class:`Controller` and :class:`~spattn.runtime.monitor.Metrics`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan | Pattern | None = None,
        *,
        min_sparse_tokens: int = 1024,
        controller: ControllerConfig | None = None,
        recall_sample: float = 0.0,
        monitor_level: int | None = None,
        backend: str = "auto",
        block_size: int = 128,
        check_finite: bool = True,
        seed: int = 0,
        decode_kernel: str = "auto",
        cuda_graph: bool = False,
        decode_selection: str = "auto",
        dense_decode: str = "auto",
    ) -> None:
        if decode_kernel not in KERNELS:
            raise ValueError(f"decode_kernel must be one of {sorted(KERNELS)}, got {decode_kernel!r}")
        if decode_selection not in SELECTIONS:
            raise ValueError(f"decode_selection must be one of {SELECTIONS}, got {decode_selection!r}")
        if dense_decode not in DENSE_DECODES:
            raise ValueError(f"dense_decode must be one of {DENSE_DECODES}, got {dense_decode!r}")
        self.decode_selection = decode_selection
        self.dense_decode = dense_decode
        self.fused_off: str | None = None  # why the fused selection was switched off (it raised), None while on
        if isinstance(min_sparse_tokens, bool) or not isinstance(min_sparse_tokens, int) or min_sparse_tokens < 0:
            raise ValueError(f"min_sparse_tokens must be an int >= 0, got {min_sparse_tokens!r}")
        if not 0.0 <= float(recall_sample) <= 1.0:
            raise ValueError(f"recall_sample must be a fraction in [0, 1], got {recall_sample!r}")
        level = LEVEL if monitor_level is None else monitor_level
        if level not in (0, 1, 2):
            raise ValueError(f"monitor_level must be 0, 1 or 2, got {monitor_level!r}")
        self.plan = as_plan(plan)
        self.model = model
        self.min_sparse_tokens = min_sparse_tokens
        self.recall_sample = float(recall_sample)
        self.level = level
        self.block_size = block_size
        self.check_finite = check_finite
        self.kernel: Kernel = KERNELS[decode_kernel]
        self._rng = random.Random(seed)
        self.cuda_graph = bool(cuda_graph)
        self.decoder = None  # the StaticDecoder of the last static generate (captures, replays, reason)
        self._static = None  # its StaticState while a static decode step runs
        patch(model, self.plan, backend=backend, block_size=block_size)
        register()
        model.set_attn_implementation(NAME)
        self.modules = attention_modules(model)
        for m in self.modules:
            m._spattn_runtime = self
        self.num_layers = int(getattr(model.config, "num_hidden_layers", len(self.modules)))
        self.decode_plans: dict[int, DecodePlan | None] = {}
        self.sparse_layers: list[int] = []
        blocks = []
        for i in range(self.num_layers):
            pattern = self.plan.pattern_for(i)
            if pattern is None:
                continue
            self.sparse_layers.append(i)
            dp = decode_plan(pattern)
            self.decode_plans[i] = dp
            if dp is not None and dp.rule == "top_k":
                blocks.append(dp.blocks)
        self.metrics = Metrics(level=level)
        self.controller = Controller(controller, initial_budget=max(blocks) if blocks else 8, metrics=self.metrics)
        self.cache: SpattnCache | None = None
        self.step_seconds: list[float] = []  # wall time of each step of the last generate (the first: prefill)
        self._warned_no_cache = False
        self._step: dict[str, Any] = {}
        self._sample = False
        self._decode = instrument(self._decode_plain, self._record_decode, level=level, synchronize=level >= 2)
        self._prefill = instrument(self._prefill_plain, self._record_prefill, level=level, synchronize=level >= 2)

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> torch.nn.Module:
        """Restore the model's previous attention implementation."""
        for m in self.modules:
            m.__dict__.pop("_spattn_runtime", None)
        return unpatch(self.model)

    def new_cache(self, reserve: int = 0) -> SpattnCache:
        """A fresh :class:`SpattnCache` for this model (page size = ``block_size``, ``reserve`` tokens
        allocated up front); the runtime reads its page statistics."""
        means = any(dp is not None and dp.selector == "pooled" for dp in self.decode_plans.values())
        self.cache = SpattnCache(self.num_layers, page_size=self.block_size, reserve=reserve, track_means=means)
        return self.cache

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with a fresh SpattnCache and the step clock (keyword arguments pass through)."""
        from transformers import LogitsProcessorList

        if self.cuda_graph:
            unsupported = sorted(k for k, v in kwargs.items() if k not in _STATIC_KWARGS
                                 and not (k == "do_sample" and not v) and not (k == "num_beams" and v == 1))
            if "max_new_tokens" not in kwargs:
                unsupported.append("max_new_tokens missing")
            if getattr(self.model.config, "sliding_window", None) is not None:
                unsupported.append("a sliding-window model")
            generic = [i for i in self.sparse_layers if self.decode_plans[i] is None]
            if generic:
                unsupported.append(f"layers {generic} have no paged decode form (generic decode path)")
            if not unsupported:
                from spattn.runtime.graph import generate_static

                start = time.perf_counter()
                with torch.inference_mode():
                    sequences = generate_static(self, input_ids, attention_mask, **kwargs)
                self.controller.observe_request(time.perf_counter() - start,
                                                [i for i in self.sparse_layers if not self.controller.is_dense(i)],
                                                requests=int(input_ids.shape[0]))
                self.metrics.count_tokens(int((sequences.shape[1] - input_ids.shape[1]) * sequences.shape[0]))
                return sequences
            log_event(logging.INFO, "static_decode_off", reason="what the static loop does not support",
                      options=unsupported)
            self.decoder = None
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        processors.append(_StepClock(self))
        if "past_key_values" not in kwargs:
            reserve = input_ids.shape[1] + int(kwargs.get("max_new_tokens") or 0)
            kwargs["past_key_values"] = self.new_cache(reserve=reserve)
        self.step_seconds = []
        self.cache = kwargs["past_key_values"]
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      logits_processor=processors, **kwargs)
        self.controller.observe_request(time.perf_counter() - start,
                                        [i for i in self.sparse_layers if not self.controller.is_dense(i)],
                                        requests=int(input_ids.shape[0]))
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        self.metrics.count_tokens(int((sequences.shape[1] - input_ids.shape[1]) * sequences.shape[0]))
        return out

    def end_step(self, seconds: float, prefill: bool, instrumented: bool | None = None) -> None:
        """Called once per generation step (after its forward) with its wall time. ``instrumented`` (default:
        whether this step sampled the recall): the step did work the budget does not control, so the controller
        leaves it out of its latency window (Note [instrumented steps] in ``controller.py``)."""
        self.step_seconds.append(seconds)
        self.metrics.observe_step(seconds, prefill)
        if not prefill:
            extra = self._sample if instrumented is None else instrumented  # _sample: this step's draw
            self.controller.observe_step(seconds, [i for i in self.sparse_layers if not self.controller.is_dense(i)],
                                         instrumented=bool(extra))
        self._sample = self.level >= 1 and self.recall_sample > 0 and self._rng.random() < self.recall_sample

    # ------------------------------------------------------------------ attention
    def attend(self, module, query, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
        layer = module.layer_idx
        if self._static is not None and query.shape[2] == 1:
            return self._decode_static(module, layer, query, key, value, attention_mask, kwargs)
        if layer not in self.decode_plans or self.controller.is_dense(layer) or kwargs.get("sliding_window"):
            return _dense(module, query, key, value, attention_mask, **kwargs)
        if query.shape[2] > 1:
            return self._prefill(module, layer, query, key, value, attention_mask, kwargs)
        return self._decode(module, layer, query, key, value, attention_mask, kwargs)

    def _record_prefill(self, seconds: float, args: tuple, kwargs: dict) -> None:
        if self.level >= 2:
            self.metrics.observe_attention(args[1], "prefill", seconds)

    def _record_decode(self, seconds: float, args: tuple, kwargs: dict) -> None:
        if self.level >= 2:
            self.metrics.observe_attention(args[1], "decode", seconds)
            log_event(logging.DEBUG, "attention", layer=args[1], phase="decode", seconds=seconds)

    def _guarded(self, layer: int, sparse: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor]):
        """Run ``sparse``; on an exception or a non-finite output rerun ``dense`` and record why."""
        try:
            out = sparse()
        except Exception as exc:  # noqa: BLE001 - any kernel failure is answered by the dense rerun
            self.controller.fallback(layer, "error", f"{type(exc).__name__}: {exc}")
            return dense()
        if self.check_finite and not bool(torch.isfinite(out).all()):
            self.controller.fallback(layer, "nonfinite", "sparse output has NaN or inf")
            return dense()
        self.controller.succeeded(layer)
        return out

    def _prefill_plain(self, module, layer, query, key, value, attention_mask, kwargs):
        B, Lk = query.shape[0], key.shape[2]
        dense = lambda: _dense(module, query, key, value, attention_mask, **kwargs)  # noqa: E731
        counts = _valid_keys(attention_mask, B, Lk, query.device).sum(-1)
        short = counts < self.min_sparse_tokens
        n_short = int(short.sum())
        if n_short == B:
            return dense()
        offsets = _leading_padding(_valid_keys(attention_mask, B, Lk, query.device)) \
            if attention_mask is not None else None
        if n_short == 0:
            sparse = lambda: self._sparse_prefill(module, query, key, value, attention_mask, offsets, kwargs)  # noqa: E731
            return self._guarded(layer, sparse, lambda: dense()[0]), None
        # mixed batch: short sequences dense, the others sparse
        rows_long = (~short).nonzero().flatten()
        sub = lambda t: None if t is None else t[rows_long]  # noqa: E731
        sub_offsets = None if offsets is None else [offsets[i] for i in rows_long.tolist()]
        sparse = lambda: self._sparse_prefill(  # noqa: E731
            module, query[rows_long], key[rows_long], value[rows_long], sub(attention_mask), sub_offsets, kwargs)
        out = dense()[0].clone()
        out[rows_long] = self._guarded(
            layer, sparse,
            lambda: _dense(module, query[rows_long], key[rows_long], value[rows_long], sub(attention_mask),
                           **kwargs)[0])
        return out, None

    @staticmethod
    def _sparse_prefill(module, query, key, value, attention_mask, offsets, kwargs) -> torch.Tensor:
        """``[B, Lq, H, D]``: the plan's pattern over each sequence. A left-padded sequence runs alone with its
        padding cut off, so position-dependent patterns (``Sinks``, strides, ``keep``) count from its first
        real token, exactly as when it is not batched; its padded query rows are 0."""
        if not offsets:
            return spattn_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]
        Lq, Lk = query.shape[2], key.shape[2]
        plain = [b for b, o in enumerate(offsets) if o == 0]
        out = query.new_zeros(query.shape[0], Lq, query.shape[1], value.shape[-1])
        if plain:
            rows = torch.tensor(plain, device=query.device)
            out[rows] = spattn_attention_forward(module, query[rows], key[rows], value[rows], attention_mask[rows],
                                                 **kwargs)[0]
        for b, o in enumerate(offsets):
            if o == 0:
                continue
            start = max(0, o - (Lk - Lq))  # the first query row that is not padding
            if start >= Lq:
                continue
            out[b, start:] = spattn_attention_forward(
                module, query[b:b + 1, :, start:], key[b:b + 1, :, o:], value[b:b + 1, :, o:],
                attention_mask[b:b + 1, :, start:, o:], **kwargs)[0][0]
        return out

    def _cache_layer(self, layer: int, key: torch.Tensor) -> PagedLayer | None:
        """This runtime's cache layer when it holds ``key`` (the tensor its ``update`` returned), else None."""
        if self.cache is None or layer >= len(self.cache.layers):
            return None
        cache_layer = self.cache.layers[layer]
        return cache_layer if isinstance(cache_layer, PagedLayer) and cache_layer.holds(key) else None

    def _page_stats(self, layer: int, key: torch.Tensor, selector: str) -> tuple[torch.Tensor | None, ...]:
        """``(key_min, key_max, key_mean)`` of the pages of ``key`` (the statistics ``selector`` needs; the
        others None), from the SpattnCache when it holds ``key``."""
        cache_layer = self._cache_layer(layer, key)
        if cache_layer is not None:
            if selector != "pooled":
                return (*cache_layer.page_bounds(), None)
            if cache_layer.track_means:
                return None, None, cache_layer.page_means()
        if not self._warned_no_cache:
            self._warned_no_cache = True
            log_event(logging.WARNING, "no_page_cache", layer=layer,
                      detail="the keys are not in a SpattnCache of this runtime: page statistics are recomputed "
                             "from the keys at every step (use Runtime.generate or runtime.new_cache())")
        if selector == "pooled":
            return None, None, pool(key, self.block_size, "mean")
        return pool(key, self.block_size, "amin"), pool(key, self.block_size, "amax"), None

    def _step_rows(self, attention_mask, batch: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Valid keys ``[B, L]``, dense rows ``[B]`` and "dense" / "sparse" / "mixed" for this step's mask
        (computed once per step: every layer gets the same mask)."""
        memo = self._step
        if memo.get("mask") is attention_mask and memo.get("kv_len") == kv_len and memo.get("batch") == batch:
            return memo["valid"], memo["dense_rows"], memo["kind"]
        valid = _valid_keys(attention_mask, batch, kv_len, device)
        dense_rows = valid.sum(-1) < self.min_sparse_tokens
        n = int(dense_rows.sum())
        kind = "dense" if n == batch else "sparse" if n == 0 else "mixed"
        offsets = _leading_padding(valid) if attention_mask is not None else None
        self._step = {"mask": attention_mask, "kv_len": kv_len, "batch": batch, "valid": valid,
                      "dense_rows": dense_rows, "kind": kind, "offsets": offsets}
        return valid, dense_rows, kind

    def _decode_plain(self, module, layer, query, key, value, attention_mask, kwargs):
        B, H, _, D = query.shape
        Lk = key.shape[2]
        dense = lambda: _dense(module, query, key, value, attention_mask, **kwargs)[0]  # noqa: E731
        valid, dense_rows, kind = self._step_rows(attention_mask, B, Lk, query.device)
        if kind == "dense":
            return _dense(module, query, key, value, attention_mask, **kwargs)
        plan = self.decode_plans[layer]
        if plan is None:  # a pattern shape paged decode does not cover: the generic spattn path
            sparse = lambda: spattn_attention_forward(module, query, key, value, attention_mask, **kwargs)[0]  # noqa: E731
            return self._guarded(layer, sparse, dense), None
        scale = kwargs.get("scaling")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        budget = self.controller.budget_for(layer) if plan.rule != "none" else 0
        extra = self.controller.extra_pages(layer) if plan.rule == "none" else 0
        if extra:
            plan = DecodePlan(static=plan.static, rule="top_k", blocks=extra, keep=plan.keep, selector="bounds")
            budget = extra
        result: dict[str, Any] = {}

        def sparse() -> torch.Tensor:
            stats = self._page_stats(layer, key, plan.selector) if plan.rule != "none" else (None, None, None)
            selection = select(query, Lk, valid, plan, budget, kv_heads=key.shape[1], page_size=self.block_size,
                               scale=scale, key_min=stats[0], key_max=stats[1], key_mean=stats[2],
                               dense_rows=dense_rows if kind == "mixed" else None, offsets=self._step["offsets"])
            result["selection"] = selection
            extra = {}
            if self.kernel in (auto_paged_attention, triton_paged_attention) and self._cache_layer(layer, key):
                extra["whole_buffer"] = True  # the cache's buffer past L is zeroed: fixed launch arguments
            out = self.kernel(query, key, value, selection, page_size=self.block_size, scale=scale, **extra)
            return out.transpose(1, 2)

        out = self._guarded(layer, sparse, lambda: dense())
        selection = result.get("selection")
        if self.level >= 1 and selection is not None:
            counts = valid.sum(-1)
            self.metrics.observe_decode(layer, float(selection.density(counts).mean()),
                                        float((selection.pages >= 0).sum(-1).float().mean()))
            if self._sample:
                recall = sampled_recall(query, key, valid, selection, page_size=self.block_size, scale=scale)
                self.controller.observe_recall(layer, float(recall.min()))
        return out.contiguous(), None

    def uses_kernel_dense(self, device: torch.device) -> bool:
        """True when the static step's dense layers run spattn's split-K decode kernel (``dense_decode``)."""
        S = self.block_size
        if self.dense_decode == "sdpa" or S < 16 or S & (S - 1):
            return False
        return self.dense_decode == "kernel" or (device.type == "cuda" and has_triton())

    def _uses_fused(self, device: torch.device) -> bool:
        if self.decode_selection == "torch" or self.fused_off is not None \
                or self.kernel not in (auto_paged_attention, triton_paged_attention):
            return False
        return self.decode_selection == "fused" or (device.type == "cuda" and has_triton())

    def _dense_step(self, module, layer, query, key, value, kwargs):
        """Dense attention of the static step: the split-K kernel on the step's dense tables when they exist
        and ``layer`` is not being rerun after a failure, else masked SDPA."""
        st = self._static
        if st.dense is None or layer in st.failed or layer in st.forced:
            if st.eager:
                st.paths[layer] = "dense-sdpa"
            return _dense_static(module, query, key, value, st.valid, kwargs)
        if st.eager:
            st.paths[layer] = "dense-kernel"
        scale = kwargs.get("scaling")
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
        out = tables_attention(query, key, value, st.dense, scale=scale, grouped=False)
        return out.transpose(1, 2).contiguous(), None

    def _decode_static(self, module, layer, query, key, value, attention_mask, kwargs):
        """The static decode step of ``layer`` (:mod:`spattn.runtime.graph`): key/value are the whole cache
        buffers ``[B, Hkv, C, D]``; device work only unless the step runs eagerly (then a kernel that raises
        makes the layer dense for this generation, and sampled recall is measured)."""
        st = self._static
        if layer not in st.plans or layer in st.dense_layers or st.kind == "dense" or kwargs.get("sliding_window"):
            return self._dense_step(module, layer, query, key, value, kwargs)
        plan = st.plans[layer]
        D = query.shape[-1]
        scale = kwargs.get("scaling")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        rows = st.rows[(plan.static, plan.keep)][0]                                 # [T, Bs, Hs, C]
        dense_rows = st.valid.sum(-1) < self.min_sparse_tokens if st.kind == "mixed" else None
        if self._uses_fused(query.device) and fused_applies(plan, rows, st.kind == "mixed", self.block_size):
            return self._decode_static_fused(layer, query, key, value, plan, rows, scale, module, kwargs)
        row = rows.index_select(0, st.step.clamp(0, rows.shape[0] - 1))[0]
        if st.eager:
            st.paths[layer] = "torch"
        cache_layer = self.cache.layers[layer]
        key_min = key_max = key_mean = None
        if plan.rule != "none":
            if plan.selector == "pooled":
                key_mean = cache_layer.page_means()
            else:
                key_min, key_max = cache_layer.page_bounds()

        def sparse():
            selection = select_from_row(query, st.valid, plan, st.budget[layer:layer + 1], row, st.widths[layer],
                                        kv_heads=key.shape[1], page_size=self.block_size, scale=scale,
                                        key_min=key_min, key_max=key_max, key_mean=key_mean,
                                        dense_rows=dense_rows, page_sizes=st.page_sizes)
            return self.kernel(query, key, value, selection, page_size=self.block_size, scale=scale), selection

        if st.eager:
            try:
                out, selection = sparse()
            except Exception as exc:  # noqa: BLE001 - any kernel failure is answered by the dense rerun
                self.controller.fallback(layer, "error", f"{type(exc).__name__}: {exc}")
                st.failed.add(layer)
                return _dense_static(module, query, key, value, st.valid, kwargs)
        else:
            out, selection = sparse()
        if self.check_finite:  # one device flag per layer, read by the loop once per step (a non-finite output
            #                    from a finite query: a layer fed by an earlier layer's NaN is not to blame)
            bad = ~torch.isfinite(out).all() & torch.isfinite(query).all()
            st.flags[layer:layer + 1].logical_or_(bad.view(1))
        if self.level >= 1:
            st.density[layer:layer + 1].copy_(selection.density(st.valid.sum(-1)).mean().view(1))
            st.pages[layer:layer + 1].copy_((selection.pages >= 0).sum(-1).float().mean().view(1))
            if st.sample and st.eager:
                recall = sampled_recall(query, key, st.valid, selection, page_size=self.block_size, scale=scale)
                self.controller.observe_recall(layer, float(recall.min()))
        return out.transpose(1, 2).contiguous(), None

    def _decode_static_fused(self, layer, query, key, value, plan, rows, scale, module, kwargs):
        """:meth:`_decode_static` with the fused selection (:mod:`spattn.runtime.fused`): one selection launch
        writing the block tables, one decode launch reading them."""
        st = self._static
        key_min, key_max = self.cache.layers[layer].page_bounds()
        if st.eager:
            st.paths[layer] = "fused"

        def sparse():
            tables, page_tables = fused_tables(query, key_min, key_max, rows, st.step, st.valid, st.slot,
                                               st.budget[layer:layer + 1], width=st.widths[layer],
                                               page_size=self.block_size, scale=scale)
            out = tables_attention(query, key, value, tables, scale=scale, grouped=True)
            if self.check_finite:  # one launch (the torch path's check is seven)
                flag_nonfinite(out, query, st.flags, layer)
            return out, page_tables

        if st.eager:
            try:
                out, page_tables = sparse()
            except Exception as exc:  # noqa: BLE001 - the torch selection takes over, for every layer from now on
                self.fused_off = f"{type(exc).__name__}: {exc}"
                log_event(logging.WARNING, "fused_selection_off", layer=layer, reason=self.fused_off)
                return self._decode_static(module, layer, query, key, value, None, kwargs)
        else:
            out, page_tables = sparse()
        if self.level >= 1:
            counts = st.valid.sum(-1).clamp_min(1)
            st.density[layer:layer + 1].copy_((page_tables.stats[..., 0].float() / counts[:, None]).mean().view(1))
            st.pages[layer:layer + 1].copy_(page_tables.stats[..., 1].float().mean().view(1))
            if st.sample and st.eager:
                selection = selection_of(page_tables, heads=query.shape[1], page_size=self.block_size)
                recall = sampled_recall(query, key, st.valid, selection, page_size=self.block_size, scale=scale)
                self.controller.observe_recall(layer, float(recall.min()))
        return out.transpose(1, 2).contiguous(), None
