"""Static decode: one decode step of the whole model with fixed shapes and no host read, recorded in a CUDA
graph and replayed (``Runtime(..., cuda_graph=True)``).

What makes the step static:

* the cache is preallocated (capacity ``C`` = prompt + new tokens, rounded up to whole pages) and each layer
  writes its token at a device-side slot (:meth:`~spattn.runtime.cache.PagedLayer.start_static`); attention
  reads the whole ``[B, Hkv, C, D]`` buffer, the keys past the slot masked out by a device-side valid mask;
* the static part of each layer's pattern (sinks, windows, ...) is computed once for every step of the
  generation (:func:`~spattn.runtime.decode.static_rows`) and read with a device index;
* the selection width is fixed: the most pages the static part touches plus the budget cap plus one, and the
  budget itself is a device tensor (the controller changes it without a new recording);
* the non-finite check writes one device flag per layer, read once per step by the loop (a flagged step is
  rerun eagerly with the flagged layers dense, logged and counted).

The loop (:func:`generate_static`) is greedy decoding with ``eos`` / ``pad`` handling, token for token what
``model.generate(do_sample=False)`` gives. A new recording is made when the set of dense layers or a width
changes; the first step after it runs eagerly (it is the warm-up: triton JIT, launch plans). Where capture is
impossible (no CUDA, or a capture error), the same static step runs eagerly, and the reason is logged once.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from spattn.runtime.cache import PagedLayer, SpattnCache
from spattn.runtime.decode import DecodePlan, static_rows
from spattn.runtime.fused import dense_tables, partial_page_bound
from spattn.runtime.monitor import log_event

if TYPE_CHECKING:
    from spattn.runtime.engine import Runtime


@dataclasses.dataclass
class StaticState:
    """The device buffers one static decode step reads (shapes fixed for the whole generation).

    ``valid`` bool ``[B, C]`` (keys attended: prompt without its padding, decoded slots up to the current one),
    ``mask`` its ``[B, 1, 1, C]`` view (the model's 4D mask), ``slot`` int64 ``[1]`` (the cache slot of the
    token being decoded), ``step`` int64 ``[1]`` (its index in the generation), ``page_sizes`` int64 ``[NP]``,
    ``budget`` int64 ``[num_layers]``, ``flags`` bool ``[num_layers]`` (non-finite outputs), ``density`` /
    ``pages`` float ``[num_layers]`` (monitoring), ``rows`` the static rows per pattern, ``widths`` and
    ``plans`` per sparse layer, ``dense_layers`` the layers that run dense this recording, ``kind`` "sparse"
    / "mixed" / "dense" (rows below ``min_sparse_tokens``)."""

    valid: torch.Tensor
    slot: torch.Tensor
    step: torch.Tensor
    page_sizes: torch.Tensor
    budget: torch.Tensor
    flags: torch.Tensor
    density: torch.Tensor
    pages: torch.Tensor
    prompt_len: int
    capacity: int
    steps: int
    offsets: list[int] | None
    kind: str
    rows: dict = dataclasses.field(default_factory=dict)
    plans: dict = dataclasses.field(default_factory=dict)
    widths: dict = dataclasses.field(default_factory=dict)
    dense_layers: frozenset = frozenset()
    failed: set = dataclasses.field(default_factory=set)    # layers whose kernel raised in this generation
    forced: frozenset = frozenset()                         # layers dense for one rerun (non-finite output)
    budget_values: list = dataclasses.field(default_factory=list)  # what ``budget`` holds (host copy)
    eager: bool = True       # the step being run is not a replay (recall sampling and exceptions allowed)
    dense_width: int = 1     # partial entries of the dense tables (runtime.fused.partial_page_bound)
    dense: tuple | None = None  # this step's dense tables (split-K kernel over the valid keys), None: SDPA
    paths: dict = dataclasses.field(default_factory=dict)  # layer -> attention path of its last eager step
    sample: bool = False     # measure the sampled recall in this (eager) step

    @property
    def mask(self) -> torch.Tensor:
        return self.valid[:, None, None, :]


class _Recording:
    """One CUDA graph of the model's decode step and its static output."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor, key: tuple) -> None:
        self.graph, self.logits, self.key = graph, logits, key


def _leading(mask2d: torch.Tensor) -> list[int] | None:
    first = torch.where(mask2d.any(-1), mask2d.to(torch.int8).argmax(-1), 0).tolist()
    return first if any(first) else None


