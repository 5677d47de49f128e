"""``TopK`` and ``TopP``: dynamic, query-aware block selection as patterns of the spattn algebra.

``Sinks(64) | Window(1024) | TopP("pooled", 0.95)``: the static parts (safeguards) are compiled first; the
dynamic part scores every key block from the actual query/key (a selector), then spends its budget only on
visible blocks the safeguards do not already keep. Selection granularity is the compile block size.

Per call it records in ``Layout.info`` (tensors, no host sync):

* ``estimated_mass`` float32 ``[B, H]``: mean over query blocks of the estimated share of the softmax mass
  kept (safeguards + selection), by the selector's own estimate (``spattn.coverage.measure`` gives the true one);
* ``estimated_mass_per_block`` ``[B, H, NQ]`` and ``selected_blocks`` int ``[B, H, NQ]`` (blocks chosen
  dynamically, safeguards not counted).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from spattn.patterns.base import EMPTY, PARTIAL, Context, Pattern
from spattn.patterns.builtin import BlockSelection
from spattn.patterns.serialize import register_pattern
from spattn.selectors import budget as _budget
from spattn.selectors.common import Selector, get_selector, normalise, visible_blocks

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


class _Dynamic(BlockSelection):
    """Shared machinery of TopK / TopP (fields are declared by the subclasses)."""

    dynamic: ClassVar[bool] = True
    selector: str
    options: tuple
    min_keys: int
    max_keys: int | None
    sharing: str
    keep: tuple[int, ...]
    within: Pattern | None

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

    def make_selector(self) -> Selector:
        return get_selector(self.selector, **dict(self.options))

    def granularity(self, ctx: Context) -> int:
        return ctx.block_size

    # -- the rule ------------------------------------------------------------------------------
    def _choose(self, scores, available, kept_mass, min_blocks, max_blocks):
        raise NotImplementedError

    def _keep_flags(self, ctx: Context) -> torch.Tensor:
        """bool ``[NK]``: key blocks holding an always-kept token."""
        flags = torch.zeros(ctx.num_kv_blocks, dtype=torch.bool, device=ctx.device)
        toks = [t // ctx.block_size for t in self.keep if t < ctx.kv_len]
        if toks:
            flags[torch.tensor(toks, device=ctx.device)] = True
        return flags

    def selection(self, ctx: Context, *, kept: torch.Tensor | None, allowed: torch.Tensor | None) -> torch.Tensor:
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
        dev, bs = q.device, ctx.block_size
        NQ, NK = ctx.num_q_blocks, ctx.num_kv_blocks
        G = H // Hkv if self.sharing == "group" else 1
        with torch.no_grad():
            hook, static_kept, allowed = allowed, kept, None  # hook: static parts of enclosing intersections
            if self.within is not None:
                allowed = self.within.status(ctx).to(dev) != EMPTY
            if hook is not None:
                hook = hook.to(dev) >= 1
                allowed = hook if allowed is None else allowed & hook
            scores = self.make_selector().scores(q.detach(), k.detach(), block_size=bs, causal=ctx.causal,
                                                 allowed=allowed)  # [B, H, NQ, NK]
            visible = visible_blocks(Lq, Lk, bs, ctx.causal, dev).expand(B, H, NQ, NK)
            if allowed is not None:
                visible = visible & allowed
            kept = torch.zeros(1, 1, NQ, NK, dtype=torch.bool, device=dev)
            if static_kept is not None:  # static parts of enclosing unions
                kept = kept | (static_kept.to(dev) >= 1)
            if self.keep:
                kept = kept | self._keep_flags(ctx).to(dev)
            if G > 1:  # one selection per key/value head group: average the group's scores
                scores = scores.view(B, Hkv, G, NQ, NK).mean(2)
                visible = visible.view(B, Hkv, G, NQ, NK).any(2)
                kept = kept.expand(-1, H, -1, -1).reshape(kept.shape[0], Hkv, G, NQ, NK).all(2) \
                    if kept.shape[1] == H else kept
            scores = normalise(scores, visible)
            kept = kept & visible
            kept_mass = (scores * kept).sum(-1)
            min_blocks = -(-self.min_keys // bs) if self.min_keys else None
            max_blocks = None if self.max_keys is None else self.max_keys // bs
            chosen = self._choose(scores, visible & ~kept, kept_mass, min_blocks, max_blocks)
            estimated = kept_mass + (scores * chosen).sum(-1)
            count = chosen.sum(-1, dtype=torch.int32)
            if G > 1:
                chosen = chosen.repeat_interleave(G, dim=1)
                estimated = estimated.repeat_interleave(G, dim=1)
                count = count.repeat_interleave(G, dim=1)
        info = ctx.info
        info["estimated_mass"] = estimated.float().mean(-1)
        info["estimated_mass_per_block"] = estimated.float()
        info["selected_blocks"] = count
        info.setdefault("selectors", []).append(
            {"pattern": type(self).__name__, "selector": self.selector, "options": dict(self.options),
             "sharing": self.sharing}
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
        # partial blocks are unselected blocks holding kept tokens: their mask depends on the key block only
        return kb[:, None]


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
    kind: ClassVar[str] = "top_k"

    def __post_init__(self):
        self._validate()
        object.__setattr__(self, "blocks", _budget_value(self.blocks, "TopK.blocks", int, 0, None))

    def _choose(self, scores, available, kept_mass, min_blocks, max_blocks):
        return _budget.top_k(scores, available, self.blocks, min_blocks=min_blocks, max_blocks=max_blocks)


@register_pattern
@dataclasses.dataclass(frozen=True)
class TopP(_Dynamic):
    """Keep, per query block, the fewest key blocks whose estimated mass (with what the safeguards already
    keep) reaches ``mass`` of the row (cumulative threshold; FlexPrefill / XAttention style).

    Args:
        selector: ``"pooled"``, ``"vertical_slash"``, ``"antidiagonal"``, ``"bounds"`` or a Selector instance.
        mass: fraction in (0, 1], or one per selection head (as ``TopK.blocks``).
        options, min_keys, max_keys, sharing, keep, within: as for :class:`TopK`.

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
    kind: ClassVar[str] = "top_p"

    def __post_init__(self):
        self._validate()
        object.__setattr__(self, "mass", _budget_value(self.mass, "TopP.mass", float, 0.0, 1.0))

    def _choose(self, scores, available, kept_mass, min_blocks, max_blocks):
        return _budget.top_p(scores, available, self.mass, kept_mass=kept_mass, min_blocks=min_blocks,
                             max_blocks=max_blocks)


__all__ = ["TopK", "TopP", "SHARING"]
