"""The candidate table: every candidate's score and cost, per layer and head, measured on calibration chunks.

Layers outer, candidates batched: for each chunk and layer the dense attention is computed once and every
candidate is scored against it (:func:`spattn.planner.score.score_layouts`). Static candidates compile once per
length; dynamic ones are built per layer and chunk (``LayoutBuilder`` where it applies), so their cost and
recall are per head and averaged over the chunks.

Note [hierarchical candidates]: a ``Hierarchical`` candidate (its frozen-model form, where the compressed
tokens choose the blocks and the fine keys share one softmax) is scored on the Layout of the keys it reads at
full resolution on this input (:func:`spattn.hierarchical.measure.fine_layout_and_chosen`: the chosen blocks,
the safeguard and the window, compiled at the table's block size), and costed by
:func:`spattn.hierarchical.cost_at` (exact keys per query with the compressed tokens, and the branches' tile
fraction; input-free). It covers a whole layer (one selection per key/value group), so the planner links it
across the layer's heads (Note [layer-wide candidates] in ``api.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spattn._optional import require
from spattn.integrations.plan import scale_pattern
from spattn.patterns import Full, Hierarchical, Layout, Pattern
from spattn.patterns import compile as compile_pattern
from spattn.planner.calibrate import capture_batches
from spattn.planner.candidates import Candidate
from spattn.planner.score import score_layouts
from spattn.selectors import LayoutBuilder

np = require("numpy", extra="planner")

_MIN_RECALL = 1e-6  # log recall is clamped here: a head that keeps nothing of a row scores log(1e-6)


@dataclasses.dataclass
class CandidateTable:
    """Scores and costs of C candidates in every (layer, head): arrays ``[layers, heads, C]`` (numpy float64).

    Attributes:
        candidates: the C candidates (column order).
        length: the calibration length of the costs; lengths: every length scored (scores are their mean).
        block_size, causal, head_dim, kv_heads: the geometry the costs were measured in.
        recall: mean dense attention mass kept per query. log_recall: mean of log(recall) (= minus the mean
            KL(sparse || dense) of the attention rows).
        output_error: relative output error per head (``None`` unless values were captured).
        keys: mean keys per query. block_fraction: visited tiles / the tiles dense attention visits.
        latency_ms: per-head share of the measured layer latency (``None`` unless ``cost="latency"``).
        samples: calibration chunks per length. seconds: time spent building the table.
    """

    candidates: list[Candidate]
    length: int
    lengths: list[int]
    block_size: int
    causal: bool
    head_dim: int
    kv_heads: int
    recall: np.ndarray
    log_recall: np.ndarray
    output_error: np.ndarray | None
    keys: np.ndarray
    block_fraction: np.ndarray
    latency_ms: np.ndarray | None = None
    samples: int = 0
    seconds: float = 0.0

    @property
    def layers(self) -> int:
        return self.recall.shape[0]

    @property
    def heads(self) -> int:
        return self.recall.shape[1]

    _ARRAYS = ("recall", "log_recall", "output_error", "keys", "block_fraction", "latency_ms")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the table to one ``.npz`` file (arrays, and the candidates' patterns as JSON; no pickles)."""
        head = {"format": "spattn.candidate_table/1", "length": self.length, "lengths": self.lengths,
                "block_size": self.block_size, "causal": self.causal, "head_dim": self.head_dim,
                "kv_heads": self.kv_heads, "samples": self.samples, "seconds": self.seconds,
                "candidates": [{"name": c.name, "family": c.family, "pattern": c.pattern.to_dict()}
                               for c in self.candidates]}
        arrays = {n: getattr(self, n) for n in self._ARRAYS if getattr(self, n) is not None}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            np.savez(f, header=np.array(json.dumps(head)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CandidateTable:
        """Read a table written by :meth:`save`."""
        from spattn.patterns import pattern_from_dict

        with np.load(Path(path), allow_pickle=False) as data:
            head = json.loads(str(data["header"]))
            if head.get("format") != "spattn.candidate_table/1":
                raise ValueError(f"{path} is not a spattn candidate table (format spattn.candidate_table/1)")
            arrays = {n: (data[n] if n in data.files else None) for n in cls._ARRAYS}
        cands = [Candidate(c["name"], c["family"], pattern_from_dict(c["pattern"])) for c in head.pop("candidates")]
        head.pop("format")
        return cls(candidates=cands, **head, **arrays)

    def index(self, name: str) -> int:
        """Column of the candidate called ``name``."""
        for n, c in enumerate(self.candidates):
            if c.name == name:
                return n
        raise KeyError(f"no candidate named {name!r}; have {[c.name for c in self.candidates]}")


def _visited(layout: Layout) -> torch.Tensor:
    """float64 ``[Bl, Hl]``: visited tiles (full + partial)."""
    return (layout.kv_num_blocks + layout.full_kv_num_blocks).double().sum(-1)


class _Builder:
    """Layouts of one candidate at one length: compiled once (static) or per input (dynamic; one
    ``LayoutBuilder`` per batch size; ``Hierarchical``: its frozen form's fine layout per input)."""

    def __init__(self, pattern: Pattern, length: int, block_size: int, causal: bool, heads: int,
                 device: torch.device) -> None:
        self.pattern = pattern
        self.static: Layout | None = None
        self.builders: dict[int, LayoutBuilder | None] = {}
        self.args = dict(causal=causal, block_size=block_size, heads=heads, device=device)
        self.length = length
        self._static_counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._fixed_counts: tuple[float, float] | None = None
        if isinstance(pattern, Hierarchical):  # Note [hierarchical candidates]
            if not causal:
                raise ValueError("a Hierarchical candidate needs causal self-attention (its compressed branch is "
                                 "causal)")
            from spattn.hierarchical import cost_at

            cost = cost_at(pattern, length, block_size=block_size)
            self._fixed_counts = (float(cost["keys_per_query"]["total"]), float(cost["block_fraction"]))
        elif not pattern.contains_dynamic():
            self.static = compile_pattern(pattern, length, length, causal=causal, block_size=block_size,
                                          device=device)

    def layout(self, query: torch.Tensor, key: torch.Tensor, shared: dict | None = None) -> Layout:
        """The layout on this input; ``shared`` (one dict per input) lets candidates of one selector share
        its block scores."""
        if self.static is not None:
            return self.static
        if self._fixed_counts is not None:
            from spattn.hierarchical.measure import fine_layout_and_chosen

            return fine_layout_and_chosen(query, key, self.pattern, block_size=self.args["block_size"])[0]
        batch = int(query.shape[0])
        if batch not in self.builders:
            try:
                self.builders[batch] = LayoutBuilder(self.pattern, self.length, self.length, batch=batch,
                                                     **self.args)
            except (ValueError, NotImplementedError, TypeError):
                self.builders[batch] = None  # not a `static | one TopK/TopP` union: compile per input
        builder = self.builders[batch]
        if builder is not None:
            return builder.build(query, key, shared=shared)
        return compile_pattern(self.pattern, self.length, self.length, query=query, key=key, batch=batch,
                               **self.args)

    def counts(self, layout: Layout, dense: float) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 ``[Bl, Hl]``: keys per query and visited-tile fraction of ``layout`` (computed once when static)."""
        if self._fixed_counts is not None:  # the compressed tokens count too: exact, input-free (cost_at)
            keys, fraction = self._fixed_counts
            return (torch.full((1, 1), keys, dtype=torch.float64), torch.full((1, 1), fraction, dtype=torch.float64))
        if layout is self.static and self._static_counts is not None:
            return self._static_counts
        out = (layout.allowed_pairs() / self.length, _visited(layout) / dense)
        if layout is self.static:
            self._static_counts = out
        return out


def dense_tiles(length: int, block_size: int, causal: bool) -> float:
    """Tiles dense attention visits per head at ``length`` (all of them, or the causal triangle)."""
    return float(_visited(compile_pattern(Full(), length, length, causal=causal, block_size=block_size))[0, 0])


@dataclasses.dataclass
class Sample:
    """Calibration chunks' attention inputs, per layer: queries ``[S, H, L, D]``, keys ``[S, Hkv, L, D]``
    and (for the output error) values ``[S, Hkv, L, Dv]`` of ``S`` chunks (one batched forward; ``S = 1`` for
    one chunk); ``causal`` and the softmax ``scale`` of the model."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    values: dict[int, torch.Tensor] | None = None
    causal: bool = True
    scale: float | None = None

    @property
    def layers(self) -> list[int]:
        return sorted(self.queries)

    @property
    def length(self) -> int:
        return int(self.queries[self.layers[0]].shape[2])

    @property
    def chunks(self) -> int:
        """How many chunks the sample holds (the batch size S)."""
        return int(self.queries[self.layers[0]].shape[0])


def build_table(
    model: torch.nn.Module,
    chunks_by_length: dict[int, torch.Tensor],
    candidates: list[Candidate],
    *,
    block_size: int = 64,
    values: bool = False,
    rule_kind: str = "fraction",
    device: torch.device | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CandidateTable:
    """Score and cost every candidate in every layer and head of ``model``.

    Args:
        model: a transformers model (see :func:`spattn.capture`).
        chunks_by_length: ``{length: int [S, length] token chunks}``; the first length is the calibration
            length (costs are measured there); at the others each candidate is scored as
            ``scale_pattern(pattern, length / first, rule_kind)``, i.e. as the plan would run there.
        candidates: the options (see :mod:`spattn.planner.candidates`).
        block_size: block size of the layouts and the cost model.
        values: also capture values and score the output error.
        device: where the scoring runs (default: the model's device).
        progress: called as ``progress(description, done, total)`` after each layer.
    """
    if not chunks_by_length:
        raise ValueError("chunks_by_length must name at least one length")

    def samples(chunks: torch.Tensor):
        for cap, vals in capture_batches(model, chunks, values=values):  # as few forwards as memory allows
            yield Sample(cap.queries, cap.keys, vals if values else None, cap.causal, cap.scale)

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return table_from_samples({L: (samples(ch), int(ch.shape[0])) for L, ch in chunks_by_length.items()},
                              candidates, block_size=block_size, rule_kind=rule_kind, device=dev, progress=progress)


def table_from_samples(
    samples_by_length: dict[int, Any],
    candidates: list[Candidate],
    *,
    block_size: int = 64,
    rule_kind: str = "fraction",
    device: torch.device | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CandidateTable:
    """Score and cost every candidate on captured attention inputs (no model needed: tests plant their own).

    Args:
        samples_by_length: ``{length: [Sample, ...]}`` (or ``(iterable, chunks)`` pairs, consumed once; a
            Sample may hold several chunks); the first length is the calibration length of the costs.
        candidates, block_size, rule_kind, device, progress: as in :func:`build_table`.
    """
    started = time.perf_counter()
    if not samples_by_length:
        raise ValueError("samples_by_length must name at least one length")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    lengths = list(samples_by_length)
    L0 = lengths[0]
    C = len(candidates)
    sums: dict[str, np.ndarray] = {}
    keys = blocks = None
    meta: dict[str, Any] = {}
    sources = {}
    for length, item in samples_by_length.items():
        it, count = item if isinstance(item, tuple) else (item, len(item))
        if count < 1:
            raise ValueError(f"no calibration samples at length {length}")
        sources[length] = (it, count)
    total_chunks = sum(count for _, count in sources.values())  # for the progress bar; the averages count
    seen: dict[int, int] = {}  # chunks actually scored per length
    has_values = None
    for length in lengths:
        it, count = sources[length]
        ratio = length / L0
        builders: list[_Builder] | None = None
        seen[length] = 0
        for sample in it:
            if sample.length != length:
                raise ValueError(f"a sample given for length {length} has {sample.length} tokens")
            if has_values is None:
                has_values = sample.values is not None
            S = sample.chunks
            if builders is None:
                first = sample.queries[sample.layers[0]]
                H, D = first.shape[1], first.shape[3]
                meta.update(causal=sample.causal, heads=H, head_dim=D,
                            kv_heads=sample.keys[sample.layers[0]].shape[1], layers=len(sample.layers))
                builders = [_Builder(scale_pattern(c.pattern, ratio, rule_kind), length, block_size, sample.causal,
                                     H, dev) for c in candidates]
                shape = (len(sample.layers), H, C)
                for name in ("recall", "log_recall", "output_error"):
                    sums.setdefault(name, np.zeros(shape))
                if length == L0:
                    keys, blocks = np.zeros(shape), np.zeros(shape)
                    dense = dense_tiles(length, block_size, sample.causal)
            for li, layer in enumerate(sample.layers):
                q = sample.queries[layer].to(dev)
                k = sample.keys[layer].to(dev)
                v = sample.values[layer].to(dev) if has_values else None
                shared: dict = {}  # the selectors' block scores of this layer's input, computed once each
                layouts = [b.layout(q, k, shared) for b in builders]
                # every chunk of the sample at once: the layouts' tables are shared, the dense pass is batched
                scores = score_layouts(q, k, layouts, value=v, causal=sample.causal, scale=sample.scale)
                r = scores.recall.double()  # [C, S, H, L]
                sums["recall"][li] += r.mean(-1).sum(1).T.cpu().numpy()
                sums["log_recall"][li] += r.clamp_min(_MIN_RECALL).log().mean(-1).sum(1).T.cpu().numpy()
                if scores.output_error is not None:
                    sums["output_error"][li] += scores.output_error.double().sum(1).T.cpu().numpy()
                if length == L0:
                    for c, (b, lay) in enumerate(zip(builders, layouts)):
                        kq, frac = b.counts(lay, dense)  # [1 or S, 1 or H]
                        keys[li, :, c] += kq.expand(S, meta["heads"]).sum(0).cpu().numpy()
                        blocks[li, :, c] += frac.expand(S, meta["heads"]).sum(0).cpu().numpy()
                if progress is not None:
                    done = sum(seen.values())
                    progress(f"calibration: {length} tokens, chunks {seen[length] + 1}-{seen[length] + S}/{count}",
                             done * meta["layers"] + (li + 1) * S, total_chunks * meta["layers"])
            seen[length] += S
        if not seen[length]:
            raise ValueError(f"no calibration samples at length {length}")
        if length == L0:
            keys /= seen[length]
            blocks /= seen[length]
    avg = {name: arr / sum(seen.values()) for name, arr in sums.items()}
    return CandidateTable(
        candidates=list(candidates), length=L0, lengths=lengths, block_size=block_size, causal=meta["causal"],
        head_dim=meta["head_dim"], kv_heads=meta["kv_heads"], recall=avg["recall"], log_recall=avg["log_recall"],
        output_error=avg["output_error"] if has_values else None, keys=keys, block_fraction=blocks,
        samples=seen[L0], seconds=time.perf_counter() - started,
    )


def fraction_of_dense_keys(length: int, causal: bool) -> float:
    """Mean keys per query of dense attention at ``length`` (``(L + 1) / 2`` causal, ``L`` otherwise)."""
    return (length + 1) / 2 if causal else float(length)


__all__ = ["CandidateTable", "build_table", "dense_tiles", "fraction_of_dense_keys"]