class StaticDecoder:
    """Greedy generation with the static decode step of ``runtime`` (see the module docstring)."""

    def __init__(self, runtime: Runtime, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int, *, pad_token_id: int | None, eos_token_id: int | list[int] | None,
                 cuda_graph: bool, cache=None, min_new_tokens: int = 0, keep_logits: bool = False,
                 logits_processor=None, stopping_criteria=None, streamer=None) -> None:
        self.runtime = runtime
        self.input_ids = input_ids
        self.mask2d = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
            else attention_mask.to(torch.bool)
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
        self.min_new_tokens = int(min_new_tokens or 0)
        self.cache = cache
        self.logits: list[torch.Tensor] | None = [] if keep_logits else None  # per generated token, [B, V]
        self.processors = list(logits_processor or [])   # called (ids so far, scores) -> scores, as generate does
        self.stopping = list(stopping_criteria or [])    # called (ids so far, scores) -> bool [B]: row finished
        self.streamer = streamer                         # put(prompt), put(tokens) per step, end()
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(eos, dtype=torch.long, device=input_ids.device) if eos else None
        if self.eos is not None and pad_token_id is None:
            pad_token_id = eos[0]
        self.pad = pad_token_id
        self.device = input_ids.device
        self.use_graph = bool(cuda_graph)
        self.recording: _Recording | None = None
        self.pool = None
        self.captures = 0
        self.replays = 0
        self.reason: str | None = None  # why steps are not replayed (None while they are)
        self.paths: dict[int, str] = {}  # layer -> "fused" / "torch" selection, "dense-kernel" / "dense-sdpa"
        if self.use_graph and self.device.type != "cuda":
            self._no_graph(f"no CUDA graph on device {self.device.type!r}: the static step runs eagerly")

    def _no_graph(self, reason: str) -> None:
        self.use_graph = False
        self.reason = reason
        log_event(logging.INFO, "cuda_graph_off", reason=reason)

    # ------------------------------------------------------------------ setup
    def _state(self, cache) -> StaticState:
        rt = self.runtime
        B, P0 = self.input_ids.shape
        S = rt.block_size
        C = int(cache.layers[0]._keys.shape[2])
        dev = self.device
        valid = torch.zeros(B, C, dtype=torch.bool, device=dev)
        valid[:, :P0] = self.mask2d
        counts = self.mask2d.sum(-1)
        first, last = int(counts.min()) + 1, int(counts.max()) + self.max_new_tokens
        if last < rt.min_sparse_tokens:
            kind = "dense"
        elif first >= rt.min_sparse_tokens:
            kind = "sparse"
        else:
            kind = "mixed"
        n = rt.num_layers
        return StaticState(
            valid=valid, slot=torch.full((1,), P0, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev), page_sizes=torch.zeros(C // S, dtype=torch.long,
                                                                                       device=dev),
            budget=torch.zeros(n, dtype=torch.long, device=dev), flags=torch.zeros(n, dtype=torch.bool, device=dev),
            density=torch.zeros(n, device=dev), pages=torch.zeros(n, device=dev), prompt_len=P0, capacity=C,
            steps=self.max_new_tokens - 1, offsets=_leading(self.mask2d), kind=kind,
            dense_width=partial_page_bound(self.mask2d, S))

    def _configure(self, st: StaticState, heads: int, kv_heads: int) -> tuple:
        """Plans, rows, widths and budgets of the current controller state; returns the recording key."""
        rt, ctl = self.runtime, self.runtime.controller
        S = rt.block_size
        NP = st.capacity // S
        active = ctl.config.latency_target_ms is not None or ctl.config.recall_floor is not None
        dense = set()
        budgets = [0] * rt.num_layers
        for layer in rt.sparse_layers:
            plan = rt.decode_plans[layer]
            if ctl.is_dense(layer) or st.kind == "dense" or layer in st.failed or layer in st.forced:
                dense.add(layer)
                continue
            budget = ctl.budget_for(layer) if plan.rule != "none" else 0
            extra = ctl.extra_pages(layer) if plan.rule == "none" else 0
            if extra:
                plan = DecodePlan(static=plan.static, rule="top_k", blocks=extra, keep=plan.keep, selector="bounds")
                budget = extra
            budgets[layer] = budget
            cap = ctl.config.max_budget if active and plan.rule != "none" else budget
            rkey = (plan.static, plan.keep)
            if rkey not in st.rows:
                st.rows[rkey] = static_rows(plan, st.capacity, range(st.prompt_len + 1, st.prompt_len + st.steps + 1),
                                            batch=st.valid.shape[0], heads=heads, page_size=S, device=self.device,
                                            group=heads // kv_heads, offsets=st.offsets)
            pages = st.rows[rkey][1]
            width = NP if st.kind == "mixed" else min(NP, pages + max(cap, budget) + 1)
            old = st.widths.get(layer)
            st.widths[layer] = old if old is not None and old >= width and st.plans.get(layer) == plan else width
            st.plans[layer] = plan
        st.dense_layers = frozenset(dense)
        if budgets != st.budget_values:
            st.budget.copy_(torch.tensor(budgets, dtype=torch.long))
            st.budget_values = budgets
        return st.dense_layers, tuple(sorted(st.widths.items())), tuple(sorted(st.plans.items(), key=lambda kv: kv[0]))

    # ------------------------------------------------------------------ one step
    def _forward(self, st: StaticState, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """The step (device work only): valid mask and page sizes for this slot, then the model."""
        S = self.runtime.block_size
        st.valid.index_fill_(1, st.slot, True)
        torch.sub(st.slot, st.prompt_len, out=st.step)
        length = st.slot + 1
        st.page_sizes.copy_((length - torch.arange(st.page_sizes.shape[0], device=self.device) * S).clamp(1, S))
        rt = self.runtime
        needs_dense = st.kind == "dense" or bool(st.dense_layers) or len(st.plans) < rt.num_layers
        st.dense = dense_tables(st.valid, page_size=S, partial_width=st.dense_width) \
            if needs_dense and rt.uses_kernel_dense(self.device) else None
        out = self.runtime.model(input_ids=tokens, attention_mask=st.mask, position_ids=positions,
                                 past_key_values=cache, use_cache=True)
        return out.logits[:, -1]

    def _record(self, st, tokens, positions, cache, key) -> None:
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        st.eager = False
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(st, tokens, positions, cache)
        except Exception as exc:  # noqa: BLE001 - any capture failure: the static step runs eagerly
            self.recording = None
            self._no_graph(f"CUDA graph capture failed: {type(exc).__name__}: {exc}")
            return
        finally:
            st.eager = True
        self.recording = _Recording(graph, logits, key)
        self.captures += 1

    # ------------------------------------------------------------------ the loop
    def run(self) -> torch.Tensor:
        rt = self.runtime
        B, P0 = self.input_ids.shape
        S = rt.block_size
        model = rt.model
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        need = P0 + self.max_new_tokens - 1  # the last token is not written to the cache
        cache = self.cache
        if cache is None:
            cache = rt.new_cache(reserve=-(-need // S) * S)
        rt.cache = cache
        cached = cache.get_seq_length()
        for layer in cache.layers:  # the whole capacity up front: static decode never grows the buffers
            layer.reserve = max(layer.reserve, -(-need // S) * S)
            if layer._keys is not None and layer._keys.shape[2] < need:
                layer._ensure(layer._keys, layer._values, need)
        if not isinstance(cache, SpattnCache) or cached >= P0 or any(
                not isinstance(layer, PagedLayer) or layer.get_seq_length() != cached for layer in cache.layers):
            raise ValueError("static decode needs a SpattnCache holding fewer tokens than input_ids, in every layer")
        rt.step_seconds = []
        positions = self.mask2d.long().cumsum(-1) - 1
        positions = positions.masked_fill(~self.mask2d, 1)
        start = time.perf_counter()
        out = model(input_ids=self.input_ids[:, cached:], attention_mask=self.mask2d.long(),
                    position_ids=positions[:, cached:], past_key_values=cache, use_cache=True, logits_to_keep=1)
        if self.logits is not None:
            self.logits.append(out.logits[:, -1].clone())
        if self.streamer is not None:
            self.streamer.put(self.input_ids.cpu())
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        sequence = self.input_ids
        next_tokens, finished, sequence = self._advance(out.logits[:, -1], 0, finished, sequence)
        generated = [next_tokens]
        stopping = self.eos is not None or bool(self.stopping)
        done = stopping and bool(finished.all())
        now = time.perf_counter()
        rt.end_step(now - start, prefill=True)
        if self.max_new_tokens == 1 or done:
            return self._finish(generated)
        st = self._state(cache)
        st.paths = self.paths
        rt._static = st
        tokens = next_tokens[:, None].clone()
        position = positions[:, -1:].clone() + 1
        cache.start_static(st.slot)
        last = now
        try:
            for _ in range(st.steps):
                key = self._configure(st, heads, kv_heads)
                st.flags.zero_()
                st.sample = rt._sample
                replay = self.use_graph and self.recording is not None and self.recording.key == key \
                    and not st.sample
                instrumented = st.sample  # Note [instrumented steps] in controller.py
                if replay:
                    self.recording.graph.replay()
                    logits = self.recording.logits
                    self.replays += 1
                else:
                    st.eager = True
                    logits = self._forward(st, tokens, position, cache).clone()
                    key = self._configure(st, heads, kv_heads)  # a kernel that raised made its layer dense
                    if self.use_graph and not st.sample and (self.recording is None or self.recording.key != key):
                        self._record(st, tokens, position, cache, key)
                        instrumented = True
                if bool(st.flags.any()):  # the one host read of the step's checks
                    logits = self._rerun(st, tokens, position, cache, heads, kv_heads)
                if self.logits is not None:
                    self.logits.append(logits.clone())
                nxt, finished, sequence = self._advance(logits, len(generated), finished, sequence)
                generated.append(nxt)
                tokens.copy_(nxt[:, None])
                st.slot += 1
                position += 1
                if rt.level >= 1:
                    self._observe(st)
                stop = stopping and bool(finished.all())
                now = time.perf_counter()
                rt.end_step(now - last, prefill=False, instrumented=instrumented)
                last = now
                if stop:
                    break
        finally:
            rt._static = None
            cache.end_static(P0 + len(generated) - 1)
        return self._finish(generated)

    def _finish(self, generated: list[torch.Tensor]) -> torch.Tensor:
        if self.streamer is not None:
            self.streamer.end()
        return torch.cat([self.input_ids, torch.stack(generated, 1)], 1)

    def _advance(self, logits: torch.Tensor, produced: int, finished: torch.Tensor, sequence: torch.Tensor | None):
        """``(next tokens [B], finished [B], ids so far)`` from this step's logits ``[B, V]``, as greedy
        ``generate`` does it: ``eos`` cannot win before ``min_new_tokens`` tokens, then the logits processors,
        argmax, ``pad`` for finished rows (when there is an ``eos``), ``eos`` and the stopping criteria end
        rows, the streamer gets the tokens. The ids so far are kept only for processors / criteria."""
        scores = logits
        if self.eos is not None and produced < self.min_new_tokens:
            scores = scores.index_fill(-1, self.eos, -math.inf)
        for processor in self.processors:
            scores = processor(sequence, scores)
        nxt = scores.argmax(-1)
        if self.eos is not None:
            nxt = torch.where(finished, torch.full_like(nxt, self.pad), nxt)
        if self.processors or self.stopping:
            sequence = torch.cat([sequence, nxt[:, None]], 1)
        if self.eos is not None:
            finished = finished | torch.isin(nxt, self.eos)
        for criterion in self.stopping:
            finished = finished | criterion(sequence, scores).to(finished.device)
        if self.streamer is not None:
            self.streamer.put(nxt.cpu())
        return nxt, finished, sequence

    def _rerun(self, st, tokens, position, cache, heads, kv_heads) -> torch.Tensor:
        """A step with a non-finite sparse output: count it per layer, rerun it eagerly with those layers
        dense (their page statistics of this page rebuilt from the keys before the slot)."""
        rt = self.runtime
        flagged = [i for i, f in enumerate(st.flags.tolist()) if f]
        slot = int(st.slot)
        for layer in flagged:
            rt.controller.fallback(layer, "nonfinite", "sparse output has NaN or inf (static decode step)")
        for layer in cache.layers:
            layer.length = slot
            if slot % rt.block_size:
                layer._refresh_pages(slot // rt.block_size * rt.block_size)
        st.forced = frozenset(flagged)
        self._configure(st, heads, kv_heads)
        st.flags.zero_()
        st.eager = True
        try:
            return self._forward(st, tokens, position, cache).clone()
        finally:
            st.forced = frozenset()  # sparse again next step unless the controller switched the layer


    def _observe(self, st: StaticState) -> None:
        rt = self.runtime
        layers = [i for i in rt.sparse_layers if i not in st.dense_layers]
        if not layers:
            return
        idx = torch.tensor(layers, device=self.device)
        density, pages = st.density[idx].tolist(), st.pages[idx].tolist()
        for layer, d, p in zip(layers, density, pages, strict=True):
            rt.metrics.observe_decode(layer, d, p)


def generate_static(runtime: Runtime, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    **kwargs: Any) -> torch.Tensor:
    """Greedy ``[B, prompt + new]`` token ids through :class:`StaticDecoder` (the keyword arguments of
    ``generate`` it supports: ``max_new_tokens``, ``min_new_tokens``, ``pad_token_id``, ``eos_token_id``,
    ``past_key_values`` (a :class:`~spattn.runtime.SpattnCache` with capacity reserved), ``do_sample=False``,
    ``logits_processor``, ``stopping_criteria``, ``streamer``, ``output_logits`` (kept in ``decoder.logits``))."""
    config = runtime.model.generation_config
    eos = kwargs.get("eos_token_id", config.eos_token_id)
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    decoder = StaticDecoder(runtime, input_ids, attention_mask, int(kwargs["max_new_tokens"]), pad_token_id=pad,
                            eos_token_id=eos, cuda_graph=runtime.cuda_graph, cache=kwargs.get("past_key_values"),
                            min_new_tokens=int(kwargs.get("min_new_tokens") or 0),
                            keep_logits=bool(kwargs.get("output_logits")),
                            logits_processor=kwargs.get("logits_processor"),
                            stopping_criteria=kwargs.get("stopping_criteria"), streamer=kwargs.get("streamer"))
    runtime.decoder = decoder
    return decoder.run()
