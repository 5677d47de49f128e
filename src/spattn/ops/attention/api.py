"""``spattn.attention``: validate inputs, compile patterns, pick a backend, run it."""

from __future__ import annotations

import collections
import logging
import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from spattn.layout.layout import Layout
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern

logger = logging.getLogger("spattn")

BACKENDS = ("auto", "reference", "dense", "flex", "triton")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DENSE_MAX_PAIRS = 1 << 22  # auto uses the dense backend on CPU up to this many (query, key) pairs (2048^2)
_BUILDERS_KEPT = 32  # cached layout builders (one per pattern and shape), least recently used dropped first

# Note [dynamic path]: a dynamic pattern handed to ``attention`` is built by a layout builder registered by the
# layer that defines the dynamic patterns (``spattn.selectors`` registers ``LayoutBuilder``: this layer may not
# import it). The builder is made once per (pattern, shapes, device) and cached, so a training or decoding loop
# pays what ``LayoutBuilder.build`` pays: no host synchronisation, fixed-width tables, CUDA-graph friendly.
# Patterns no registered builder accepts (or that cannot be hashed) take ``spattn.compile``, as before.
_builder_factories: list[Callable[..., Any]] = []
_builders: collections.OrderedDict = collections.OrderedDict()


# Note [static layout cache]: a static pattern handed to ``attention`` used to be compiled on every call, and the
# fresh Layout also missed every cache keyed on its tables (the banded-path check, one host sync; the decode launch
# plan). On the H200 (chain A, report at commit 0e29116) ``attention(q, k, v, Causal(), backend="triton")`` took
# 7.7 / 7.2 / 15 ms at 1024 / 4096 / 8192 tokens (H 9, D 64) against SDPA's 0.15 / 0.84 / 2.9 ms: host time, not
# the kernel. The Layout is now kept per (pattern, shapes, causal, block size, device), the most recent
# ``_LAYOUTS_KEPT``; patterns are immutable by contract (a tensor inside one, e.g. ``BlockLayout.blocks``, must not
# be changed in place after use), and patterns holding tensors hash by identity.
_LAYOUTS_KEPT = 16
_layouts: collections.OrderedDict = collections.OrderedDict()


def _cached_layout(pattern: Pattern, Lq: int, Lk: int, causal: bool, block_size: int, B: int, H: int,
                   device: torch.device) -> Layout:
    """``spattn.compile`` of a static pattern for these arguments, kept (Note [static layout cache])."""
    key = (pattern, Lq, Lk, causal, block_size, B, H, device)
    try:
        hit = _layouts.get(key)
    except (TypeError, RuntimeError):  # an unhashable pattern (or one whose equality is elementwise)
        key, hit = None, None
    if hit is not None:
        _layouts.move_to_end(key)
        return hit
    layout = compile_pattern(pattern, Lq, Lk, causal=causal, block_size=block_size, batch=B, heads=H, device=device)
    if key is not None and not torch.compiler.is_compiling():
        try:
            _layouts[key] = layout
        except (TypeError, RuntimeError):
            return layout
        while len(_layouts) > _LAYOUTS_KEPT:
            _layouts.popitem(last=False)
    return layout


# Note [checked calls]: every call used to validate its inputs (``_check_inputs``, ``_check_layout``), ask the
# backend whether it can run them (``choose_backend``; the triton check again inside the backend) and import the
# backend, ~25-40 us of host time per call on the 2-core CPU with the kernel launch stubbed out
# (``benchmarks/host_overhead.py``), paid by every layer of every forward. Every one of those checks reads only
# the inputs' types, shapes, dtypes and devices, the Layout's (immutable) attributes, ``causal`` and the backend
# name, so the outcome is kept per Layout (a weak key: it goes with the Layout) and input signature: a repeated
# call with a Layout skips straight to the backend. Only plain ``torch.Tensor`` inputs take the shortcut
# (subclasses and non-tensors are checked every time), and never under ``torch.compile``, which traces the
# checks. A static pattern whose Layout is in the static layout cache takes the same shortcut (the signature was
# checked with that Layout); any other pattern validates its inputs before compiling (or finding) its Layout.
_CHECKED_PER_LAYOUT = 8
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Layout -> {signature: (backend, run)}


def _signature(query, key, value, causal: bool, backend: str) -> tuple | None:
    """What the checks of a call read, or None when the inputs are not plain tensors (Note [checked calls])."""
    if type(query) is not torch.Tensor or type(key) is not torch.Tensor or type(value) is not torch.Tensor:
        return None
    return (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype, query.device, key.device,
            value.device, bool(causal), backend)


def _known_layout(layout_or_pattern, query: torch.Tensor, key: torch.Tensor, causal: bool,
                  block_size: int) -> Layout | None:
    """The Layout a call would run on when it is already known: the Layout given, or a static pattern's cached one
    (Note [static layout cache]); None otherwise (then the call takes the checked path)."""
    if isinstance(layout_or_pattern, Layout):
        return layout_or_pattern
    if not isinstance(layout_or_pattern, Pattern) or query.dim() != 4 or key.dim() != 4:
        return None
    B, H, Lq, _ = query.shape
    cache_key = (layout_or_pattern, Lq, key.shape[2], causal, block_size, B, H, query.device)
    try:
        layout = _layouts.get(cache_key)
    except (TypeError, RuntimeError):  # an unhashable pattern (or one whose equality is elementwise)
        return None
    if layout is not None:
        _layouts.move_to_end(cache_key)
    return layout


