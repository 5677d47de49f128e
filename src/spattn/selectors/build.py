"""``LayoutBuilder``: dynamic layouts built on the device with no host synchronisation.

``spattn.compile`` is general: it resolves partial blocks by signature and sizes its tables from the data
(host synchronisations). For ``safeguards | TopK/TopP/Adaptive(...)`` the expensive part does not depend on
the input (``Adaptive``'s own sinks and window count as safeguards):
the safeguards' partial blocks (and the causal diagonal) are the same for every query/key. The builder
compiles them once; each ``build(query, key)`` then runs the selection, merges it into the cached status with
a few elementwise ops, and packs the tables to a fixed width (``NK``) with a cumulative sum and a scatter.
Shapes depend only on Python integers: no host sync, nothing to recompile, CUDA-graph friendly.

The Layout equals ``spattn.compile(pattern, ..., query=, key=)`` block for block and token for token; its
tables are wider (``W = NK``; entries past the counts are padding, as the format allows) and its ``masks``
may repeat a mask (the static and the causal sets are concatenated, not deduplicated).

Selection cells must be kernel blocks (``block=None`` or ``block=block_size``): with smaller cells a chosen
kernel block is only partly kept, and its token mask depends on which of its ``r x r`` cells were chosen
(``r = block_size / block``; up to ``2 ** (r * r)`` masks per block, 65536 for 32-token cells under 128-token
blocks), so the set of masks depends on the input and cannot sit in tables fixed at construction. Such
patterns raise ``ValueError`` here; ``spattn.compile`` resolves them (it deduplicates the masks it meets).
"""

from __future__ import annotations

import torch

from spattn.layout import tables
from spattn.layout.layout import Layout
from spattn.ops.attention.api import register_layout_builder
from spattn.patterns.base import EMPTY, Context, Pattern, Union
from spattn.patterns.builtin import Full
from spattn.patterns.compile import compile as compile_pattern
from spattn.selectors.patterns import Adaptive, TopK, TopP


def _split(pattern: Pattern) -> tuple[Pattern | None, TopK | TopP | Adaptive]:
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    dynamic = [p for p in parts if p.contains_dynamic()]
    if len(dynamic) != 1 or not isinstance(dynamic[0], (TopK, TopP, Adaptive)):
        raise ValueError("LayoutBuilder needs a pattern `static | TopK(...)`, `static | TopP(...)` or "
                         f"`static | Adaptive(...)` with exactly one of them at the top level, got {pattern!r}")
    static = [p for p in parts if not p.contains_dynamic()]
    if not static:
        return None, dynamic[0]
    out = static[0]
    for p in static[1:]:
        out = out | p
    return out, dynamic[0]


