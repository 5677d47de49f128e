"""The fused static build: block-exact patterns (optionally causal) in one device pass, no host synchronisation.

A pattern is *block-exact* under a compile context when its analytic block status holds no ``PARTIAL`` block by
construction: ``Full``, static ``BlockSelection`` subclasses (``BlockLayout``, ``RandomBlocks``, ...) whose
cells are the kernel blocks (and, for absolute rows, aligned to them), ``Strided(n, block=block_size)`` with an
aligned offset, and unions / intersections of those. Their only partial blocks come from the causal cut: a kept
block becomes what ``Full() & Causal()`` makes of it (full below the diagonal, the diagonal's token masks, empty
above). That template depends on the lengths, the block size and the device alone, so it is built once (the
banded fast path) and cached; each call then runs the pattern's status (elementwise device ops), two
``torch.where`` and the codec's fixed-width ``pack`` (tables ``NK`` wide forward, ``NQ`` transposed: entries past
the counts are padding, as the format allows). Shapes depend only on Python integers: no ``nonzero``, no
``unique``, no read of a count, so it is CUDA-graph and ``torch.compile`` friendly.

Equal to the general path (``compile``'s analytic status, per-signature token masks, reclassification, dedupe)
block for block and token for token; ``tests/test_layout_fused.py`` checks both against the brute-force mask.
"""

from __future__ import annotations

import time

import torch

from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.patterns.banded import build_layout
from spattn.patterns.base import EMPTY, FULL, Context, Intersection, Pattern, Union
from spattn.patterns.builtin import BlockSelection, Causal, Full, Strided

_TEMPLATES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_MAX_TEMPLATES = 32


def _split_causal(pattern: Pattern) -> tuple[Pattern | None, bool]:
    """(the pattern without top-level ``Causal()`` parts of an intersection, whether there were any)."""
    if isinstance(pattern, Causal):
        return None, True
    if isinstance(pattern, Intersection):
        rest = tuple(p for p in pattern.parts if not isinstance(p, Causal))
        if len(rest) < len(pattern.parts):
            if not rest:
                return None, True
            return (rest[0] if len(rest) == 1 else Intersection(rest)), True
    return pattern, False


def block_exact(pattern: Pattern, ctx: Context) -> bool:
    """True when ``pattern``'s analytic status under ``ctx`` has no partial block by construction (see module)."""
    if pattern.contains_dynamic():
        return False
    if isinstance(pattern, (Union, Intersection)):
        return all(block_exact(p, ctx) for p in pattern.parts)
    if isinstance(pattern, Full):
        return True
    if isinstance(pattern, Strided):
        return ctx.clamp(pattern.block) == ctx.block_size and ctx.offset % ctx.block_size == 0
    if isinstance(pattern, BlockSelection):
        g = pattern.granularity(ctx)
        if g != ctx.block_size:  # cells clamped to short lengths: exact only when one cell covers everything
            return ctx.num_q_blocks == ctx.num_kv_blocks == 1 and g >= max(ctx.q_len, ctx.kv_len)
        return not pattern.absolute_rows or ctx.offset % g == 0
    return False


def supports_fused_build(pattern: Pattern, ctx: Context) -> bool:
    """True when :func:`fused_layout` builds ``pattern`` (``ctx.causal`` or ``& Causal()`` allowed on top)."""
    rest, _ = _split_causal(pattern)
    return rest is not None and block_exact(rest, ctx)


def _template(ctx: Context) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(status int8 ``[NQ, NK]``, mask ids int32 ``[NQ, NK]``, masks ``[M, bs, bs]``) of ``Full() & Causal()``,
    cached per (lengths, block size, device)."""
    key = (ctx.q_len, ctx.kv_len, ctx.block_size, str(ctx.device))
    hit = _TEMPLATES.get(key)
    if hit is None:
        base = build_layout(Full(), ctx.q_len, ctx.kv_len, causal=True, block_size=ctx.block_size, device=ctx.device)
        status, slot = tables.unpack(base)
        hit = (status[0, 0], tables.mask_ids(status, slot)[0, 0], base.masks)
        if len(_TEMPLATES) >= _MAX_TEMPLATES:
            _TEMPLATES.pop(next(iter(_TEMPLATES)))
        _TEMPLATES[key] = hit
    return hit


def fused_layout(pattern: Pattern, ctx: Context) -> Layout:
    """The :class:`Layout` of a block-exact ``pattern`` (optionally causal) with no host synchronisation.

    Args:
        pattern: what the user passed to ``compile`` (``ctx.causal`` says whether ``causal=True`` was given).
        ctx: the compile context (``make_context``).

    Returns:
        A Layout equal to ``compile``'s general path block for block and token for token, tables ``[Bl, Hl, ...]``
        of fixed width (``NK`` forward, ``NQ`` transposed).
    """
    tracing = torch.compiler.is_compiling()  # no wall clock inside a traced graph
    start = 0.0 if tracing else time.perf_counter()
    rest, causal = _split_causal(pattern)
    if rest is None or not block_exact(rest, ctx):
        raise ValueError(f"fused_layout needs a block-exact pattern (see spattn.patterns.fused), got {pattern!r}")
    kept = rest.status(ctx) == FULL  # [Bs, Hs, NQ, NK]: every status is FULL or EMPTY here
    bs = ctx.block_size
    if causal or ctx.causal:
        t_status, t_mids, masks = _template(ctx)
        status = torch.where(kept, t_status, torch.zeros((), dtype=torch.int8, device=ctx.device))
        mids = torch.where(kept, t_mids, -1)
    else:
        status = torch.where(kept, FULL, EMPTY).to(torch.int8)
        mids = torch.full((1, 1, 1, 1), -1, dtype=torch.int32, device=ctx.device)
        masks = torch.zeros(0, bs, bs, dtype=torch.bool, device=ctx.device)
    width = max(ctx.num_q_blocks, ctx.num_kv_blocks)
    return Layout(
        q_len=ctx.q_len, kv_len=ctx.kv_len, block_size=bs, pattern=pattern, causal=ctx.causal,
        info={"compile_seconds": 0.0 if tracing else time.perf_counter() - start, "builder": "fused", **ctx.info},
        **tables.pack(status, mids, masks, width=width),
    )