def _backend_function(backend: str, query, key, value, layout: Layout) -> Callable[..., Any]:
    """The implementation of a named backend, after checking that it can run these inputs."""
    Lq, Lk = query.shape[2], key.shape[2]
    if backend == "reference":
        from spattn.ops.attention.impl.reference import attention_reference

        return attention_reference
    if backend == "dense":
        if Lq * Lk > 1 << 26:
            raise ValueError(f"backend='dense' would materialise {Lq}x{Lk} scores; use 'reference' or 'triton'")
        from spattn.ops.attention.impl.dense import attention_dense

        return attention_dense
    if backend == "flex":
        from spattn.ops.attention.impl import flex

        reason = flex.available()
        if reason:
            raise RuntimeError(f"backend='flex' cannot run: {reason}")
        return flex.attention_flex
    from spattn.ops.attention.impl import triton as triton_impl

    reason = triton_impl.supports(query, key, value, layout)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return triton_impl.attention_triton


def _check_scale(scale: float | None, D: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(D)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def register_layout_builder(factory: Callable[..., Any]) -> None:
    """Let :func:`attention` build dynamic patterns with ``factory`` (Note [dynamic path]).

    ``factory(pattern, q_len, kv_len, *, causal, block_size, batch, heads, device)`` returns an object whose
    ``build(query, key)`` gives the Layout ``spattn.compile`` would give (block for block, token for token), or
    raises ``ValueError`` / ``NotImplementedError`` for a pattern it does not build."""
    if factory not in _builder_factories:
        _builder_factories.append(factory)


def _cached_builder(pattern: Pattern, Lq: int, Lk: int, causal: bool, block_size: int, B: int, H: int,
                    device: torch.device) -> Any | None:
    """The cached builder for these arguments, made on first use; None when no factory accepts the pattern."""
    key = (pattern, Lq, Lk, causal, block_size, B, H, device)
    try:
        hit = _builders.get(key, False)
    except (TypeError, RuntimeError):  # an unhashable pattern (or one whose equality is elementwise)
        return None
    if hit is not False:
        _builders.move_to_end(key)
        return hit
    builder = None
    for factory in _builder_factories:
        try:
            builder = factory(pattern, Lq, Lk, causal=causal, block_size=block_size, batch=B, heads=H, device=device)
            break
        except (ValueError, NotImplementedError):
            continue
    _builders[key] = builder
    while len(_builders) > _BUILDERS_KEPT:
        _builders.popitem(last=False)
    return builder


def _check_inputs(query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if key.device != query.device or value.device != query.device:
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    B, H, Lq, D = query.shape
    if key.shape[0] != B or value.shape[0] != B:
        raise ValueError(f"batch sizes differ: query {B}, key {key.shape[0]}, value {value.shape[0]}")
    if key.shape[-1] != D:
        raise ValueError(f"key head dim must equal query head dim {D}, got {key.shape[-1]} (key shape {tuple(key.shape)})")
    if value.shape[1] != key.shape[1] or value.shape[2] != key.shape[2]:
        raise ValueError(f"value must have shape [B, Hkv, Lk, Dv] matching key {tuple(key.shape)}, got {tuple(value.shape)}")
    if D == 0 or value.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got query/key D={D}, value Dv={value.shape[-1]}")
    Hk = key.shape[1]
    if Hk == 0 or H % Hk != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hk}) for GQA/MQA")
    if Lq == 0 or key.shape[2] == 0:
        raise ValueError(f"query and key lengths must be >= 1, got Lq={Lq}, Lk={key.shape[2]}")


def _check_layout(layout: Layout, query: torch.Tensor, key: torch.Tensor, causal: bool) -> None:
    B, H, Lq, _ = query.shape
    Lk = key.shape[2]
    if layout.q_len != Lq or layout.kv_len != Lk:
        raise ValueError(f"layout was compiled for q_len={layout.q_len}, kv_len={layout.kv_len}, but the inputs have Lq={Lq}, Lk={Lk}")
    if layout.batch not in (1, B):
        raise ValueError(f"layout has batch {layout.batch}, expected 1 or {B}")
    if layout.heads not in (1, H):
        raise ValueError(f"layout has {layout.heads} heads, expected 1 or {H} (query heads)")
    if layout.device != query.device:
        raise ValueError(f"layout is on {layout.device} but the inputs are on {query.device}: use layout.to(device)")
    if causal and not layout.causal:
        raise ValueError("causal=True but the layout was compiled with causal=False: compile it with causal=True")


