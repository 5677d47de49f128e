"""``Essential``: chosen key tokens stay visible to every later query (a deterministic safeguard).

Beyond sinks and windows, some tokens must never be dropped by a budget or a learned selector: the question,
a rare word, a name. ``Essential`` keeps key ``j`` for query ``i`` when ``j`` is marked and ``j <= i``
(absolute positions). Tokens are marked by position (``positions=(0, 17)``) or per sequence by a bool
``flags [B, kv_len]`` (``[kv_len]`` is one sequence), usually built from the token ids by
:func:`essential_flags` (a rule: ``"ids"``, ``"rare"``, ``"capitalised"``).

In a union with a dynamic part (``Essential(...) | TopK(...)``) it is a static part, compiled first: the
selector spends its budget on what it does not already keep, and can never drop it.

    >>> flags = essential_flags(ids, "ids", token_ids={tok.eos_token_id})          # doctest: +SKIP
    >>> pattern = Sinks(4) | Window(256) | Essential(flags=flags) | TopK("pooled", 4)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from spattn.patterns.base import EMPTY, FULL, PARTIAL, Context, Pattern
from spattn.patterns.serialize import register_pattern

RULES = ("ids", "rare", "capitalised")


@register_pattern
@dataclasses.dataclass(frozen=True, eq=False)
class Essential(Pattern):
    """Marked key tokens are visible to every query at or after them (``flag[b, j] and j <= i``).

    Args:
        positions: absolute key positions marked in every sequence (ints >= 0; positions past ``kv_len``
            are ignored). Default ``()``.
        flags: optional bool ``[B, kv_len]`` (or ``[kv_len]``) marking tokens per sequence, e.g. from
            :func:`essential_flags`. Combined with ``positions`` by "or". Default ``None``.

    Example:
        >>> layout = spattn.compile(Window(64) | Essential(positions=(5, 300)), 1024, causal=True)
    """

    positions: tuple[int, ...] = ()
    flags: torch.Tensor | None = None
    kind: ClassVar[str] = "essential"

    def __post_init__(self):
        positions = self.positions
        if isinstance(positions, torch.Tensor):
            positions = positions.flatten().tolist()
        if isinstance(positions, (str, bytes)) or not isinstance(positions, Iterable):
            raise TypeError(f"Essential.positions must be a sequence of ints, got {type(positions).__name__}")
        out = []
        for p in positions:
            if isinstance(p, bool) or not isinstance(p, int) or p < 0:
                raise ValueError(f"Essential.positions must hold token positions (ints >= 0), got {p!r}")
            out.append(p)
        object.__setattr__(self, "positions", tuple(sorted(set(out))))
        flags = self.flags
        if flags is not None:
            if not isinstance(flags, torch.Tensor):
                flags = torch.as_tensor(flags)
            if flags.dim() == 1:
                flags = flags[None]
            if flags.dim() != 2:
                raise ValueError(f"Essential.flags must be bool [B, kv_len] or [kv_len], got {tuple(flags.shape)}")
            if flags.dtype != torch.bool:
                if flags.dtype.is_floating_point or flags.dtype.is_complex:
                    raise TypeError(f"Essential.flags must be bool (or 0/1 integers), got {flags.dtype}")
                flags = flags != 0
            object.__setattr__(self, "flags", flags)

    # -- marked tokens ---------------------------------------------------------------------------
    def marked(self, ctx: Context) -> torch.Tensor:
        """bool ``[Bf, kv_len]`` (``Bf`` 1 or B): the marked key tokens for this compile."""
        key = ("essential-marked", id(self))
        if key in ctx.cache:
            return ctx.cache[key]
        if self.flags is not None:
            if self.flags.shape[1] != ctx.kv_len:
                raise ValueError(f"Essential.flags has length {self.flags.shape[1]} but kv_len is {ctx.kv_len}")
            if ctx.batch is not None and self.flags.shape[0] not in (1, ctx.batch):
                raise ValueError(f"Essential.flags has batch {self.flags.shape[0]} but the batch size is {ctx.batch}")
            out = self.flags.to(ctx.device).clone()
        else:
            out = torch.zeros(1, ctx.kv_len, dtype=torch.bool, device=ctx.device)
        toks = [p for p in self.positions if p < ctx.kv_len]
        if toks:
            out[:, torch.tensor(toks, device=ctx.device)] = True
        ctx.cache[key] = out
        return out

    # -- compile interface ---------------------------------------------------------------------
    def block_status(self, ctx):
        marked = self.marked(ctx)  # [Bf, Lk]
        bs, NK = ctx.block_size, ctx.num_kv_blocks
        pad = NK * bs - ctx.kv_len
        m = torch.nn.functional.pad(marked, (0, pad)).view(-1, NK, bs)
        pos = torch.arange(NK * bs, device=ctx.device).view(NK, bs)
        big = torch.iinfo(torch.int32).max
        first = torch.where(m, pos, big).amin(-1)  # [Bf, NK] first marked key of each key block
        inb = pos < ctx.kv_len
        all_marked = (m | ~inb).all(-1)  # every in-bounds key of the block is marked
        qlo, qhi = ctx.q_range()  # [NQ, 1]
        _, khi = ctx.k_range()  # [1, NK]
        empty = first[:, None, :] > qhi[None]  # no marked key at or before the block's last query
        full = all_marked[:, None, :] & (qlo[None] >= khi)
        st = torch.full(empty.shape, PARTIAL, dtype=torch.int8, device=ctx.device)
        st = torch.where(full, torch.tensor(FULL, dtype=torch.int8, device=ctx.device), st)
        st = torch.where(empty, torch.tensor(EMPTY, dtype=torch.int8, device=ctx.device), st)
        return st[:, None]  # [Bf, 1, NQ, NK]

    def token_mask(self, ctx, b, h, i, j):
        marked = self.marked(ctx)
        bb = b if marked.shape[0] > 1 else 0
        jj = torch.clamp(j, 0, ctx.kv_len - 1)
        return marked[bb, jj] & (j <= i) & (j >= 0)

    def signature(self, ctx, b, h, qb, kb):
        # the mask depends on the sequence, the key block and the query/key offset (clamped: once every query
        # of the block is at or after every key, the offset no longer matters)
        bs = ctx.block_size
        delta = torch.clamp(qb * bs + ctx.offset - kb * bs, -bs, bs)
        bb = b if self.marked(ctx).shape[0] > 1 else torch.zeros_like(b)
        return torch.stack([bb, kb, delta], dim=1)


# ---------------------------------------------------------------------------------------- rules over token ids
def _as_ids(ids: Any) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be integer token ids [B, L] or [L], got {ids.dtype} {tuple(ids.shape)}")
    return ids.long()


def essential_flags(
    ids: torch.Tensor | Sequence[int],
    rule: str | Callable[[torch.Tensor], torch.Tensor],
    *,
    token_ids: Iterable[int] | None = None,
    counts: torch.Tensor | None = None,
    max_count: int = 1,
    tokenizer: Any = None,
) -> torch.Tensor:
    """bool ``[B, L]`` marking essential tokens of ``ids`` (int ``[B, L]`` or ``[L]``) by a rule.

    Rules:
        ``"ids"``: tokens whose id is in ``token_ids`` (special tokens, a question marker...).
        ``"rare"``: tokens whose corpus frequency ``counts[id]`` (int ``[V]``, e.g. ``torch.bincount`` of a
            corpus) is at most ``max_count`` (default 1); with ``counts=None`` the frequency is counted in
            ``ids`` itself (per sequence).
        ``"capitalised"``: tokens a ``tokenizer`` decodes to a word starting with an upper-case letter and not
            starting a sentence (a cheap named-entity rule; the previous token must not end in ``.!?`` or a
            newline).
        a callable: ``rule(ids) -> bool [B, L]`` (user-supplied).

    Example:
        >>> essential_flags(torch.tensor([5, 9, 5, 7]), "rare")
        tensor([[False,  True, False,  True]])
    """
    ids = _as_ids(ids)
    if callable(rule):
        out = torch.as_tensor(rule(ids))
        if out.shape != ids.shape or out.dtype != torch.bool:
            raise ValueError(f"a rule callable must return bool {tuple(ids.shape)}, got {out.dtype} {tuple(out.shape)}")
        return out
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES} or a callable, got {rule!r}")
    if rule == "ids":
        if token_ids is None:
            raise ValueError("rule='ids' needs token_ids= (the ids to mark)")
        wanted = torch.tensor(sorted(set(int(t) for t in token_ids)), dtype=torch.long)
        return torch.isin(ids, wanted)
    if rule == "rare":
        if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
            raise ValueError(f"max_count must be an int >= 1, got {max_count!r}")
        if counts is None:
            rows = []
            for row in ids:
                _, inverse, c = torch.unique(row, return_inverse=True, return_counts=True)
                rows.append(c[inverse] <= max_count)
            return torch.stack(rows)
        counts = torch.as_tensor(counts).long()
        if counts.dim() != 1 or int(ids.max()) >= counts.numel() or int(ids.min()) < 0:
            raise ValueError(f"counts must be int [V] covering every id (max id {int(ids.max())}), "
                             f"got {tuple(counts.shape)}")
        return counts[ids] <= max_count
    if tokenizer is None:
        raise ValueError("rule='capitalised' needs tokenizer= (to decode the ids)")
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for b, row in enumerate(ids.tolist()):
        pieces = [tokenizer.decode([t]) for t in row]
        for t, piece in enumerate(pieces):
            word = piece.lstrip()
            starts_word = t == 0 or piece[:1].isspace() or not pieces[t - 1][-1:].isalnum()
            if not (word[:1].isupper() and starts_word):
                continue
            prev = pieces[t - 1].rstrip(" ") if t else ""
            sentence_start = t == 0 or prev == "" or prev[-1] in ".!?\n\"'"
            out[b, t] = not sentence_start
    return out


__all__ = ["Essential", "essential_flags", "RULES"]
