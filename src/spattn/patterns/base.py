"""Pattern base class, the compile context, and the union / intersection algebra.

Every pattern answers two questions about a compile context (lengths, block size, device):

* ``block_status(ctx)`` -> int8 ``[Bs, Hs, NQ, NK]`` (``Bs`` in {1, B}, ``Hs`` in {1, H}): ``EMPTY`` (no allowed
  pair in the block), ``FULL`` (every in-bounds pair allowed) or ``PARTIAL`` (unknown / mixed). Computed
  analytically from block ranges, O(blocks), never O(L^2). ``PARTIAL`` may be conservative; the compiler
  resolves it exactly at token level.
* ``token_mask(ctx, b, h, i, j)`` -> bool, broadcast over index tensors: the exact semantics for batch ``b``,
  head ``h``, *absolute* query position ``i`` and key position ``j``. Used inside partial blocks only, and
  as the brute-force oracle in tests.

``signature(ctx, b, h, qb, kb)`` (optional) returns int64 ``[P, C]`` such that two partial blocks with equal
rows have equal token masks, so the compiler evaluates one mask per distinct signature.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, ClassVar

import torch

from spattn.layout.tables import EMPTY, FULL, PARTIAL


@dataclasses.dataclass
class Context:
    """Everything a pattern needs to compile: lengths, blocks, device, and (for dynamic patterns) q/k."""

    q_len: int
    kv_len: int
    block_size: int
    device: torch.device
    causal: bool = False
    batch: int | None = None
    heads: int | None = None
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    cache: dict = dataclasses.field(default_factory=dict)
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def offset(self) -> int:
        return self.kv_len - self.q_len

    @property
    def reach(self) -> int:
        """A distance no (query, key) pair of this context reaches, padding of the last blocks included: pattern
        parameters at or above it mean "unbounded" here, so they are clamped to it before any tensor op
        (exact int64 arithmetic for any size a user can write, Note [clamp])."""
        return self.kv_len + self.block_size

    def clamp(self, value: int | None) -> int:
        """``value`` clamped to :attr:`reach` (``None``, unbounded, is :attr:`reach`)."""
        return self.reach if value is None else min(value, self.reach)

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_size)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_size)

    def q_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[NQ, 1]`` first and last *absolute* query position of each query block."""
        lo = torch.arange(self.num_q_blocks, device=self.device, dtype=torch.int64) * self.block_size
        hi = torch.clamp(lo + self.block_size, max=self.q_len) - 1
        return (lo + self.offset)[:, None], (hi + self.offset)[:, None]

    def k_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[1, NK]`` first and last key position of each key block."""
        lo = torch.arange(self.num_kv_blocks, device=self.device, dtype=torch.int64) * self.block_size
        hi = torch.clamp(lo + self.block_size, max=self.kv_len) - 1
        return lo[None, :], hi[None, :]


def status_from_bounds(full: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """int8 status from two bool tensors (full wins over partial, empty over partial)."""
    out = torch.full(torch.broadcast_shapes(full.shape, empty.shape), PARTIAL, dtype=torch.int8, device=full.device)
    out = torch.where(full, torch.tensor(FULL, dtype=torch.int8, device=full.device), out)
    return torch.where(empty, torch.tensor(EMPTY, dtype=torch.int8, device=full.device), out)


def as_4d(status: torch.Tensor) -> torch.Tensor:
    """Prepend batch/head axes to an ``[NQ, NK]`` status."""
    while status.dim() < 4:
        status = status.unsqueeze(0)
    return status


class Pattern:
    """Base class of every attention pattern. Combine with ``|`` (union) and ``&`` (intersection)."""

    kind: ClassVar[str] = "pattern"
    dynamic: ClassVar[bool] = False  # depends on query/key values

    # -- algebra -------------------------------------------------------------------------------
    def __or__(self, other: Pattern) -> Pattern:
        _check_pattern(other, "right operand of |")
        return Union(_flatten(Union, self) + _flatten(Union, other))

    def __and__(self, other: Pattern) -> Pattern:
        _check_pattern(other, "right operand of &")
        return Intersection(_flatten(Intersection, self) + _flatten(Intersection, other))

    # -- compile interface ---------------------------------------------------------------------
    def block_status(self, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def token_mask(self, ctx: Context, b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def signature(self, ctx: Context, b: torch.Tensor, h: torch.Tensor, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
        """Default: every block is distinct (always correct)."""
        nq, nk = ctx.num_q_blocks, ctx.num_kv_blocks
        return (((b * (ctx.heads or 1 << 20) + h) * nq + qb) * nk + kb)[:, None]

    def contains_dynamic(self) -> bool:
        return self.dynamic

    # -- cached status (a pattern object may appear in several places of a tree) ---------------
    def status(self, ctx: Context) -> torch.Tensor:
        # keyed by identity; the entry holds the pattern itself so its id cannot pass to a new object meanwhile
        key = ("status", id(self))
        entry = ctx.cache.get(key)
        if entry is None or entry[0] is not self:
            entry = ctx.cache[key] = (self, as_4d(self.block_status(ctx)))
        return entry[1]

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description; ``spattn.pattern_from_dict`` inverts it."""
        from spattn.patterns.serialize import pattern_to_dict

        return pattern_to_dict(self)