def choose_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: Layout) -> tuple[str, str]:
    """The backend ``backend="auto"`` runs for these inputs, and why: ``(name, reason)``.

    Takes the inputs of :func:`attention` (query ``[B, H, Lq, D]``, key/value ``[B, Hkv, Lk, D]``) and a Layout
    compiled for them."""
    if query.is_cuda:
        from spattn.ops.attention.impl import triton as triton_impl  # imports triton itself only when it runs

        reason = triton_impl.supports(query, key, value, layout)
        if reason is None:
            return "triton", "CUDA inputs supported by the triton kernels"
        return "reference", f"triton cannot run: {reason}"
    if query.shape[2] * key.shape[2] <= _DENSE_MAX_PAIRS:
        return "dense", f"short input ({query.shape[2]}x{key.shape[2]} pairs) on {query.device.type}: dense is cheaper"
    return "reference", f"no GPU kernels on {query.device.type}: blockwise reference"


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layout_or_pattern: Layout | Pattern,
    *,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    block_size: int = 128,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention over the pairs a pattern or Layout allows.

    Args:
        query: ``[B, H, Lq, D]``.
        key: ``[B, Hkv, Lk, D]`` with ``H % Hkv == 0`` (GQA/MQA, no copies); ``Lk >= Lq`` when a pattern is
            compiled here (queries aligned bottom-right, as in KV-cache decoding); a Layout may have any lengths.
        value: ``[B, Hkv, Lk, Dv]``.
        layout_or_pattern: a :class:`Layout` compiled for these shapes, or a :class:`Pattern` (compiled here
            with ``block_size``; dynamic patterns see ``query``/``key``: ``static | TopK/TopP`` goes through a
            cached :class:`spattn.LayoutBuilder`, with no host synchronisation, the same Layout as
            ``spattn.compile``).
        causal: intersect with ``Causal()``.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"`` (triton on CUDA when supported, dense for tiny CPU inputs, else reference;
            see :func:`choose_backend`), ``"reference"``, ``"dense"``, ``"flex"`` or ``"triton"``. A named
            backend never falls back: it raises if it cannot run.
        return_lse: also return the log-sum-exp, float32 ``[B, H, Lq]``.

    Returns:
        ``[B, H, Lq, Dv]`` in the input dtype, or ``(out, lse)``. Rows with nothing to attend to give 0
        (lse ``-inf``) with finite gradients.

    Example:
        >>> q = torch.randn(1, 4, 1000, 64); k = v = torch.randn(1, 2, 1000, 64)
        >>> out = attention(q, k, v, Sinks(64) | Window(256), causal=True)
    """
    compiling = torch.compiler.is_compiling()
    if not compiling:  # Note [checked calls]
        signature = _signature(query, key, value, causal, backend)
        known = _known_layout(layout_or_pattern, query, key, causal, block_size) if signature is not None else None
        hit = _checked.get(known) if known is not None else None
        hit = hit.get(signature) if hit is not None else None
        if hit is not None:
            out, lse = hit[1](query, key, value, known, scale=_check_scale(scale, query.shape[3]),
                              return_lse=return_lse)
            return (out, lse) if return_lse else out
    _check_inputs(query, key, value)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    B, H, Lq, D = query.shape
    keep = not compiling  # the Layout outlives this call (given, or cached for a static pattern)
    if isinstance(layout_or_pattern, Pattern):
        if key.shape[2] < Lq:  # a Layout may have any lengths (a cross-attention BlockMask); patterns may not
            raise ValueError(f"key length ({key.shape[2]}) must be >= query length ({Lq}) to compile a pattern: "
                             "queries are aligned bottom-right")
        builder = None
        if layout_or_pattern.contains_dynamic():
            keep = False  # a fresh Layout per call
            builder = _cached_builder(layout_or_pattern, Lq, key.shape[2], causal, block_size, B, H, query.device)
        if builder is not None:
            layout = builder.build(query, key)
        elif not layout_or_pattern.contains_dynamic():
            layout = _cached_layout(layout_or_pattern, Lq, key.shape[2], causal, block_size, B, H, query.device)
        else:
            layout = compile_pattern(
                layout_or_pattern, Lq, key.shape[2], causal=causal, block_size=block_size, batch=B, heads=H,
                device=query.device, query=query, key=key,
            )
    elif isinstance(layout_or_pattern, Layout):
        layout = layout_or_pattern
    else:
        raise TypeError(f"layout_or_pattern must be a spattn Layout or Pattern, got {type(layout_or_pattern).__name__}")
    _check_layout(layout, query, key, causal)
    scale = _check_scale(scale, D)

    requested = backend
    if backend == "auto":
        backend, reason = choose_backend(query, key, value, layout)
        logger.debug("spattn.attention: backend=%s (%s)", backend, reason)
    run = _backend_function(backend, query, key, value, layout)
    signature = _signature(query, key, value, causal, requested) if keep else None
    if signature is not None:
        known = _checked.get(layout)
        if known is None:
            known = _checked[layout] = {}
        if len(known) >= _CHECKED_PER_LAYOUT:  # one Layout seen with many input signatures: keep the newest
            known.pop(next(iter(known)))
        known[signature] = (backend, run)
    out, lse = run(query, key, value, layout, scale=scale, return_lse=return_lse)
    return (out, lse) if return_lse else out
