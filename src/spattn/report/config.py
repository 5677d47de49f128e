"""Report configuration: defaults, ``--quick``, validation with errors a person can act on, and the hash that
keys cached stages."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any

FAMILIES = ("window", "sinks_window", "strided", "random", "budgeted", "top_p", "plan", "learned", "hierarchical")
SELECTORS = ("probe", "pooled", "vertical_slash", "antidiagonal", "bounds")  # probe: issue 12 (docs/selection.md)
# Note [default run time]: the default run must finish in under 10 minutes on a 2-core CPU, where a SmolLM2 forward
# costs seconds (1024 tokens) to tens of seconds (4096); each selector adds three candidates (one per budget) and
# each pass key a sequence to every retrieval forward, so the default times three selectors (probe, issue 12's,
# and the two that were best at 1024 tokens in the v1 table) and three pass keys (one per depth); --selectors and
# --retrieval-samples take more.
DEFAULT_SELECTORS = ("probe", "vertical_slash", "antidiagonal")
DEFAULT_RETRIEVAL_SAMPLES = 3
# Note [default lengths and budgets]: the default is 1024 and 4096 tokens; on the 2-core CPU that run
# took 1974 CPU-seconds (19 min 18 s, session 5), about half of it the 4096 stage (every forward there costs
# ~5x a 1024 one, and the dense-backend attention and the coverage pass 16x), so the default checks the picks at
# 2048 instead (--lengths 1024,4096 restores the issue's). And it fits two budgets, 10% and 25%: at 1024 tokens
# 5% is ~51 keys per query, less than one 64-token block beyond the sinks and window, where the learned and
# random families cannot be fitted at all and every pick doubles the perplexity (session 5: 68.8 against 35.8
# dense; the same Budgeted pattern won 5% at every length on the H200); --budgets 0.05,0.1,0.25 restores it.
DEFAULT_LENGTHS = (1024, 2048)
DEFAULT_BUDGETS = (0.1, 0.25)
QUICK_FAMILIES = ("window", "sinks_window", "budgeted", "top_p", "plan", "learned")
QUICK_SELECTORS = ("probe",)
QUICK_BUDGETS = (0.25,)
QUICK_LENGTH = 256
# Note [what --quick omits]: the quick answer is a smoke test (aimed at under a minute on a 2-core CPU): one
# length (256 tokens), one budget (25%: at 256 tokens a 10% budget leaves no 64-key block to select beyond the
# sinks and window), so one candidate per family, two pass keys scored in one batched forward per candidate, and
# no threads view. The time goes into model forwards (about 60% of a quick run's CPU seconds, profiled: the
# linear layers of SmolLM2, not attention), whose cost is linear in the tokens, hence 256 rather than 512. The
# terminal and the HTML say so (``quick_omits``), so that nobody reads it as the full report.
# Note [latency dtype]: a model is served in half precision on a GPU, where an fp32 attention (what the model's
# converted fp32 weights give) runs its products without tensor cores and makes every kernel several times slower
# than in service (session 5's H200 report timed fp32: SDPA 2.97 ms at 8192 tokens). So on CUDA the latency
# column and the kernel references time the captured queries and keys cast to bfloat16 (the dtype SmolLM2 is
# trained and served in); the CPU keeps float32 (its bf16 matmuls are slower, not faster). The quality numbers
# come from the model in its own dtype either way; results.json says which dtype was timed (backends).
LATENCY_DTYPES = ("float32", "bfloat16", "float16")
# Note [retrieval at every length]: the pass keys are scored at the first length for every report; at the further
# lengths (where the picks are re-fitted) only when asked, by default on CUDA: on the 2-core CPU the default run's
# retrieval at 1024 tokens already costs 90 of its 564 s, and at 2048 tokens each forward costs about twice that,
# which the 10-minute default cannot hold (Note [default run time]). `--retrieval-at-every-length` turns it on.
_CACHE_VERSION = 5


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
    (0: no retrieval evidence). ``threads``: build the "threads the pick cuts" view. ``gates``: a gate checkpoint
    (``spattn.learned.save_gates``, safetensors) for this model; the ``"learned"`` family is measured only when one
    is given (otherwise the report says that no saved gate was given). The ``"plan"`` family is the planner's
    per-layer and per-head plan (:func:`spattn.planner.make_plan`), one per budget, calibrated on the calibration
    chunks. ``kernel_references`` (default None: on for CUDA, off on the CPU): time spattn's kernel against
    FlexAttention and SDPA for dense causal and each pick at every length (``results.json``'s
    ``kernel_references``). ``latency_dtype`` (default None: ``"bfloat16"`` on CUDA, ``"float32"`` on the CPU; Note
    [latency dtype]): the dtype of the attention inputs the latency column and the kernel references time; the
    model's forwards (every quality number) keep the model's own dtype. ``retrieval_at_every_length`` (default
    None: on for CUDA, off on the CPU; Note [retrieval at every length]): also score the pass keys at each further
    length, for dense and each pick and runner-up fitted there.
    """

    model: str = "smollm2"
    text: str = "austen"
    chunk_length: int = DEFAULT_LENGTHS[0]
    lengths: tuple[int, ...] = DEFAULT_LENGTHS[1:]
    calibration_chunks: int = 1
    selection_chunks: int = 1
    eval_chunks: int = 1
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    block_size: int = 64
    families: tuple[str, ...] = FAMILIES
    selectors: tuple[str, ...] = DEFAULT_SELECTORS
    device: str = "cpu"
    seed: int = 0
    latency_repeats: int = 3
    retrieval_samples: int = DEFAULT_RETRIEVAL_SAMPLES
    threads: bool = True
    gates: str | None = None
    kernel_references: bool | None = None
    latency_dtype: str | None = None
    retrieval_at_every_length: bool | None = None
    quick: bool = False

    @classmethod
    def quick_defaults(cls, **overrides: Any) -> ReportConfig:
        """The ``--quick`` configuration (Note [what --quick omits]): 256-token chunks, one budget (0.25), one
        candidate per family (fewer families, one selector), 2 pass keys, no threads view."""
        base = dict(chunk_length=QUICK_LENGTH, lengths=(), calibration_chunks=1, selection_chunks=1, eval_chunks=1,
                    retrieval_samples=2, budgets=QUICK_BUDGETS, threads=False,
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
        if self.gates is not None and not isinstance(self.gates, str):
            raise TypeError(f"gates must be a path (str) to a gate checkpoint, got {type(self.gates).__name__}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (N a GPU index), got {self.device!r}")
        if self.latency_dtype is None:
            object.__setattr__(self, "latency_dtype", "bfloat16" if str(self.device).startswith("cuda") else "float32")
        elif self.latency_dtype not in LATENCY_DTYPES:
            raise ValueError(f"latency_dtype must be one of {list(LATENCY_DTYPES)}, got {self.latency_dtype!r}")
        for name in ("kernel_references", "retrieval_at_every_length"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, str(self.device).startswith("cuda"))
            elif not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")

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
        data.pop("kernel_references")
        data.pop("retrieval_at_every_length")  # which retrieval stages run, not their numbers (cached per length)
        data["cache_version"] = _CACHE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def quick_omits(cfg: ReportConfig) -> list[str]:
    """What a ``--quick`` report leaves out of the full one, in words (Note [what --quick omits])."""
    out = []
    if not cfg.lengths:
        out.append(f"the longer lengths (only {cfg.chunk_length} tokens)")
    if len(cfg.budgets) < len(DEFAULT_BUDGETS):
        out.append("the other budgets (only " + ", ".join(f"{100 * b:g}%" for b in cfg.budgets)
                   + " of the dense keys)")
    missing = [f for f in FAMILIES if f not in cfg.families]
    if missing:
        out.append("the families " + ", ".join(missing))
    if len(cfg.selectors) < len(DEFAULT_SELECTORS):
        out.append(f"{len(DEFAULT_SELECTORS) - len(cfg.selectors)} of the {len(DEFAULT_SELECTORS)} dynamic selectors "
                   "of the default run")
    if cfg.retrieval_samples < DEFAULT_RETRIEVAL_SAMPLES:
        out.append(f"some of the retrieval evidence ({cfg.retrieval_samples} pass keys instead of "
                   f"{DEFAULT_RETRIEVAL_SAMPLES})")
    if not cfg.threads:
        out.append("the threads view")
    return out