def _dense_view(layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    status, slot = tables.unpack(layout)
    return status, tables.mask_ids(status, slot)


class LayoutBuilder:
    """Build layouts of ``static | TopK/TopP/Adaptive(...)`` for new query/key tensors without host
    synchronisation.

    Args:
        pattern: a union of static patterns (the safeguards) and one ``TopK`` / ``TopP`` / ``Adaptive`` whose
            selection cells are kernel blocks (``block=None`` or ``block=block_size``; see the module notes).
        q_len, kv_len: lengths (``kv_len`` defaults to ``q_len``); causal, block_size: as in ``spattn.compile``.
        batch, heads: sizes of the query ``[B, H, Lq, D]`` the builder will see.
        device: where the tables live.

    Example:
        >>> builder = LayoutBuilder(Sinks(64) | Window(1024) | TopP("pooled", 0.95), 8192, causal=True,
        ...                         batch=1, heads=16, device="cuda")
        >>> layout = builder.build(q, k)   # then spattn.attention(q, k, v, layout, causal=True)
    """

    def __init__(self, pattern: Pattern, q_len: int, kv_len: int | None = None, *, causal: bool = False,
                 block_size: int = 128, batch: int, heads: int, device: torch.device | str | None = None):
        self.pattern = pattern
        self.static, self.dynamic = _split(pattern)
        self.q_len, self.kv_len = q_len, q_len if kv_len is None else kv_len
        self.causal, self.block_size, self.batch, self.heads = causal, block_size, batch, heads
        self.device = torch.device(device or "cpu")
        if self.dynamic.keep:
            raise NotImplementedError("LayoutBuilder does not support TopK/TopP(keep=...) yet; use spattn.compile")
        ctx0 = Context(self.q_len, self.kv_len, block_size, self.device, causal, batch, heads)
        cell = self.dynamic.granularity(ctx0)
        if cell != block_size:
            raise ValueError(f"LayoutBuilder needs selection cells of the kernel block: {type(self.dynamic).__name__}"
                             f"(block={cell}) under block_size={block_size} makes partly chosen kernel blocks "
                             "whose masks depend on the input; use block=None (or block=block_size), or "
                             "spattn.compile")
        kw = dict(causal=causal, block_size=block_size, device=self.device)
        masks, status, mids = [], None, None
        # the tables' fixed part: the safeguards, with Adaptive's own sinks and window
        fixed = self.static
        own = self.dynamic.local_pattern() if isinstance(self.dynamic, Adaptive) else None
        if own is not None:
            fixed = own if fixed is None else fixed | own
        self.dynamic.prepare(ctx0)
        self._cache = dict(ctx0.cache)  # what the selection needs that does not depend on the input
        if fixed is not None:
            st = compile_pattern(fixed, self.q_len, self.kv_len, batch=batch, heads=heads, **kw)
            status, mids = _dense_view(st)
            masks.append(st.masks)
        # what compile's Union hands the dynamic part: the static parts' analytic status (before causal)
        self._kept = None if self.static is None else self.static.status(
            Context(self.q_len, self.kv_len, block_size, self.device, causal, batch, heads))
        # what a dynamically chosen block becomes: full, or its causal token mask on the diagonal
        base = compile_pattern(Full(), self.q_len, self.kv_len, **kw)
        self._dyn_status, base_mids = _dense_view(base)
        offset = sum(m.shape[0] for m in masks)
        self._dyn_mids = torch.where(base_mids >= 0, base_mids + offset, -1)
        masks.append(base.masks)
        self.masks = torch.cat(masks)
        self.status = status
        self.mids = mids
        self.num_kv_blocks = -(-self.kv_len // block_size)

    def build(self, query: torch.Tensor, key: torch.Tensor, *, allowed: torch.Tensor | None = None,
              shared: dict | None = None) -> Layout:
        """The Layout for ``query [B, H, Lq, D]`` and ``key [B, Hkv, Lk, D]`` (tables ``[B, H, ...]``).

        ``allowed`` (optional bool ``[B or 1, H or 1, NQ, NK]``): the only blocks the dynamic part may choose,
        what ``compile`` hands it inside an intersection (e.g. the non-padding blocks of ``pattern & Document``);
        the caller intersects the result with the restriction's token masks (default ``None``: every block).

        ``shared``: an optional dict, empty at first, passed to every build of the same ``query`` and ``key``
        (the planner builds several candidates per layer): builders whose selections use the same selector and
        options then compute its block scores once.
        """
        ctx = Context(self.q_len, self.kv_len, self.block_size, self.device, self.causal, self.batch, self.heads,
                      query, key)
        if shared:
            ctx.cache.update(shared)
        ctx.cache.update(self._cache)
        # [B, H, NQ, NK] bool, never on a kept block (phase 2 of compile, given the static parts' status)
        chosen = self.dynamic.cached_selection(ctx, kept=self._kept, allowed=allowed)
        if shared is not None:
            shared.update((k, v) for k, v in ctx.cache.items() if isinstance(k, tuple) and k[0] == "selector_scores")
        dyn_status = torch.where(chosen, self._dyn_status, torch.zeros_like(self._dyn_status))
        dyn_mids = torch.where(chosen, self._dyn_mids, -1)
        if self.status is None:
            status, mids = dyn_status, dyn_mids
        else:
            take = dyn_status != EMPTY
            status = torch.where(take, dyn_status, self.status)
            mids = torch.where(take, dyn_mids, self.mids.expand_as(dyn_mids))
        status = status.expand(chosen.shape[0], chosen.shape[1], -1, -1)
        mids = mids.expand_as(status)
        return Layout(
            q_len=self.q_len, kv_len=self.kv_len, block_size=self.block_size, pattern=self.pattern,
            causal=self.causal, info=dict(ctx.info),
            **tables.pack(status, mids, self.masks, width=self.num_kv_blocks),
        )


register_layout_builder(LayoutBuilder)  # spattn.attention builds `static | TopK/TopP` patterns with it
