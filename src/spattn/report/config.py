"""Report configuration: defaults, ``--quick``, validation with errors a person can act on, and the hash that
keys cached stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

FAMILIES = ("window", "sinks_window", "strided", "random", "budgeted", "top_p")
SELECTORS = ("probe", "pooled", "vertical_slash", "antidiagonal", "bounds")  # probe: issue 12 (docs/selection.md)
QUICK_FAMILIES = ("window", "sinks_window", "random", "budgeted", "top_p")
QUICK_SELECTORS = ("probe",)
_CACHE_VERSION = 3


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Everything that determines the numbers of a report (timings aside).

    ``model`` is ``"smollm2"`` (SmolLM2-135M-Instruct, offline) or a directory holding a Hugging Face causal
    LM (``config.json`` + weights + tokenizer). ``text`` is a corpus name (``"austen"``, ``"kjv"``) or a text
    file. Budgets are fractions of the dense (causal) keys, in (0, 1], a rule that holds at every length: each
    family is fitted to the budget at each length.

    Candidates are fitted on ``calibration_chunks``, the pick per budget is made on ``selection_chunks`` held-out
    chunks, and every reported quality number comes from ``eval_chunks`` further held-out chunks, at
    ``chunk_length`` tokens. ``lengths`` are further (longer) lengths at which the picks and their runners-up are
    fitted and measured again, to show whether the recommendation holds there. ``retrieval_samples`` pass keys
    (spread over depths 0.1 / 0.5 / 0.9 of the text) test each pick and runner-up, and dense, at ``chunk_length``
    (0: no retrieval evidence).
    """

    model: str = "smollm2"
    text: str = "austen"
    chunk_length: int = 1024
    lengths: tuple[int, ...] = (4096,)
    calibration_chunks: int = 1
    selection_chunks: int = 1
    eval_chunks: int = 1
    budgets: tuple[float, ...] = (0.05, 0.1, 0.25)
    block_size: int = 64
    families: tuple[str, ...] = FAMILIES
    selectors: tuple[str, ...] = SELECTORS
    device: str = "cpu"
    seed: int = 0
    latency_repeats: int = 3
    retrieval_samples: int = 6
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> ReportConfig:
        """The ``--quick`` configuration: shorter chunks, one calibration and one held-out chunk, fewer
        candidate families and one selector."""
        base = dict(chunk_length=512, lengths=(), calibration_chunks=1, selection_chunks=1, eval_chunks=1,
                    retrieval_samples=3,
                    families=QUICK_FAMILIES,
                    selectors=QUICK_SELECTORS, latency_repeats=2, quick=True)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        budgets = tuple(float(b) for b in self.budgets)
        if not budgets:
            raise ValueError("budgets must name at least one fraction in (0, 1], e.g. --budgets 0.05,0.1,0.25")
        for b in budgets:
            if not 0.0 < b <= 1.0:
                raise ValueError(f"budget {b:g} is outside (0, 1]: budgets are fractions of the dense keys, "
                                 "e.g. 0.1 for 10%")
        object.__setattr__(self, "budgets", tuple(sorted(set(budgets))))
        for name, minimum in (("chunk_length", 16), ("calibration_chunks", 1), ("selection_chunks", 1),
                              ("eval_chunks", 1), ("block_size", 1), ("latency_repeats", 1),
                              ("retrieval_samples", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        lengths = tuple(self.lengths)
        for n in lengths:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"lengths must be ints, got {n!r}")
            if n <= self.chunk_length:
                raise ValueError(f"every extra length must exceed chunk_length ({self.chunk_length}), got {n}; "
                                 "the first of --lengths is where candidates are fitted and picked")
        object.__setattr__(self, "lengths", tuple(sorted(set(lengths))))
        if self.block_size > self.chunk_length:
            raise ValueError(f"block_size ({self.block_size}) must not exceed chunk_length ({self.chunk_length})")
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"unknown candidate families {unknown}; choose from {list(FAMILIES)}")
        object.__setattr__(self, "families", tuple(dict.fromkeys(self.families)))
        object.__setattr__(self, "selectors", tuple(dict.fromkeys(self.selectors)))
        bad = [s for s in self.selectors if s not in SELECTORS]
        if bad or ("top_p" in self.families and not self.selectors):
            raise ValueError(f"unknown selectors {bad}; choose from {list(SELECTORS)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["budgets"] = list(self.budgets)
        out["lengths"] = list(self.lengths)
        out["families"] = list(self.families)
        out["selectors"] = list(self.selectors)
        return out

    def digest(self) -> str:
        """Hash of everything that changes the numbers (device included: dynamic selection may differ)."""
        data = self.to_dict()
        data.pop("latency_repeats")  # timings only
        data["cache_version"] = _CACHE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