def _check_pattern(value: Any, what: str) -> None:
    if not isinstance(value, Pattern):
        raise TypeError(f"{what} must be a spattn Pattern, got {type(value).__name__}")


def _flatten(cls: type, pattern: Pattern) -> tuple[Pattern, ...]:
    return tuple(pattern.parts) if type(pattern) is cls else (pattern,)


def _status_signature(ctx: Context, part: Pattern, b, h, qb, kb) -> torch.Tensor:
    """A part's signature where it is partial, and its status (as a negative code) elsewhere."""
    st = part.status(ctx)
    s = st[b if st.shape[0] > 1 else 0, h if st.shape[1] > 1 else 0, qb, kb].long()
    sig = part.signature(ctx, b, h, qb, kb) if bool((s == PARTIAL).any()) else s.new_zeros(s.shape[0], 1)
    sig = torch.where((s == PARTIAL)[:, None], sig, torch.zeros_like(sig))
    return torch.cat([s[:, None], sig], dim=1)  # the status in its own column: no code can collide with it


class Combination(Pattern):
    """Union and intersection: ``parts`` combined pair by pair with ``join`` (``|`` / ``&``) and block by block
    with ``combine`` (maximum / minimum of the status codes, EMPTY < PARTIAL < FULL)."""

    parts: tuple[Pattern, ...]
    join: ClassVar[Any]
    combine: ClassVar[Any]

    def __post_init__(self):
        name = type(self).__name__
        parts = self.parts
        if isinstance(parts, Pattern) or not isinstance(parts, (tuple, list)):
            raise TypeError(f"{name}.parts must be a tuple of patterns, got {type(parts).__name__}")
        if not parts:
            raise ValueError(f"{name}.parts must hold at least one pattern, got none")
        for k, part in enumerate(parts):
            _check_pattern(part, f"{name}.parts[{k}]")
        object.__setattr__(self, "parts", tuple(parts))

    def contains_dynamic(self) -> bool:
        return any(p.contains_dynamic() for p in self.parts)

    def block_status(self, ctx: Context) -> torch.Tensor:
        return functools.reduce(type(self).combine, [p.status(ctx) for p in self.parts])

    def token_mask(self, ctx, b, h, i, j):
        return functools.reduce(type(self).join, [p.token_mask(ctx, b, h, i, j) for p in self.parts])

    def signature(self, ctx, b, h, qb, kb):
        return torch.cat([_status_signature(ctx, p, b, h, qb, kb) for p in self.parts], dim=1)


@dataclasses.dataclass(frozen=True)
class Union(Combination):
    """Pairs allowed by any part. Dynamic parts spend their budget on what the static parts (the safeguards) do
    not already keep: ``spattn.compile`` selects them first, given that (``patterns.compile.select_dynamic``)."""

    parts: tuple[Pattern, ...]
    kind: ClassVar[str] = "union"
    join: ClassVar[Any] = operator.or_
    combine: ClassVar[Any] = torch.maximum


@dataclasses.dataclass(frozen=True)
class Intersection(Combination):
    """Pairs allowed by every part. Dynamic parts select only where the static parts allow."""

    parts: tuple[Pattern, ...]
    kind: ClassVar[str] = "intersection"
    join: ClassVar[Any] = operator.and_
    combine: ClassVar[Any] = torch.minimum
