"""One decode step of sparse attention: safeguards from the plan's pattern, pages selected for the current
query from the cache's page statistics, attention over the gathered pages.

Notation: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads, ``G = H // Hkv``, ``L`` cached keys
(the query is the last position, ``L - 1``), ``S`` page size, ``NP = ceil(L / S)`` pages, ``P`` pages
visited per (sequence, key/value head).

A layer's pattern is split into its *static* part (what the pattern keeps for the query at ``L - 1`` without
looking at the input: sinks, windows, strides, ... compiled with ``q_len=1``, so a decode row is exactly the
pattern's row) and its *dynamic* part (``TopK`` / ``TopP``). At decode time the dynamic part selects pages
by its own selector, scored from the cached per-page statistics, never from the keys:

* ``"bounds"``: Quest's bound on ``q . k`` from the per-page key min / max::

    u[b, g, p] = relu(q) . key_max[p] - relu(-q) . key_min[p]        (>= q . k for every key k of page p)

* ``"pooled"``: ``u[b, g, p] = q . mean_key[p]`` (the cache keeps page means when a layer needs them);

then, as the selectors do for one query, ``score[b, kv, p]`` = the mean over the group's query heads ``g`` of
``softmax_p(scale * u + log n_p)``. A layer whose selector has no page-statistics form (``vertical_slash``,
``antidiagonal``, ``probe``, a selector with options) decodes through the generic path (its selector on the
keys for the one query).

``TopK(blocks)`` keeps the ``budget`` best pages (budget from the controller, initially ``blocks``);
``TopP(mass)`` the fewest pages reaching ``mass`` with what the safeguards keep, at most ``budget``.
Keys that are padding (attention mask) are never attended.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch

from spattn.layout import tables
from spattn.patterns import Layout, Pattern, Union
from spattn.patterns.base import Context
from spattn.selectors import TopK, TopP, top_k, top_p
from spattn.selectors.common import block_sizes, masked_softmax, normalise

PAGE_SELECTORS = ("bounds", "pooled")  # selectors scored from the cache's page statistics at decode


# ---------------------------------------------------------------------------------------------- pattern split
@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one layer decodes: ``static`` pattern (or None: nothing), the dynamic rule, mandatory tokens.

    ``rule`` is ``"none"`` (static only), ``"top_k"`` or ``"top_p"``; ``mass`` is TopP's mass; ``blocks`` is
    TopK's budget in pages (the controller's starting point); ``keep`` are token positions always kept;
    ``selector`` is the page score (one of :data:`PAGE_SELECTORS`)."""

    static: Pattern | None
    rule: str = "none"
    mass: float = 1.0
    blocks: int = 0
    keep: tuple[int, ...] = ()
    selector: str = "bounds"


def decode_plan(pattern: Pattern) -> DecodePlan | None:
    """Split ``pattern`` for paged decode, or ``None`` when it has a shape paged decode does not cover
    (a dynamic part inside an intersection or ``PerHead``, per-head budgets, ``within``, a selector without a
    page-statistics form): such layers decode through the generic path (the pattern compiled for one query
    with the keys)."""
    if not pattern.contains_dynamic():
        return DecodePlan(static=pattern)
    parts = pattern.parts if isinstance(pattern, Union) else (pattern,)
    static = [p for p in parts if not p.contains_dynamic()]
    dynamic = [p for p in parts if p.contains_dynamic()]
    if len(dynamic) != 1 or not isinstance(dynamic[0], (TopK, TopP)):
        return None
    d = dynamic[0]
    if d.within is not None or d.sharing != "group":
        return None
    selector = d.selector if isinstance(d.selector, str) else getattr(d.selector, "name", None)
    if selector not in PAGE_SELECTORS or d.options:
        return None
    budget = d.blocks if isinstance(d, TopK) else 0
    mass = d.mass if isinstance(d, TopP) else 1.0
    if isinstance(budget, tuple) or isinstance(mass, tuple):
        return None
    static_pattern = None
    if static:
        static_pattern = static[0]
        for p in static[1:]:
            static_pattern = static_pattern | p
    return DecodePlan(static=static_pattern, rule="top_k" if isinstance(d, TopK) else "top_p", mass=float(mass),
                      blocks=int(budget), keep=tuple(d.keep), selector=selector)


