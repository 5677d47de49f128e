"""``TopK`` and ``TopP``: dynamic, query-aware block selection as patterns of the spattn algebra.

``Sinks(64) | Window(1024) | TopP("pooled", 0.95)``: the static parts (safeguards) are compiled first; the
dynamic part scores every key block from the actual query/key (a selector), then spends its budget only on
key blocks by the mass the safeguards are estimated to *miss* (a block they keep only partly stays selectable,
and choosing it keeps the rest of it). Selection granularity is ``block`` (default the compile block size).

Per call it records in ``Layout.info`` (tensors, no host sync):

* ``estimated_mass`` float32 ``[B, H]``: mean over query blocks of the estimated share of the softmax mass
  kept (safeguards + selection), by the selector's own estimate (``spattn.coverage.measure`` gives the true one);
* ``estimated_mass_per_block`` ``[B, H, NQ]`` and ``selected_blocks`` int ``[B, H, NQ]`` (blocks chosen
  dynamically, safeguards not counted), per selection cell;
* ``estimated_keys_per_head`` float ``[B, H]``: keys per query the selection adds beyond the safeguards
  (exact where the safeguards keep a block fully or not at all, half a partly kept block otherwise).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from spattn.layout import tables as _tables
from spattn.patterns.base import EMPTY, FULL, PARTIAL, Context, Pattern, as_4d
from spattn.patterns.builtin import BlockSelection, Sinks, Window
from spattn.patterns.serialize import register_pattern
from spattn.selectors import budget as _budget
from spattn.selectors.common import Selector, cell_pairs, get_selector, normalise, visible_blocks
from spattn.selectors.probe import Probe

SHARING = ("group", "head")


def _options(selector: Any, options: Any) -> tuple[str, tuple[tuple[str, Any], ...]]:
    if isinstance(selector, Selector):
        base = dict(selector.options())
        name = selector.name
    elif isinstance(selector, str):
        base, name = {}, selector
    else:
        raise TypeError(f"selector must be a selector name (str) or a Selector, got {type(selector).__name__}")
    if isinstance(options, Mapping):
        extra = dict(options)
    else:
        try:
            extra = {str(k): v for k, v in options}
        except (TypeError, ValueError) as exc:
            raise TypeError("options must be a dict or a sequence of (name, value) pairs") from exc
    base.update(extra)
    get_selector(name, **base)  # validates the name and the options
    return name, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in base.items()))


def _budget_value(value: Any, name: str, kind: type, lo: float, hi: float | None) -> Any:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"{name} must not be empty")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
            what = "a number" if kind is float else "an int"
            raise TypeError(f"{name} must be {what} or a per-head sequence, got {v!r}")
        if v < lo or (hi is not None and v > hi) or (kind is float and not lo < v):
            raise ValueError(f"{name} out of range: got {v!r}")
    return tuple(values) if isinstance(value, (list, tuple)) else value


def to_cells(status: torch.Tensor, ctx: Context, cell: int) -> torch.Tensor:
    """A block-level tensor ``[..., NQ, NK]`` (compile block size) repeated onto ``cell``-sized cells."""
    if cell == ctx.block_size:
        return status
    qmap = torch.arange(-(-ctx.q_len // cell), device=status.device) * cell // ctx.block_size
    kmap = torch.arange(-(-ctx.kv_len // cell), device=status.device) * cell // ctx.block_size
    return status[..., qmap, :][..., kmap]


def kept_fraction(ctx: Context, kept: torch.Tensor | None, cell: int) -> torch.Tensor:
    """float ``[Bs, Hs, NQc, NKc]``: the share of each selection cell the safeguards keep (``kept``: the int8
    block status of the static parts of the enclosing union, or None).

    A cell of a ``FULL`` block counts 1, of an ``EMPTY`` block 0. In a ``PARTIAL`` block the token-level mask
    is not known here (the status is all the enclosing union hands over): a cell on the causal diagonal counts
    1 (the safeguards' local window covers it), any other cell 1/2 (it stays selectable)."""
    dev = ctx.device if ctx.query is None else ctx.query.device
    NQ, NK = -(-ctx.q_len // cell), -(-ctx.kv_len // cell)
    if kept is None:
        return torch.zeros(1, 1, NQ, NK, device=dev)
    st = to_cells(kept.to(dev), ctx, cell)
    frac = torch.where(st >= FULL, 1.0, torch.where(st == PARTIAL, 0.5, 0.0))
    if ctx.causal:
        diagonal = visible_blocks(ctx.q_len, ctx.kv_len, cell, True, dev) & ~fully_visible(ctx, cell)
        frac = torch.where(diagonal & (st == PARTIAL), 1.0, frac)
    return frac


def fully_visible(ctx: Context, cell: int) -> torch.Tensor:
    """bool ``[NQc, NKc]``: causal cells whose every key is visible to every query of the cell."""
    dev = ctx.device if ctx.query is None else ctx.query.device
    qlo = torch.arange(-(-ctx.q_len // cell), device=dev) * cell + ctx.offset
    khi = torch.clamp((torch.arange(-(-ctx.kv_len // cell), device=dev) + 1) * cell, max=ctx.kv_len) - 1
    return khi[None, :] <= qlo[:, None]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A selection's view of one input, per selection cell (``Hs`` selection heads: ``Hkv`` with
    ``sharing="group"``, else ``H``): ``gain`` float ``[B, Hs, NQc, NKc]`` the estimated mass the safeguards
    miss, ``available`` bool (may be chosen), ``kept_mass`` float ``[B, Hs, NQc]`` the estimated mass kept
    already, ``cost`` float (broadcast to ``gain``) the new (query, key) pairs choosing the cell adds; ``group``
    the query heads per selection head."""

    gain: torch.Tensor
    available: torch.Tensor
    kept_mass: torch.Tensor
    cost: torch.Tensor
    group: int


class _Selection(BlockSelection):
    """Shared machinery of TopK / TopP / Adaptive (fields are declared by the subclasses)."""

    dynamic: ClassVar[bool] = True
    selector: str
    options: tuple
    min_keys: int
    max_keys: int | None
    sharing: str
    keep: tuple[int, ...]
    within: Pattern | None
    block: int | None

    def _validate(self) -> None:
        name, opts = _options(self.selector, self.options)
        object.__setattr__(self, "selector", name)
        object.__setattr__(self, "options", opts)
        if isinstance(self.min_keys, bool) or not isinstance(self.min_keys, int) or self.min_keys < 0:
            raise ValueError(f"min_keys must be an int >= 0, got {self.min_keys!r}")
        if self.max_keys is not None and (isinstance(self.max_keys, bool) or not isinstance(self.max_keys, int)
                                          or self.max_keys < 0):
            raise ValueError(f"max_keys must be None or an int >= 0, got {self.max_keys!r}")
        if self.sharing not in SHARING:
            raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
        keep = tuple(sorted(set(self.keep)))
        for t in keep:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"keep must hold token positions (ints >= 0), got {t!r}")
        object.__setattr__(self, "keep", keep)
        if self.within is not None and not isinstance(self.within, Pattern):
            raise TypeError(f"within must be a Pattern or None, got {type(self.within).__name__}")
        if self.within is not None and self.within.contains_dynamic():
            raise ValueError("within must be a static pattern")
        if self.block is not None and (isinstance(self.block, bool) or not isinstance(self.block, int)
                                       or self.block < 1):
            raise ValueError(f"block must be None or a positive int (selection block size), got {self.block!r}")

    def prepare(self, ctx: Context) -> None:
        """Put into ``ctx.cache`` what the selection needs that depends on the shapes only (``LayoutBuilder``
        computes it once and hands it to every build)."""

    def make_selector(self) -> Selector:
        return get_selector(self.selector, **dict(self.options))

    def granularity(self, ctx: Context) -> int:
        if self.block is None:
            return ctx.block_size
        if ctx.block_size % self.block:
            raise ValueError(f"{type(self).__name__}.block ({self.block}) must divide the compile block_size "
                             f"({ctx.block_size})")
        return self.block

    def _own_safeguards(self, ctx: Context, cell: int) -> tuple[torch.Tensor | None, Any]:
        """(exact kept share per cell ``[1, 1, NQc, NKc]``, token predicate ``(i, j) -> bool``) of safeguards
        the pattern holds itself (none here; see :class:`Adaptive`)."""
        return None, None

    # -- the rule ------------------------------------------------------------------------------
    def _choose(self, gain, available, kept_mass, cost, min_blocks, max_blocks, ctx):
        raise NotImplementedError

    def _keep_flags(self, ctx: Context) -> torch.Tensor:
        """bool ``[NK]``: key blocks holding an always-kept token."""
        flags = torch.zeros(ctx.num_kv_blocks, dtype=torch.bool, device=ctx.device)
        toks = [t // ctx.block_size for t in self.keep if t < ctx.kv_len]
        if toks:
            flags[torch.tensor(toks, device=ctx.device)] = True
        return flags

    def estimate(self, ctx: Context, *, kept: torch.Tensor | None = None,
                 allowed: torch.Tensor | None = None) -> Estimate:
        """What the budget rule chooses from (no host sync): per selection cell the estimated missing mass, the
        cost in new (query, key) pairs and whether it may be chosen (``kept`` / ``allowed``: the int8 status of
        the static parts of enclosing unions / intersections, as compile's phase 2 hands them over)."""
        q, k = ctx.query, ctx.key
        if q is None or k is None:
            raise ValueError(f"{type(self).__name__} is dynamic: compile it with query= and key=")
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"query/key must be [B, H, L, D] / [B, Hkv, L, D], got {tuple(q.shape)}, {tuple(k.shape)}")
        B, H, Lq, _ = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if Lq != ctx.q_len or Lk != ctx.kv_len:
            raise ValueError(f"query/key lengths ({Lq}, {Lk}) differ from q_len={ctx.q_len}, kv_len={ctx.kv_len}")
        if ctx.heads is not None and ctx.heads != H:
            raise ValueError(f"query has {H} heads but compile got heads={ctx.heads}")
        if ctx.batch is not None and ctx.batch != B:
            raise ValueError(f"query has batch {B} but compile got batch={ctx.batch}")
        if H % Hkv:
            raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hkv})")
        dev = q.device
        g = self.granularity(ctx)
        NQ, NK = -(-Lq // g), -(-Lk // g)
        G = H // Hkv if self.sharing == "group" else 1
        with torch.no_grad():
            hook, static_kept, allowed = allowed, kept, None  # the static parts of enclosing intersections / unions
            if self.within is not None:
                allowed = self.within.status(ctx).to(dev) != EMPTY
            if hook is not None:
                hook = hook.to(dev) >= 1
                allowed = hook if allowed is None else allowed & hook
            if allowed is not None:
                allowed = to_cells(allowed, ctx, g)
            visible = visible_blocks(Lq, Lk, g, ctx.causal, dev).expand(B, H, NQ, NK)
            if allowed is not None:
                visible = visible & allowed
            kept = kept_fraction(ctx, static_kept, g)  # [Bs, Hs, NQ, NK] in [0, 1]: an enclosing union's safeguards
            local_kept, kept_tokens = self._own_safeguards(ctx, g)
            if local_kept is not None:
                kept = torch.maximum(kept, local_kept)
            selector = self.make_selector()
            if kept_tokens is not None and isinstance(selector, Probe):
                # exact missing mass of the probe queries: their softmax on the keys the safeguards do not keep
                missing = selector.scores(q.detach(), k.detach(), block_size=g, causal=ctx.causal, allowed=allowed,
                                          exclude=kept_tokens)
            else:
                missing = None
                # selections that differ only in their rule (TopK blocks, TopP mass) share one estimate of the
                # same input: LayoutBuilder.build(..., shared=) hands the cache from one build to the next
                memo = ("selector_scores", self.selector, self.options, g, ctx.causal) if allowed is None else None
                scores = ctx.cache.get(memo) if memo is not None else None
                if scores is None:
                    scores = selector.scores(q.detach(), k.detach(), block_size=g, causal=ctx.causal,
                                             allowed=allowed)  # [B, H, NQ, NK]
                    if memo is not None:
                        ctx.cache[memo] = scores
            if G > 1:  # one selection per key/value head group: average the group's scores
                if missing is None:
                    scores = scores.reshape(B, Hkv, G, NQ, NK).mean(2)
                else:
                    missing = missing.reshape(B, Hkv, G, NQ, NK).mean(2)
                visible = visible.reshape(B, Hkv, G, NQ, NK).any(2)
                if kept.shape[1] == H:
                    kept = kept.reshape(kept.shape[0], Hkv, G, NQ, NK).amin(2)
            kept = torch.where(visible, kept, torch.zeros_like(kept))
            if missing is None:
                scores = normalise(scores, visible)
                kept_mass = (scores * kept).sum(-1)
                gain = scores * (1 - kept)  # the estimated mass the safeguards miss
            else:
                gain = torch.where(visible & (kept < 1), missing, torch.zeros_like(missing))
                kept_mass = (1 - gain.sum(-1)).clamp_min(0)
            cost = cell_pairs(Lq, Lk, g, ctx.causal, dev) * (1 - kept)  # new (query, key) pairs if chosen
        return Estimate(gain, visible & (kept < 1), kept_mass, cost, G)

    def selection(self, ctx: Context, *, kept: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
        est = self.estimate(ctx, kept=kept, allowed=allowed)
        gain, kept_mass, cost, G = est.gain, est.kept_mass, est.cost, est.group
        g, Lq = self.granularity(ctx), ctx.q_len
        with torch.no_grad():
            min_blocks = -(-self.min_keys // g) if self.min_keys else None
            max_blocks = None if self.max_keys is None else self.max_keys // g
            chosen = self._choose(gain, est.available, kept_mass, cost, min_blocks, max_blocks, ctx)
            estimated = kept_mass + (gain * chosen).sum(-1)
            count = chosen.sum(-1, dtype=torch.int32)
            keys = (cost * chosen).sum((-1, -2)) / Lq  # [B, Hs] estimated new keys per query
            if G > 1:
                chosen = chosen.repeat_interleave(G, dim=1)
                estimated = estimated.repeat_interleave(G, dim=1)
                count = count.repeat_interleave(G, dim=1)
                keys = keys.repeat_interleave(G, dim=1)
        info = ctx.info
        info["estimated_mass"] = estimated.float().mean(-1)
        info["estimated_mass_per_block"] = estimated.float()
        info["selected_blocks"] = count
        info["estimated_keys_per_head"] = keys.float()
        info.setdefault("selectors", []).append(
            {"pattern": type(self).__name__, "selector": self.selector, "options": dict(self.options),
             "sharing": self.sharing, "block": g}
        )
        return chosen

    # -- always-kept tokens ------------------------------------------------------------------
    def block_status(self, ctx):
        st = super().block_status(ctx)
        if self.keep:
            flags = self._keep_flags(ctx)
            st = torch.where((st == EMPTY) & flags, torch.tensor(PARTIAL, dtype=torch.int8, device=st.device), st)
        return st

    def token_mask(self, ctx, b, h, i, j):
        m = super().token_mask(ctx, b, h, i, j)
        if self.keep:
            flags = torch.zeros(ctx.kv_len, dtype=torch.bool, device=ctx.device)
            toks = [t for t in self.keep if t < ctx.kv_len]
            if toks:
                flags[torch.tensor(toks, device=ctx.device)] = True
            m = m | flags[torch.clamp(j, 0, ctx.kv_len - 1)]
        return m

    def signature(self, ctx, b, h, qb, kb):
        g = self.granularity(ctx)
        if g == ctx.block_size:
            # partial blocks are unselected blocks holding kept tokens: their mask depends on the key block only
            return kb[:, None]
        # finer selection cells: the mask is the block's cells (bits) plus its kept tokens
        sel = self.cached_selection(ctx)
        r = ctx.block_size // g
        t = torch.arange(r, device=sel.device)
        rows = qb.to(sel.device)[:, None] * r + t  # [P, r]
        cols = kb.to(sel.device)[:, None] * r + t
        inside = (rows < sel.shape[-2])[:, :, None] & (cols < sel.shape[-1])[:, None, :]
        bb = b.to(sel.device) if sel.shape[0] > 1 else torch.zeros_like(qb, device=sel.device)
        hh = h.to(sel.device) if sel.shape[1] > 1 else torch.zeros_like(qb, device=sel.device)
        bits = sel[bb[:, None, None], hh[:, None, None], rows.clamp(max=sel.shape[-2] - 1)[:, :, None],
                   cols.clamp(max=sel.shape[-1] - 1)[:, None, :]] & inside
        bits = bits.flatten(1).long()  # [P, r * r]
        words = []
        for w0 in range(0, bits.shape[1], 62):
            part = bits[:, w0:w0 + 62]
            words.append((part << torch.arange(part.shape[1], device=sel.device)).sum(1))
        out = torch.stack(words, dim=1)
        if self.keep:
            out = torch.cat([out, kb.to(sel.device)[:, None]], dim=1)
        return out.to(qb.device)


class _Dynamic(_Selection):
    """TopK / TopP: the selection alone (what ``LayoutBuilder`` merges into cached safeguards)."""


@register_pattern
@dataclasses.dataclass(frozen=True)
class TopK(_Dynamic):
    """Keep, per query block, the ``blocks`` key blocks a selector scores highest (beyond the safeguards).

    Args:
        selector: ``"pooled"``, ``"vertical_slash"``, ``"antidiagonal"``, ``"bounds"`` or a Selector instance.
        blocks: key blocks (of the compile block size) chosen per query block; an int or one per selection
            head (``Hkv`` heads with ``sharing="group"``, ``H`` with ``"head"``).
        options: selector options, e.g. ``{"stride": 16}`` for ``"antidiagonal"``.
        min_keys, max_keys: clamp the keys chosen per query (rounded to blocks; safeguards not counted).
        sharing: ``"group"`` (default: one selection per key/value head group, from the group's mean scores)
            or ``"head"`` (one per query head).
        keep: token positions every query always sees (special tokens); they spend no budget.
        within: a static pattern restricting the candidates (e.g. ``Document(ids)`` for packed batches).
        block: selection block size (default ``None``: the compile block size); must divide it, e.g. 64 or
            32 under 128-token kernel blocks. ``blocks`` then counts cells of this size.

    Example:
        >>> q = k = v = torch.randn(1, 4, 1024, 64)
        >>> out = spattn.attention(q, k, v, Sinks(16) | Window(128) | TopK("pooled", 2), causal=True)
    """

    selector: Any
    blocks: int | tuple[int, ...]
    options: Any = ()
    min_keys: int = 0
    max_keys: int | None = None
    sharing: str = "group"
    keep: tuple[int, ...] = ()
    within: Pattern | None = None
    block: int | None = None
    kind: ClassVar[str] = "top_k"

    def __post_init__(self):
        self._validate()
        object.__setattr__(self, "blocks", _budget_value(self.blocks, "TopK.blocks", int, 0, None))

    def _choose(self, gain, available, kept_mass, cost, min_blocks, max_blocks, ctx):
        return _budget.top_k(gain, available, self.blocks, min_blocks=min_blocks, max_blocks=max_blocks)


@register_pattern
@dataclasses.dataclass(frozen=True)
class TopP(_Dynamic):
    """Keep, per query block, the fewest key blocks whose estimated mass (with what the safeguards already
    keep) reaches ``mass`` of the row (cumulative threshold; FlexPrefill / XAttention style).

    Args:
        selector: ``"pooled"``, ``"vertical_slash"``, ``"antidiagonal"``, ``"bounds"`` or a Selector instance.
        mass: fraction in (0, 1], or one per selection head (as ``TopK.blocks``).
        options, min_keys, max_keys, sharing, keep, within, block: as for :class:`TopK`.

    Example:
        >>> out = spattn.attention(q, k, v, Sinks(64) | Window(1024) | TopP("pooled", 0.95), causal=True)
    """

    selector: Any
    mass: float | tuple[float, ...]
    options: Any = ()
    min_keys: int = 0
    max_keys: int | None = None
    sharing: str = "group"
    keep: tuple[int, ...] = ()
    within: Pattern | None = None
    block: int | None = None
    kind: ClassVar[str] = "top_p"

    def __post_init__(self):
        self._validate()
        object.__setattr__(self, "mass", _budget_value(self.mass, "TopP.mass", float, 0.0, 1.0))

    def _choose(self, gain, available, kept_mass, cost, min_blocks, max_blocks, ctx):
        return _budget.top_p(gain, available, self.mass, kept_mass=kept_mass, min_blocks=min_blocks,
                             max_blocks=max_blocks)


@register_pattern
@dataclasses.dataclass(frozen=True)
class Adaptive(_Selection):
    """``keys`` keys per query in all, *averaged over the heads and queries* of the layer: its own ``sinks``
    and ``window`` (kept exactly, token by token), and the rest spent on the cells with the most estimated
    missing mass per key, so heads whose mass the safeguards already hold spend little and retrieving heads
    much (a global greedy knapsack: TopP-style adaptive counts under one key budget).

    Args:
        selector: as for :class:`TopK`; with ``"probe"`` the missing mass is the probe queries' exact mass
            outside the sinks and window.
        keys: total keys per query (sinks + window + selection), averaged over heads and queries; an int.
        sinks: first keys every query sees (default 0); window: keys ``i - window .. i`` (default 0).
        block: selection block size (default 64; must divide the compile block size).
        options, min_keys, max_keys, sharing, keep, within: as for :class:`TopK`; ``min_keys`` / ``max_keys``
            clamp each query block (they may move the average off ``keys``). Safeguards of an enclosing union
            are extra: they are not counted in ``keys``.

    ``Layout.info["estimated_keys_per_head"]`` ``[B, H]`` holds each head's keys per query (sinks and window
    included); their mean is ``keys`` within one cell of ``block`` keys.

    Example:
        >>> out = spattn.attention(q, k, v, Adaptive("probe", 256, sinks=64, window=64), causal=True)
    """

    selector: Any
    keys: int
    sinks: int = 0
    window: int = 0
    options: Any = ()
    min_keys: int = 0
    max_keys: int | None = None
    sharing: str = "group"
    keep: tuple[int, ...] = ()
    within: Pattern | None = None
    block: int | None = 64
    kind: ClassVar[str] = "adaptive"

    def __post_init__(self):
        self._validate()
        for name in ("keys", "sinks", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Adaptive.{name} must be an int >= 0, got {v!r}")

    def granularity(self, ctx: Context) -> int:
        return min(super().granularity(ctx), ctx.block_size)

    def local_pattern(self) -> Pattern | None:
        """The pattern's own ``Sinks(sinks) | Window(window)`` (None when both are 0)."""
        parts = self._local_parts()
        return _union(parts) if parts else None

    def prepare(self, ctx: Context) -> None:
        if self._local_parts():
            self._local(ctx, self.granularity(ctx))

    def _local_parts(self) -> list[Pattern]:
        parts: list[Pattern] = []
        if self.sinks:
            parts.append(Sinks(self.sinks))
        if self.window:
            parts.append(Window(self.window))
        return parts

    def _local_mask(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """bool: the token pairs the pattern's own sinks and window keep (absolute positions)."""
        m = torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool, device=i.device)
        if self.sinks:
            m = m | (j < self.sinks)
        if self.window:
            d = i - j
            m = m | ((d <= self.window) & (d >= 0))
        return m

    def _local(self, ctx: Context, cell: int) -> _LocalParts:
        """The own sinks and window at ``cell`` granularity for these shapes, from the process-wide cache (the
        same for every layer and call of a model: a patched forward compiles ``Adaptive`` once per layer)."""
        dev = ctx.device if ctx.query is None else ctx.query.device
        key = (self.sinks, self.window, cell, ctx.q_len, ctx.kv_len, ctx.causal, str(dev))
        entry = ctx.cache.get(("adaptive-local", key)) or _LOCAL_CACHE.get(key)
        if entry is None:
            entry = _LocalParts.build(_union(self._local_parts()), ctx, cell, dev)
            _LOCAL_CACHE[key] = entry
            while len(_LOCAL_CACHE) > _LOCAL_CACHE_SIZE:
                _LOCAL_CACHE.pop(next(iter(_LOCAL_CACHE)))
        ctx.cache[("adaptive-local", key)] = entry
        return entry

    def own_pairs(self, ctx: Context) -> torch.Tensor:
        """float 0-d (on the device): the (query, key) pairs per head its own sinks and window keep."""
        if not self._local_parts():
            return torch.zeros((), device=ctx.device if ctx.query is None else ctx.query.device)
        return self._local(ctx, self.granularity(ctx)).pairs

    def _own_safeguards(self, ctx: Context, cell: int):
        if not self._local_parts():
            return None, None
        return self._local(ctx, cell).kept_share, self._local_mask

    def _choose(self, gain, available, kept_mass, cost, min_blocks, max_blocks, ctx):
        pairs = torch.tensor(float(self.keys * ctx.q_len), device=gain.device)
        if self._local_parts():  # a tensor: no host sync
            pairs = (pairs - self.own_pairs(ctx).to(gain.device)).clamp_min(0)
        chosen = _budget.top_keys(gain, available, cost, pairs)
        if min_blocks is not None:
            chosen = chosen | _budget.top_k(gain, available, min_blocks)
        if max_blocks is not None:
            chosen = _budget.top_k(gain, chosen, max_blocks)
        return chosen

    def selection(self, ctx: Context, *, kept: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
        chosen = super().selection(ctx, kept=kept, allowed=allowed)
        if self._local_parts():
            ctx.info["estimated_keys_per_head"] = ctx.info["estimated_keys_per_head"] + self.own_pairs(ctx) / ctx.q_len
        return chosen

    # -- the pattern's own sinks and window --------------------------------------------------
    def block_status(self, ctx):
        st = super().block_status(ctx)
        for p in self._local_parts():
            st = torch.maximum(st, as_4d(p.block_status(ctx)).to(st.device))
        return st

    def token_mask(self, ctx, b, h, i, j):
        return super().token_mask(ctx, b, h, i, j) | self._local_mask(i, j)

    def signature(self, ctx, b, h, qb, kb):
        sig = super().signature(ctx, b, h, qb, kb)
        if not self._local_parts():
            return sig
        lo_q, _ = ctx.q_range()
        lo_k, _ = ctx.k_range()
        delta = (lo_q[qb.to(lo_q.device), 0] - lo_k[0, kb.to(lo_k.device)]).long().to(sig.device)
        return torch.cat([sig, delta[:, None], (kb.to(sig.device) * ctx.block_size < self.sinks)[:, None].long()],
                         dim=1)


@dataclasses.dataclass(frozen=True)
class _LocalParts:
    """``Adaptive``'s own sinks and window compiled at the selection cell size: the layout, the share of each
    cell they keep (float ``[1, 1, NQc, NKc]``) and their (query, key) pairs (float 0-d), all on the device."""

    layout: Any
    kept_share: torch.Tensor
    pairs: torch.Tensor

    @staticmethod
    def build(pattern: Pattern, ctx: Context, cell: int, device) -> _LocalParts:
        from spattn.patterns.compile import compile as compile_pattern

        layout = compile_pattern(pattern, ctx.q_len, ctx.kv_len, causal=ctx.causal, block_size=cell, device=device)
        slot, tiles = _tables.unpack(layout)[1], _tables.tiles(layout.masks)
        kept_pairs = tiles.flatten(1).sum(-1).float()[slot]  # [1, 1, NQc, NKc]
        pairs = cell_pairs(ctx.q_len, ctx.kv_len, cell, ctx.causal, kept_pairs.device)
        share = torch.where(pairs > 0, (kept_pairs / pairs.clamp_min(1)).clamp(max=1.0), torch.zeros_like(pairs))
        return _LocalParts(layout, share, layout.allowed_pairs().float().mean().to(device))


_LOCAL_CACHE: dict[tuple, _LocalParts] = {}  # insertion-ordered: the oldest entry is dropped first
_LOCAL_CACHE_SIZE = 16


def _union(parts: list[Pattern]) -> Pattern:
    out = parts[0]
    for p in parts[1:]:
        out = out | p
    return out


__all__ = ["TopK", "TopP", "Adaptive", "Estimate", "SHARING"]
