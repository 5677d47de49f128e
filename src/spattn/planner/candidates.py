"""The options a head may take: static families at several sizes, dynamic selection, and dense.

Every candidate is a pattern in absolute tokens at the calibration length; the planner scores it per head and
:meth:`spattn.Plan.at_length` rescales the chosen ones for other lengths.
"""

from __future__ import annotations

import dataclasses

from spattn.patterns import Budgeted, Full, Hierarchical, Pattern, RandomBlocks, Sinks, Strided, Window
from spattn.selectors import TopK

FAMILIES = ("window", "sinks_window", "strided", "random", "budgeted", "dynamic", "hierarchical", "dense")
DEFAULT_SELECTORS = ("pooled", "vertical_slash")
SINKS = 4  # attention-sink tokens kept by the families that add reach (StreamingLLM keeps 4)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One option for a head.

    Attributes:
        name: a short unique label (``"sinks_window:128"``), used in the plan's JSON and the heat map.
        family: ``"window"``, ``"sinks_window"``, ``"strided"``, ``"random"``, ``"budgeted"``,
            ``"dynamic:<selector>"``, ``"hierarchical"``, ``"dense"`` or any name you give your own.
        pattern: the spattn pattern (``Full()`` for dense).
    """

    name: str
    family: str
    pattern: Pattern

    @property
    def dynamic(self) -> bool:
        """True when the pattern selects blocks from the input (cost and recall vary per head and input)."""
        return self.pattern.contains_dynamic()

    @property
    def dense(self) -> bool:
        return isinstance(self.pattern, Full)

    @property
    def layer_wide(self) -> bool:
        """True for a pattern that covers a whole layer (``Hierarchical``: one selection per key/value group, run
        by its own attention): every head of a layer takes it, or none does (Note [layer-wide candidates])."""
        return isinstance(self.pattern, Hierarchical)


def _sizes(block_size: int, length: int) -> list[int]:
    out, w = [], max(1, block_size // 2)
    while w <= length // 2:
        out.append(w)
        w *= 2
    return out or [max(1, length // 4)]


def default_candidates(
    length: int,
    block_size: int = 64,
    *,
    families: tuple[str, ...] = FAMILIES,
    selectors: tuple[str, ...] = DEFAULT_SELECTORS,
    seed: int = 0,
) -> list[Candidate]:
    """The default options at ``length`` tokens: windows and sinks + windows from ``block_size / 2`` to
    ``length / 2`` keys (doubling), window + block-strided reach, window + random blocks, ``Budgeted`` key
    budgets, ``Sinks | Window | TopK(selector, blocks)`` for each selector, ``Hierarchical`` in its frozen-model
    form at the ``Budgeted`` key counts (:func:`spattn.hierarchical.fit_budget`; a layer-wide option), and dense.

    Args:
        length: the calibration length (tokens). block_size: the cost model's block size.
        families: which of :data:`FAMILIES` to include. selectors: selectors of the dynamic family.
        seed: seed of the random-block family.

    Example:
        >>> names = [c.name for c in default_candidates(1024, 64)]
        >>> "dense" in names and "sinks_window:128" in names
        True
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 (tokens), got {length!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown candidate families {unknown}; choose from {list(FAMILIES)}")
    sizes = _sizes(block_size, length)
    nk = -(-length // block_size)
    bs = block_size
    out: list[Candidate] = []
    if "window" in families:
        out += [Candidate(f"window:{w}", "window", Window(w)) for w in sizes]
    if "sinks_window" in families:
        out += [Candidate(f"sinks_window:{w}", "sinks_window", Sinks(SINKS) | Window(w)) for w in sizes]
    if "strided" in families:
        for w in (bs, 2 * bs):
            for stride in (8, 4):
                if stride < nk and w < length:
                    out.append(Candidate(f"strided:{w}/{stride}", "strided",
                                         Sinks(SINKS) | Window(w) | Strided(stride, block=bs)))
    if "random" in families:
        for r in (1, 2):
            if r < nk:
                out.append(Candidate(f"random:{bs}+{r}", "random",
                                     Sinks(SINKS) | Window(bs) | RandomBlocks(r, seed=seed, block=bs)))
    if "budgeted" in families:
        out += [Candidate(f"budgeted:{k}", "budgeted", Budgeted(k, sinks=SINKS))
                for k in (bs, 2 * bs, 4 * bs, 8 * bs) if k < length]
    if "dynamic" in families:
        for sel in selectors:
            for blocks in ((1, 2, 4) if sel == selectors[0] else (1, 2)):
                if blocks < nk:
                    out.append(Candidate(f"{sel}:{bs}+{blocks}", f"dynamic:{sel}",
                                         Sinks(SINKS) | Window(bs) | TopK(sel, blocks)))
    if "hierarchical" in families and bs >= 16:
        from spattn.hierarchical import fit_budget

        select_block = 1 << (bs.bit_length() - 1)  # a power of two (its triton blocks), at most block_size
        seen = set()
        for k in (bs, 2 * bs, 4 * bs, 8 * bs):
            config = fit_budget(k, length, block_size=select_block, sinks=SINKS) if k < length else None
            if config is not None and config not in seen:
                seen.add(config)
                out.append(Candidate(f"hierarchical:{k}", "hierarchical", config))
    if "dense" in families:
        out.append(Candidate("dense", "dense", Full()))
    return out


def as_candidates(candidates: list[Candidate | Pattern] | None, length: int, block_size: int) -> list[Candidate]:
    """Normalise a user's list (Candidates or bare patterns) or ``None`` (the defaults); dense is always added,
    so that every budget at least as large as the dense cost has an answer and constraints can keep heads dense."""
    if candidates is None:
        out = default_candidates(length, block_size)
    else:
        if not isinstance(candidates, (list, tuple)) or not candidates:
            raise ValueError("candidates must be a non-empty list of spattn Patterns or planner Candidates")
        out = []
        for n, c in enumerate(candidates):
            if isinstance(c, Candidate):
                out.append(c)
            elif isinstance(c, Pattern):
                out.append(Candidate("dense" if isinstance(c, Full) else f"custom:{n}",
                                     "dense" if isinstance(c, Full) else "custom", c))
            else:
                raise TypeError(f"candidates[{n}] must be a Pattern or a Candidate, got {type(c).__name__}")
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique, repeated: {dup}")
    if not any(c.dense for c in out):
        out.append(Candidate("dense", "dense", Full()))
    return out