# ---------------------------------------------------------------------------------------------- static rows
_ROWS: OrderedDict[tuple, tuple[torch.Tensor, int]] = OrderedDict()
_ROWS_SIZE = 16


def layout_row(layout: Layout) -> torch.Tensor:
    """bool ``[Bl, Hl, kv_len]``: the token mask of the single query of a layout compiled with ``q_len=1``."""
    if layout.q_len != 1:
        raise ValueError(f"layout_row needs a layout compiled for one query, got q_len={layout.q_len}")
    _, slot = tables.unpack(layout)                       # [Bl, Hl, 1, NK] into the tiles
    rows = tables.tiles(layout.masks)[:, 0, :]            # [M + 2, bs]: the query sits on row 0 of its block
    return rows[slot[:, :, 0]].flatten(2)[..., : layout.kv_len]


def pattern_row(pattern: Pattern, kv_len: int, *, batch: int, heads: int, page_size: int,
                device: torch.device) -> torch.Tensor:
    """bool ``[Bs, Hs, L]``: the keys a static ``pattern`` keeps for one causal query at ``L - 1``, from its
    exact ``token_mask`` (a few elementwise kernels over ``L`` keys on the device; what ``compile`` with
    ``q_len=1`` gives, see :func:`layout_row`, without building a Layout at every step)."""
    ctx = Context(q_len=1, kv_len=kv_len, block_size=page_size, device=device, causal=True, batch=batch,
                  heads=heads)
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    h = torch.arange(heads, device=device).view(1, heads, 1)
    i = torch.full((1, 1, 1), kv_len - 1, dtype=torch.long, device=device)
    j = torch.arange(kv_len, device=device).view(1, 1, kv_len)
    keep = torch.as_tensor(pattern.token_mask(ctx, b, h, i, j), dtype=torch.bool, device=device)
    # broadcast dims stay 1: a row per sequence / head only where the pattern reads b / h
    keep = keep.expand(torch.broadcast_shapes(keep.shape, (1, 1, kv_len)))
    return keep & (j <= i)


