"""Hugging Face transformers integration: spattn as an attention implementation named ``"spattn"``.

``register()`` adds two entries to transformers (both are needed):

* ``AttentionInterface["spattn"]``: the attention function. It takes the layer's pattern from the model's
  :class:`~spattn.integrations.plan.Plan` and runs :func:`spattn.attention` on the un-repeated GQA key/value
  heads, with ``causal=module.is_causal`` and the module's ``scaling``.
* ``AttentionMaskInterface["spattn"]``: the mask builder (transformers' SDPA mask). Without it transformers
  passes ``attention_mask=None`` to unknown implementations and padded batches silently come out wrong.
  The attention function turns that boolean mask back into exact spattn terms: it reads which keys are
  padding, checks that the mask is exactly "causal (or bidirectional) and not padding", and intersects the
  layer's pattern with ``Document(segment_ids)`` where padding has id -1 (padding attends nothing, so the
  outputs at padded positions are 0; the model ignores them). A model's own causal sliding window (Mistral)
  becomes ``& Window(sliding_window - 1)``. Any other mask (packed sequences, custom 4D masks) raises
  ``NotImplementedError`` rather than computing something else.

``patch(model, plan)`` switches a loaded model to ``"spattn"`` with a plan; ``unpatch(model)`` restores the
previous implementation; ``patched(model, plan)`` does both around a ``with`` block. A model loaded with
``attn_implementation="spattn"`` and never patched computes full attention (a drop-in for SDPA).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

from spattn._optional import require
from spattn.integrations.plan import Plan, as_plan
from spattn.layout.layout import Layout
from spattn.ops.attention import api as _api
from spattn.ops.attention.api import BACKENDS
from spattn.patterns import Document, Full, Pattern, Window

NAME = "spattn"

# capture hooks: called as hook(module, layer, query, key) before attention runs (see spattn.capture)
_HOOKS: list[Callable[[Any, int, torch.Tensor, torch.Tensor], None]] = []
# layout hooks: called as hook(module, layer, layout) with the Layout each attention call runs on
_LAYOUT_HOOKS: list[Callable[[Any, int, Any], None]] = []


# ---------------------------------------------------------------------------------------------- registration
def register() -> None:
    """Register ``"spattn"`` in transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` (idempotent)."""
    require("transformers", extra="hf")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, spattn_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# ---------------------------------------------------------------------------------------------- padding
class _MaskMemo:
    """The last attention mask seen and what it became: every layer of one forward gets the same tensor."""

    ref: Any = None
    result: tuple[tuple | None, torch.Tensor | None] = (None, None)
    document: tuple[Any, Document] | None = None  # (segments tensor, its Document pattern)


_MEMO = _MaskMemo()
_LAYOUTS: OrderedDict[tuple, Any] = OrderedDict()  # compiled layouts shared by layers with equal patterns
_LAYOUT_CACHE_SIZE = 32
# Note [plan layout cache]: every layer of a patched forward asks for its pattern's Layout. A process-wide LRU of
# 32 layouts served them once, but a plan with more distinct layer patterns than that (a 32-layer model planned
# per head, or a report alternating plans) cycles through the LRU and recompiled every layer in every forward.
# Each Plan object now keeps its own layouts, for the ``_SHAPES_KEPT`` shapes (lengths, batch, device) it ran at
# most recently, and drops them with the plan (a weak reference); the LRU still serves plans made afresh from one
# pattern (``patched(model, pattern)`` in a loop). A dynamic pattern keeps a LayoutBuilder instead (its selection
# runs on every input, with no host synchronisation); one the builder cannot take (per-head dynamic heads) is
# compiled per call. A static per-head plan's second forward at a length compiles nothing and reads no tensor on
# the host.
# Note [layer lookup]: finding a layer's Layout by its pattern hashes the pattern on every call (a PerHead of 9
# heads is a tuple of 9 dataclasses hashed field by field) and walks it again for ``contains_dynamic``. Each shape's
# entry also keeps, per (layer, model window), the plan pattern it was found for and what was found; a later call
# whose plan still gives that same pattern object (an identity test: patterns are immutable, a Plan edited in place
# gives new objects) takes it without hashing, composing or compiling anything.
_PLAN_LAYOUTS: dict[int, tuple[weakref.ref, OrderedDict]] = {}  # id(plan) -> (plan, {shape: {pattern: layout}})
_SHAPES_KEPT = 4
_NO_BUILDER = object()


def _document(segments: torch.Tensor) -> Document:
    """One Document pattern per segments tensor, so equal plans compile once per forward."""
    if _MEMO.document is None or _MEMO.document[0] is not segments:
        _MEMO.document = (segments, Document(segments))
    return _MEMO.document[1]


class _Kept(dict):
    """A plan's layouts at one shape: ``{pattern: Layout or builder}`` (layers with equal patterns share one), and
    ``by_layer``: ``{(layer, window): (plan pattern, Layout or builder, pattern run)}`` (Note [layer lookup])."""

    __slots__ = ("by_layer",)

    def __init__(self) -> None:
        super().__init__()
        self.by_layer: dict[tuple, tuple] = {}


def _kept(plan: Plan, query: torch.Tensor, key: torch.Tensor, causal: bool, block_size: int) -> _Kept:
    """What ``plan`` keeps for these shapes (Note [plan layout cache]), made on first use."""
    B, H, Lq, _ = query.shape
    shape = (Lq, key.shape[2], causal, block_size, B, H, query.device)
    kept_by_shape = _plan_layouts(plan)
    kept = kept_by_shape.get(shape)
    if kept is None:
        kept = kept_by_shape[shape] = _Kept()
        while len(kept_by_shape) > _SHAPES_KEPT:
            kept_by_shape.popitem(last=False)
    else:
        kept_by_shape.move_to_end(shape)
    return kept


def _find(pattern: Pattern, query: torch.Tensor, key: torch.Tensor, causal: bool, block_size: int,
          kept: _Kept | None) -> Any:
    """The compiled Layout of a static pattern, the builder of a dynamic one, or ``_NO_BUILDER`` (compile per
    call), kept in ``kept`` (one plan's, these shapes) or the process-wide LRU; None for an unhashable pattern."""
    from spattn.patterns import compile as compile_pattern

    B, H, Lq, _ = query.shape
    args = (Lq, key.shape[2])
    kwargs = dict(causal=causal, block_size=block_size, batch=B, heads=H, device=query.device)
    try:
        hash(pattern)
    except TypeError:  # a pattern holding unhashable values: nothing can be kept for it
        return None
    hit = kept.get(pattern) if kept is not None else None
    if hit is not None:
        return hit
    if pattern.contains_dynamic():
        hit = _builder(pattern, args, kwargs)
    else:
        cache_key = (pattern, *args, causal, block_size, B, H, str(query.device))
        hit = _LAYOUTS.get(cache_key)
        if hit is None:
            hit = compile_pattern(pattern, *args, **kwargs)
            _LAYOUTS[cache_key] = hit
            while len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
                _LAYOUTS.popitem(last=False)
        else:
            _LAYOUTS.move_to_end(cache_key)
    if kept is not None:
        kept[pattern] = hit
    return hit


def _realise(found: Any, pattern: Pattern, query: torch.Tensor, key: torch.Tensor, causal: bool,
             block_size: int) -> Any:
    """The Layout to run from what :func:`_find` gave (a dynamic pattern's builder runs on this input)."""
    if found is None or found is _NO_BUILDER:  # compile's general path (selects and synchronises every call)
        from spattn.patterns import compile as compile_pattern

        B, H, Lq, _ = query.shape
        return compile_pattern(pattern, Lq, key.shape[2], causal=causal, block_size=block_size, batch=B, heads=H,
                               device=query.device, query=query, key=key)
    if isinstance(found, Layout):
        return found
    return found.build(query, key)


def _layout(pattern: Pattern, query: torch.Tensor, key: torch.Tensor, causal: bool, block_size: int,
            plan: Plan | None = None) -> Any:
    """The Layout ``pattern`` runs on for these shapes (Note [plan layout cache]): compiled once per plan, shape
    and pattern (layers with equal patterns share it); dynamic patterns rebuilt from the input every call."""
    kept = _kept(plan, query, key, causal, block_size) if plan is not None else None
    return _realise(_find(pattern, query, key, causal, block_size, kept), pattern, query, key, causal, block_size)


def _plan_layouts(plan: Plan) -> OrderedDict:
    """The layouts kept for ``plan`` (Plans compare by value and are unhashable: kept by identity)."""
    hit = _PLAN_LAYOUTS.get(id(plan))
    if hit is None or hit[0]() is not plan:
        key = id(plan)
        hit = (weakref.ref(plan, lambda _ref, key=key: _PLAN_LAYOUTS.pop(key, None)), OrderedDict())
        _PLAN_LAYOUTS[key] = hit
    return hit[1]


def _builder(pattern: Pattern, args: tuple, kwargs: dict) -> Any:
    """A sync-free :class:`~spattn.LayoutBuilder` for ``static | TopK/TopP/Adaptive``, else ``_NO_BUILDER``."""
    from spattn.selectors import LayoutBuilder

    try:
        return LayoutBuilder(pattern, *args, **kwargs)
    except (ValueError, NotImplementedError):  # PerHead with dynamic heads, sub-block cells, keep=...
        return _NO_BUILDER


def _keep_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    if attention_mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4D [B, 1, Lq, Lk] here, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[1] != 1:
        raise NotImplementedError("spattn: per-head attention masks from the model are not supported")
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, 0]
    lowest = torch.finfo(attention_mask.dtype).min
    keep = attention_mask[:, 0] > lowest / 2
    if bool((attention_mask[:, 0][keep] != 0).any()):
        raise NotImplementedError("spattn: additive attention biases (other than 0 / -inf masks) are not supported")
    return keep


def padding_segments(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, window: int | None = None
) -> torch.Tensor | None:
    """Segment ids int64 ``[B, kv_len]`` (0 = token, -1 = padding) exactly equivalent to a transformers
    attention mask, or ``None`` when there is no padding. ``attention_mask``: bool ``[B, 1, Lq, Lk]``
    (True = attend) or an additive float mask; ``window``: the model's own sliding window as a left extent
    (key j seen by query i iff ``i - window <= j``), part of the expected mask. Raises
    ``NotImplementedError`` for any other mask (packed sequences, custom masks)."""
    if attention_mask is None:
        return None
    memo_mask = _MEMO.ref() if _MEMO.ref is not None else None
    if memo_mask is attention_mask and _MEMO.result[0] == (q_len, kv_len, causal, window):
        return _MEMO.result[1]
    keep = _keep_mask(attention_mask)
    if keep.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"attention_mask covers {tuple(keep.shape[-2:])} but attention is {q_len}x{kv_len}")
    key_valid = keep.any(dim=1)  # [B, Lk]; in both mask kinds a valid key is seen by some valid query
    query_valid = key_valid[:, kv_len - q_len :]  # queries sit at absolute positions kv_len - q_len + i
    expected = key_valid[:, None, :].expand_as(keep)
    pos_q = torch.arange(q_len, device=keep.device)[:, None] + (kv_len - q_len)
    pos_k = torch.arange(kv_len, device=keep.device)[None, :]
    if causal:
        expected = expected & (pos_k <= pos_q)
    if window is not None:
        expected = expected & (pos_k >= pos_q - window)
    bad = (keep != expected) & query_valid[:, :, None]
    if bool(bad.any()):
        raise NotImplementedError(
            "spattn: the model's attention mask is not plain "
            + ("causal" if causal else "bidirectional")
            + " attention with padding (packed sequences, a sliding window or a custom mask?); "
            "the spattn integration only reproduces padding exactly"
        )
    segments = None if bool(key_valid.all()) else torch.where(key_valid, 0, -1).long()
    _MEMO.ref = weakref.ref(attention_mask)
    _MEMO.result = ((q_len, kv_len, causal, window), segments)
    return segments


# ---------------------------------------------------------------------------------------------- attention
def layer_index(module: Any) -> int:
    """The layer index spattn uses for ``module`` (set by :func:`patch`, else ``module.layer_idx``)."""
    index = getattr(module, "_spattn_layer", None)
    if index is None:
        index = getattr(module, "layer_idx", None)
    if index is None:
        raise ValueError(f"cannot tell which layer {type(module).__name__} is: it has no layer_idx; use spattn.patch")
    return int(index)


def spattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The transformers attention function: query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (after
    rotary embeddings, GQA heads not repeated); returns ``([B, Lq, H, D], None)`` like the SDPA function."""
    if dropout and module.training:
        raise NotImplementedError("spattn: attention dropout is not supported; call model.eval() or set dropout=0")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("spattn: attention logit softcapping is not supported")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    # the model's own sliding window (Mistral...): transformers keeps key j for query i iff j > i - sliding_window
    sliding = kwargs.get("sliding_window")
    window = None
    if sliding is not None:
        if not causal:
            raise NotImplementedError("spattn: bidirectional sliding-window models are not supported")
        window = int(sliding) - 1
    q_len, kv_len = query.shape[2], key.shape[2]
    layer = layer_index(module)
    for hook in _HOOKS:
        hook(module, layer, query, key)
    plan: Plan | None = getattr(module, "_spattn_plan", None)
    source: Pattern | None = plan.pattern_for(layer) if plan is not None else None
    segments = padding_segments(attention_mask, q_len, kv_len, causal, window)
    backend = getattr(module, "_spattn_backend", "auto")
    if source is not None and source.kind == "hierarchical":  # three branches, not one layout (spattn.hierarchical)
        from spattn.hierarchical.attention import frozen_model_attention

        out = frozen_model_attention(query, key, value, source, causal=causal, scale=scaling,
                                     padded=segments is not None or window is not None, backend=backend)
        return out.transpose(1, 2).contiguous(), None
    block_size = getattr(module, "_spattn_block_size", 128)
    # a padded batch's pattern holds this forward's padding (a new Document each forward): not kept on the plan
    kept = _kept(plan, query, key, causal, block_size) if plan is not None and segments is None else None
    slot = (layer, window)
    hit = kept.by_layer.get(slot) if kept is not None else None
    if hit is not None and hit[0] is source:  # Note [layer lookup]
        found, pattern = hit[1], hit[2]
    else:
        pattern = Full() if source is None else source
        if window is not None:
            pattern = pattern & Window(window)
        if segments is not None:
            pattern = pattern & _document(segments)
        found = _find(pattern, query, key, causal, block_size, kept)
        if kept is not None and found is not None:
            kept.by_layer[slot] = (source, found, pattern)
    layout = _realise(found, pattern, query, key, causal, block_size)
    for layout_hook_fn in _LAYOUT_HOOKS:
        layout_hook_fn(module, layer, layout)
    out = _api.attention(query, key, value, layout, causal=causal, scale=scaling, backend=backend)
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------------------------------------- patching
def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules of a transformers model, in layer order (those with a ``layer_idx``)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "config")]
    # keep the innermost module per layer index (e.g. BertSelfAttention, not a wrapper that copies layer_idx)
    by_layer: dict[int, torch.nn.Module] = {}
    for m in found:
        by_layer[m.layer_idx] = m
    return [by_layer[i] for i in sorted(by_layer)]


def _num_layers(model: torch.nn.Module, modules: list[torch.nn.Module]) -> int:
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else len(modules)


def patch(
    model: torch.nn.Module,
    plan: Plan | Pattern | None = None,
    *,
    backend: str = "auto",
    block_size: int = 128,
) -> torch.nn.Module:
    """Route every attention layer of a transformers model through :func:`spattn.attention`.

    Args:
        model: a loaded transformers ``PreTrainedModel`` (Llama, BERT, ... any model using the attention
            interface).
        plan: a :class:`Plan`, one :class:`~spattn.Pattern` for every layer, or ``None`` (full attention).
        backend: passed to :func:`spattn.attention` (``"auto"``, ``"reference"``, ``"dense"``, ...).
        block_size: block size of the compiled layouts.

    Returns the same model (patched in place). Undo with :func:`unpatch`.

    Example:
        >>> spattn.patch(model, spattn.Plan.uniform(spattn.Sinks(64) | spattn.Window(256)))  # doctest: +SKIP
        >>> logits = model(input_ids).logits  # doctest: +SKIP
    """
    plan = as_plan(plan)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    modules = attention_modules(model)
    if not modules:
        raise ValueError(f"found no attention modules with a layer_idx in {type(model).__name__}")
    n_layers = _num_layers(model, modules)
    too_far = [i for i in plan.layers if i >= n_layers]
    if too_far:
        raise ValueError(f"plan names layer(s) {too_far} but the model has {n_layers} layers (0..{n_layers - 1})")
    register()
    if not hasattr(model, "_spattn_original_attn"):
        model._spattn_original_attn = model.config._attn_implementation
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
    for m in modules:
        m._spattn_plan = plan
        m._spattn_layer = m.layer_idx
        m._spattn_backend = backend
        m._spattn_block_size = block_size
    model._spattn_plan = plan
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: restore the attention implementation the model had before (no-op if unpatched)."""
    for m in attention_modules(model):
        for attr in ("_spattn_plan", "_spattn_layer", "_spattn_backend", "_spattn_block_size"):
            if attr in m.__dict__:
                delattr(m, attr)
    original = model.__dict__.pop("_spattn_original_attn", None)
    model.__dict__.pop("_spattn_plan", None)
    if original is not None and model.config._attn_implementation != original:
        model.set_attn_implementation(original)
    return model


@contextlib.contextmanager
def patched(
    model: torch.nn.Module, plan: Plan | Pattern | None = None, *, backend: str = "auto", block_size: int = 128
) -> Iterator[torch.nn.Module]:
    """``with patched(model, plan): ...`` runs the block with the model patched, then restores it."""
    was_patched = hasattr(model, "_spattn_original_attn")
    previous = getattr(model, "_spattn_plan", None)
    previous_opts = None
    if was_patched:
        first = attention_modules(model)[0]
        previous_opts = (getattr(first, "_spattn_backend", "auto"), getattr(first, "_spattn_block_size", 128))
    patch(model, plan, backend=backend, block_size=block_size)
    try:
        yield model
    finally:
        if was_patched:
            patch(model, previous, backend=previous_opts[0], block_size=previous_opts[1])
        else:
            unpatch(model)


@contextlib.contextmanager
def hook(fn: Callable[[Any, int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(module, layer, query, key)`` inside every spattn attention call of the block (capture)."""
    _HOOKS.append(fn)
    try:
        yield
    finally:
        _HOOKS.remove(fn)


@contextlib.contextmanager
def layout_hook(fn: Callable[[Any, int, Any], None]) -> Iterator[None]:
    """Call ``fn(module, layer, layout)`` with the :class:`~spattn.Layout` every spattn attention call of the block
    runs on (e.g. to count the keys per query a dynamic pattern really kept, without compiling it again)."""
    _LAYOUT_HOOKS.append(fn)
    try:
        yield
    finally:
        _LAYOUT_HOOKS.remove(fn)