def static_row(plan: DecodePlan, kv_len: int, *, batch: int, heads: int, page_size: int, device: torch.device,
               group: int = 1, offset: int = 0) -> tuple[torch.Tensor, int]:
    """bool ``[Bs, Hs, L]`` (``Bs`` in {1, B}, ``Hs`` in {1, H}) keys the static part keeps for the query at
    ``L - 1`` (causal), and the largest number of pages it touches for one key/value head (the union over its
    ``group`` query heads). ``offset``: leading padding slots; the pattern then sees a sequence of
    ``L - offset`` tokens starting at slot ``offset`` (``Sinks(n)`` keeps the first ``n`` real tokens, ``keep``
    positions count from the first real token). Cached per shape."""
    if not 0 <= offset < kv_len:
        raise ValueError(f"offset must be in [0, kv_len={kv_len}), got {offset}")
    key = (plan.static, plan.keep, kv_len, batch, heads, page_size, str(device), group, offset)
    hit = _ROWS.get(key)
    if hit is not None:
        _ROWS.move_to_end(key)
        return hit
    length = kv_len - offset  # the sequence the pattern sees
    if plan.static is None:
        row = torch.zeros(1, 1, length, dtype=torch.bool, device=device)
    else:
        row = pattern_row(plan.static, length, batch=batch, heads=heads, page_size=page_size, device=device)
    if plan.keep:
        toks = torch.tensor([t for t in plan.keep if t < length], dtype=torch.long, device=device)
        row = row.clone()
        row[..., toks] = True
    if offset:
        row = torch.nn.functional.pad(row, (offset, 0))
    n_pages = -(-kv_len // page_size)
    pad = n_pages * page_size - kv_len
    padded = torch.nn.functional.pad(row, (0, pad)) if pad else row
    touched = padded.unflatten(-1, (n_pages, page_size)).any(-1)                  # [Bs, Hs, NP]
    if touched.shape[1] == heads and group > 1:
        touched = touched.unflatten(1, (heads // group, group)).any(2)
    pages = int(touched.sum(-1).max())  # one host sync per shape
    _ROWS[key] = (row, pages)
    while len(_ROWS) > _ROWS_SIZE:
        _ROWS.popitem(last=False)
    return row, pages


# ---------------------------------------------------------------------------------------------- selection
def page_scores(query: torch.Tensor, key_min: torch.Tensor | None, key_max: torch.Tensor | None, kv_len: int,
                page_size: int, scale: float, visible: torch.Tensor, *, selector: str = "bounds",
                key_mean: torch.Tensor | None = None, sizes: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``[B, Hkv, NP]``: the decode page scores of ``selector`` (``"bounds"``: from per-page key
    min/max; ``"pooled"``: from per-page mean keys).

    query ``[B, H, 1, D]``; key_min/key_max/key_mean ``[B, Hkv, NP, D]``; visible bool ``[B, Hkv, NP]``."""
    B, H, _, D = query.shape
    q = query[:, :, 0].float()
    if selector == "pooled":
        if key_mean is None:
            raise ValueError("pooled page scores need the page means (key_mean)")
        Hkv = key_mean.shape[1]
        q = q.view(B, Hkv, H // Hkv, D)
        u = torch.einsum("bkgd,bkpd->bkgp", q, key_mean.float())
    elif selector == "bounds":
        if key_min is None or key_max is None:
            raise ValueError("page selection needs the cache's page statistics (key_min, key_max)")
        Hkv = key_min.shape[1]
        q = q.view(B, Hkv, H // Hkv, D)                                             # [B, Hkv, G, D]
        u = torch.einsum("bkgd,bkpd->bkgp", q.clamp_min(0), key_max.float()) \
            - torch.einsum("bkgd,bkpd->bkgp", (-q).clamp_min(0), key_min.float())  # [B, Hkv, G, NP]
    else:
        raise ValueError(f"selector must be one of {PAGE_SELECTORS}, got {selector!r}")
    sizes = (block_sizes(kv_len, page_size, query.device) if sizes is None else sizes).float()
    logits = u * scale + torch.log(sizes)
    # one selection per key/value group: the mean of the group's per-head page distributions
    per_head = masked_softmax(logits, visible[:, :, None, :])
    return normalise(per_head.mean(2), visible)


@dataclasses.dataclass
class DecodeSelection:
    """What one decode step attends: ``pages`` int64 ``[B, Hkv, P]`` (page indices, -1 = unused slot),
    ``mask`` bool ``[B, H, P * S]`` (tokens of those pages attended), ``selected`` (pages chosen by the
    dynamic rule, ``[B, Hkv]``)."""

    pages: torch.Tensor
    mask: torch.Tensor
    selected: torch.Tensor
    grouped: bool = False  # the token mask is equal for the query heads of a key/value group

    def density(self, valid_counts: torch.Tensor) -> torch.Tensor:
        """float ``[B]``: mean over heads of attended / valid keys."""
        return (self.mask.sum(-1).float() / valid_counts[:, None].clamp_min(1)).mean(1)


def select(query: torch.Tensor, kv_len: int, valid: torch.Tensor, plan: DecodePlan, budget: int, *,
           kv_heads: int, page_size: int, scale: float, key_min: torch.Tensor | None = None,
           key_max: torch.Tensor | None = None, dense_rows: torch.Tensor | None = None,
           offsets: list[int] | None = None, key_mean: torch.Tensor | None = None) -> DecodeSelection:
    """The pages and token mask of one decode step.

    Args:
        query: ``[B, H, 1, D]``.
        kv_len: cached keys ``L`` (the query is at ``L - 1``).
        valid: bool ``[B, L]``, False for padding keys.
        plan: the layer's :class:`DecodePlan`.
        budget: pages the dynamic rule may select beyond the safeguards (per key/value head).
        kv_heads: key/value heads ``Hkv`` (pages are chosen per key/value head).
        key_min, key_max: ``[B, Hkv, NP, D]`` page statistics (needed when ``budget > 0`` and the plan's
            selector is ``"bounds"``); key_mean: the page means (``"pooled"``).
        dense_rows: bool ``[B]``: sequences that attend every valid key (``min_sparse_tokens``).
        offsets: per sequence, the leading padding slots (left padding; default none): the static part is
            placed after them (see :func:`static_row`).
    """
    B, H = query.shape[:2]
    if H % kv_heads:
        raise ValueError(f"query heads ({H}) must be a multiple of kv_heads ({kv_heads})")
    if offsets is not None and len(offsets) != B:
        raise ValueError(f"offsets must give one leading-padding count per sequence ({B}), got {len(offsets)}")
    row, static_pages = offset_row(plan, kv_len, batch=B, heads=H, page_size=page_size, device=query.device,
                                   group=H // kv_heads, offsets=offsets)
    NP = -(-kv_len // page_size)
    width = NP if dense_rows is not None and bool(dense_rows.any()) else min(NP, static_pages + int(budget) + 1)
    return select_from_row(query, valid, plan, min(int(budget), NP), row, width, kv_heads=kv_heads,
                           page_size=page_size, scale=scale, key_min=key_min, key_max=key_max, key_mean=key_mean,
                           dense_rows=dense_rows)


def offset_row(plan: DecodePlan, kv_len: int, *, batch: int, heads: int, page_size: int, device: torch.device,
               group: int = 1, offsets: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """bool ``[Bs, Hs, L]``: the static part's keys for the query at ``L - 1`` of each sequence, ``offsets``
    its leading padding (see :func:`static_row`; one row per distinct offset, each sequence takes its own with
    one gather), and the largest number of pages they touch per key/value head."""
    if not offsets or not any(offsets):
        return static_row(plan, kv_len, batch=batch, heads=heads, page_size=page_size, device=device, group=group)
    distinct = sorted(set(offsets))
    rows = [static_row(plan, kv_len, batch=batch, heads=heads, page_size=page_size, device=device, group=group,
                       offset=o) for o in distinct]
    static_pages = max(pages for _, pages in rows)
    Hs = max(r.shape[1] for r, _ in rows)
    stacked = torch.stack([r.expand(batch, Hs, kv_len) for r, _ in rows])         # [O, B, Hs, L]
    which = torch.tensor([distinct.index(o) for o in offsets], device=device)
    return stacked[which, torch.arange(batch, device=device)], static_pages       # [B, Hs, L]


def static_rows(plan: DecodePlan, capacity: int, lengths: range, *, batch: int, heads: int, page_size: int,
                device: torch.device, group: int = 1,
                offsets: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """bool ``[T, Bs, Hs, C]``: :func:`offset_row` for each cache length of ``lengths`` (``T`` of them), padded
    with False to ``capacity``, and the most pages any of them touches: the static part of every decode step
    of a generation, computed once, so that a step reads its row with a device index (static decode)."""
    rows, pages = [], 0
    for kv_len in lengths:
        row, p = offset_row(plan, kv_len, batch=batch, heads=heads, page_size=page_size, device=device,
                            group=group, offsets=offsets)
        rows.append(torch.nn.functional.pad(row, (0, capacity - kv_len)))
        pages = max(pages, p)
    Bs, Hs = max(r.shape[0] for r in rows), max(r.shape[1] for r in rows)
    return torch.stack([r.expand(Bs, Hs, capacity) for r in rows]), pages


def select_from_row(query: torch.Tensor, valid: torch.Tensor, plan: DecodePlan, budget: int | torch.Tensor,
                    row: torch.Tensor, width: int, *, kv_heads: int, page_size: int, scale: float,
                    key_min: torch.Tensor | None = None, key_max: torch.Tensor | None = None,
                    key_mean: torch.Tensor | None = None, dense_rows: torch.Tensor | None = None,
                    page_sizes: torch.Tensor | None = None) -> DecodeSelection:
    """:func:`select` given the static part's token row ``[Bs, Hs, L]`` and the selection width ``P`` (slots
    per key/value head): device work only, no host read, so shapes are fixed when ``L`` and ``P`` are (static
    decode; ``budget`` may then be a device tensor, ``page_sizes`` the int64 ``[NP]`` tokens of each page up to
    the query, default from ``L``)."""
    B, H, _, D = query.shape
    S = page_size
    kv_len = valid.shape[-1]
    NP = -(-kv_len // S)
    pad = NP * S - kv_len
    device = query.device
    Hkv = kv_heads
    G = H // Hkv
    grouped = row.shape[1] == 1
    row = row.expand(B, H, kv_len)
    token = row & valid[:, None, :]                                             # [B, H, L]
    if dense_rows is not None:
        token = token | (dense_rows[:, None, None] & valid[:, None, :])
    tok_pages = (torch.nn.functional.pad(token, (0, pad)) if pad else token).unflatten(-1, (NP, S))
    kept_pages = tok_pages.any(-1).view(B, Hkv, G, NP).any(2)                  # [B, Hkv, NP]
    valid_pages = (torch.nn.functional.pad(valid, (0, pad)) if pad else valid).unflatten(-1, (NP, S)).any(-1)
    chosen = torch.zeros(B, Hkv, NP, dtype=torch.bool, device=device)
    if plan.rule != "none" and (isinstance(budget, torch.Tensor) or budget > 0):
        visible = valid_pages[:, None, :].expand(B, Hkv, NP)
        scores = page_scores(query, key_min, key_max, kv_len, S, scale, visible, selector=plan.selector,
                             key_mean=key_mean, sizes=page_sizes)                 # [B, Hkv, NP]
        available = visible & ~kept_pages
        if dense_rows is not None:
            available = available & ~dense_rows[:, None, None]
        s4, a4 = scores[:, :, None, :], available[:, :, None, :]
        if plan.rule == "top_k":
            chosen = top_k(s4, a4, budget)[:, :, 0]
        else:
            kept_mass = (scores * kept_pages).sum(-1)[:, :, None]
            chosen = top_p(s4, a4, plan.mass, kept_mass=kept_mass, max_blocks=budget)[:, :, 0]
    visit = kept_pages | chosen                                                  # [B, Hkv, NP]
    # pages to visit first (stable: ascending page order), unused slots after them
    order = torch.sort((~visit).to(torch.uint8), dim=-1, stable=True).indices[..., :width]  # [B, Hkv, P]
    used = visit.gather(-1, order)
    pages = torch.where(used, order, torch.full_like(order, -1))
    # token mask of the visited pages: safeguard tokens, or every valid token of a chosen page
    order_h = order.repeat_interleave(G, dim=1)                                  # [B, H, P]
    tok_sel = tok_pages.gather(2, order_h[..., None].expand(-1, -1, -1, S))      # [B, H, P, S]
    valid_tok = (torch.nn.functional.pad(valid, (0, pad)) if pad else valid).unflatten(-1, (NP, S))
    valid_sel = valid_tok[:, None].expand(B, H, NP, S).gather(2, order_h[..., None].expand(-1, -1, -1, S))
    chosen_h = chosen.gather(-1, order).repeat_interleave(G, dim=1)              # [B, H, P]
    used_h = used.repeat_interleave(G, dim=1)
    mask = (tok_sel | (chosen_h[..., None] & valid_sel)) & used_h[..., None]
    return DecodeSelection(pages=pages, mask=mask.flatten(2), selected=chosen.sum(-1), grouped=grouped)


# ---------------------------------------------------------------------------------------------- attention
def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: DecodeSelection,
                    *, page_size: int, scale: float) -> torch.Tensor:
    """``[B, H, 1, Dv]``: softmax attention of the query over the selected pages' tokens (float32 maths).

    query ``[B, H, 1, D]``; key/value ``[B, Hkv, L, D]`` (GQA heads not repeated). A row with nothing to
    attend gives 0."""
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    G = H // Hkv
    S = page_size
    pages = selection.pages.clamp_min(0)                                         # [B, Hkv, P]
    tokens = (pages[..., None] * S + torch.arange(S, device=key.device)).flatten(2).clamp_max(L - 1)
    k = key.gather(2, tokens[..., None].expand(-1, -1, -1, D)).float()           # [B, Hkv, P*S, D]
    v = value.gather(2, tokens[..., None].expand(-1, -1, -1, value.shape[-1])).float()
    q = query[:, :, 0].float().view(B, Hkv, G, D)
    logits = torch.einsum("bkgd,bktd->bkgt", q, k) * scale
    mask = selection.mask.view(B, Hkv, G, -1)
    logits = logits.masked_fill(~mask, -math.inf)
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    p = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out = torch.einsum("bkgt,bktd->bkgd", p, v)
    return out.reshape(B, H, 1, -1).to(query.dtype)


_TABLE_BUFFERS: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()


def table_buffers(B: int, H: int, Hkv: int, P: int, S: int, device: torch.device, *,
                  grouped: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kv_mid [B, H, 1, P], full_kv_num [B, H, 1], full_kv_idx [1, 1, 1, 1], masks uint8 [B * Ht * P, S, S])``
    of the decode tables of :func:`block_tables` (``Ht = Hkv`` when ``grouped``, else ``H``): the tile ids, the
    empty full list and the mask tiles, cached per shape and shared by every layer and step (the torch and the
    fused selection both write row 0 of the tiles; launches on one stream run in order)."""
    Ht = Hkv if grouped else H
    key = (B, H, Ht, P, S, str(device))
    bufs = _TABLE_BUFFERS.get(key)
    if bufs is None:
        ids = torch.arange(B * Ht * P, dtype=torch.int32, device=device).view(B, Ht, 1, P)
        if grouped:
            ids = ids.repeat_interleave(H // Hkv, dim=1)
        bufs = (ids.contiguous(), torch.zeros(B, H, 1, dtype=torch.int32, device=device),
                torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=device),
                torch.zeros(B * Ht * P, S, S, dtype=torch.uint8, device=device))
        _TABLE_BUFFERS[key] = bufs
        while len(_TABLE_BUFFERS) > _ROWS_SIZE:
            _TABLE_BUFFERS.popitem(last=False)
    return bufs


def block_tables(selection: DecodeSelection, *, heads: int, page_size: int) -> tuple[torch.Tensor, ...]:
    """The selection as a Layout's decode tables, built on the device (no host synchronisation):
    ``(kv_num [B, H, 1], kv_idx [B, H, 1, P], kv_mid [B, H, 1, P], full_kv_num [B, H, 1], full_kv_idx
    [1, 1, 1, 1], masks uint8 [M, S, S])`` int32 tables. Every visited page is a *partial* entry whose mask
    tile's row 0 is that page's token mask (the row a single query reads), so safeguards, chosen pages,
    padding and the cache's tail are all exact; the full list is empty. With ``selection.grouped`` the tiles
    are per key/value head (the tables are read at each group's first head, see ``grouped`` in
    :func:`spattn.ops.attention.impl.triton.decode_tables`), else per query head.

    The id table, the empty full list and the mask buffer are cached per shape and reused by every layer and
    step (launches on one stream run in order; rows 1.. of a tile are never read and stay zero)."""
    B, Hkv, P = selection.pages.shape
    H, S = heads, page_size
    G = H // Hkv
    kv_mid, full_num, full_idx, masks = table_buffers(B, H, Hkv, P, S, selection.pages.device,
                                                      grouped=selection.grouped)
    used = selection.pages >= 0
    kv_num = used.sum(-1, dtype=torch.int32).repeat_interleave(G, dim=1)[..., None]          # [B, H, 1]
    kv_idx = selection.pages.clamp_min(0).to(torch.int32).repeat_interleave(G, dim=1)[:, :, None, :]
    tiles = selection.mask.view(B, Hkv, G, P, S)[:, :, 0] if selection.grouped else selection.mask.view(B, H, P, S)
    masks.view(-1, S * S)[:, :S].copy_(tiles.reshape(-1, S))
    return kv_num, kv_idx.contiguous(), kv_mid, full_num, full_idx, masks


def _widened(t: torch.Tensor) -> torch.Tensor:
    """The whole ``[B, Hkv, C, D]`` buffer of which ``t`` is the first ``L`` rows (a cache's filled part),
    or ``t`` itself when it is not such a view."""
    B, Hh, L, D = t.shape
    sb, sh, sl, sd = t.stride()
    if sd != 1 or sl != D or sh % D or sh // D <= L or (B > 1 and sb != Hh * sh):
        return t
    C = sh // D
    end = t.storage_offset() + (B - 1) * sb + (Hh - 1) * sh + C * D
    if end * t.element_size() > t.untyped_storage().nbytes():
        return t
    return t.as_strided((B, Hh, C, D), t.stride())


def triton_paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           selection: DecodeSelection, *, page_size: int, scale: float,
                           whole_buffer: bool = False) -> torch.Tensor:
    """:func:`paged_attention` through spattn's triton split-K decode kernel: one launch, block tables built
    on the device from ``selection`` (:func:`block_tables`), the launch plan cached per shape. Needs CUDA
    tensors (or CPU ones under ``TRITON_INTERPRET=1``) and a power-of-two ``page_size >= 16``.

    query ``[B, H, 1, D]``; key/value ``[B, Hkv, L, D]``. ``whole_buffer``: key/value are the filled part of
    a preallocated cache buffer whose unfilled rows are finite (:class:`~spattn.runtime.SpattnCache` zeroes
    them): the kernel then runs over the whole buffer (the token masks end at ``L``), so its launch arguments
    do not change from step to step (one plan per generation, and a launch a CUDA graph can replay).
    Returns ``[B, H, 1, Dv]`` in the query's dtype; a row with nothing to attend gives 0."""
    from spattn.ops.attention.impl.triton import decode_tables

    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"the triton decode kernel needs a power-of-two page_size >= 16, got {page_size}")
    if whole_buffer:
        key, value = _widened(key), _widened(value)
    tables = block_tables(selection, heads=query.shape[1], page_size=page_size)
    out, _ = decode_tables(query, key, value, tables, scale=scale, grouped=selection.grouped)
    return out


def auto_paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selection: DecodeSelection,
                         *, page_size: int, scale: float, whole_buffer: bool = False) -> torch.Tensor:
    """:func:`triton_paged_attention` for CUDA tensors when triton is installed and ``page_size`` is a power of
    two >= 16, else :func:`paged_attention` (the reference, on CPU)."""
    if query.is_cuda and page_size >= 16 and not page_size & (page_size - 1) and has_triton():
        return triton_paged_attention(query, key, value, selection, page_size=page_size, scale=scale,
                                      whole_buffer=whole_buffer)
    return paged_attention(query, key, value, selection, page_size=page_size, scale=scale)


def has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def sampled_recall(query: torch.Tensor, key: torch.Tensor, valid: torch.Tensor, selection: DecodeSelection,
                   *, page_size: int, scale: float) -> torch.Tensor:
    """float ``[B]``: true recall of the selection, the dense softmax mass (over valid keys) it attends,
    averaged over heads. Costs one dense score row: call it on a sample of steps."""
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    G = H // Hkv
    q = query[:, :, 0].float().view(B, Hkv, G, D)
    logits = torch.einsum("bkgd,bktd->bkgt", q, key.float()) * scale
    probs = masked_softmax(logits, valid[:, None, None, :])                      # [B, Hkv, G, L]
    tokens = (selection.pages.clamp_min(0)[..., None] * page_size
              + torch.arange(page_size, device=key.device)).flatten(2)            # [B, Hkv, P*S]
    in_range = tokens < L
    gathered = probs.gather(-1, tokens.clamp_max(L - 1)[:, :, None, :].expand(-1, -1, G, -1))
    mask = selection.mask.view(B, Hkv, G, -1) & in_range[:, :, None, :]
    return (gathered * mask).sum(-1).flatten(1).mean(1)
