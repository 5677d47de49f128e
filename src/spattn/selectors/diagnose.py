"""``diagnose``: why a dynamic pattern loses (or wins) against a fixed one, per head.

For each head, from the exact dense attention (query chunks; never an L x L tensor in memory):

* the true recall (kept share of the softmax mass, mean over queries) and the keys per query of a
  ``baseline`` (e.g. ``Sinks(64) | Window(448)``) and of a ``pattern`` (e.g. ``Sinks(64) | Window(64) |
  Adaptive("probe", 384)``), so an equal budget can be checked;
* where the mass the pattern *misses* sits: on the first ``sinks`` keys, on the ``local`` keys just before
  each query (distance ``i - j < local``), or far (everything else); the three add up to ``1 - recall``;
* the same split for the baseline.

    >>> import torch, spattn
    >>> from spattn.selectors import Adaptive, diagnose
    >>> q, k = torch.randn(1, 2, 512, 32), torch.randn(1, 2, 512, 32)
    >>> d = diagnose(q, k, spattn.Sinks(16) | spattn.Window(32) | Adaptive("probe", 64, block=32),
    ...              spattn.Sinks(16) | spattn.Window(96), block_size=64)
    >>> d.recall.shape
    torch.Size([1, 2])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from spattn.layout import Layout
from spattn.layout import tables as _tables
from spattn.patterns import Pattern
from spattn.patterns import compile as compile_pattern
from spattn.selectors.common import check_qk, default_scale, group_matmul

REGIONS = ("sinks", "local", "far")


@dataclasses.dataclass
class Diagnosis:
    """Per batch and head (float64 ``[B, H]``) for the pattern, and the same for the baseline (``baseline_*``).

    Attributes:
        recall, baseline_recall: mean over queries of the kept share of the dense softmax mass.
        keys, baseline_keys: kept keys per query (token-exact, causal).
        missed, baseline_missed: ``{"sinks" | "local" | "far": [B, H]}`` mean over queries of the mass missed
            in each region (they sum to ``1 - recall``).
        sinks, local: the region bounds used (keys ``j < sinks``; distance ``i - j < local``).
    """

    recall: torch.Tensor
    keys: torch.Tensor
    missed: dict[str, torch.Tensor]
    baseline_recall: torch.Tensor
    baseline_keys: torch.Tensor
    baseline_missed: dict[str, torch.Tensor]
    sinks: int
    local: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready per-head lists (batch averaged) and their means."""
        def row(t: torch.Tensor) -> list[float]:
            return [round(float(v), 6) for v in t.mean(0)]

        out: dict[str, Any] = {"sinks": self.sinks, "local": self.local}
        for prefix, recall, keys, missed in (("", self.recall, self.keys, self.missed),
                                             ("baseline_", self.baseline_recall, self.baseline_keys,
                                              self.baseline_missed)):
            out[prefix + "recall"] = row(recall)
            out[prefix + "keys"] = row(keys)
            out[prefix + "missed"] = {r: row(missed[r]) for r in REGIONS}
            out[prefix + "mean"] = {"recall": float(recall.mean()), "keys": float(keys.mean()),
                                    **{f"missed_{r}": float(missed[r].mean()) for r in REGIONS}}
        return out

    def table(self) -> str:
        """One line per head: recall and keys of both, and where each misses its mass."""
        lines = [f"head  baseline recall (keys)  pattern recall (keys)   missed by pattern: sinks / "
                 f"local(<{self.local}) / far   missed by baseline: sinks / local / far"]
        B, H = self.recall.shape
        for h in range(H):
            m = [float(self.missed[r][:, h].mean()) for r in REGIONS]
            n = [float(self.baseline_missed[r][:, h].mean()) for r in REGIONS]
            lines.append(
                f"{h:4d}  {float(self.baseline_recall[:, h].mean()):.4f} "
                f"({float(self.baseline_keys[:, h].mean()):7.1f})"
                f"      {float(self.recall[:, h].mean()):.4f} ({float(self.keys[:, h].mean()):7.1f})"
                f"      {m[0]:.4f} / {m[1]:.4f} / {m[2]:.4f}            {n[0]:.4f} / {n[1]:.4f} / {n[2]:.4f}"
            )
        return "\n".join(lines)


def _chunk_mask(slot: torch.Tensor, tiles: torch.Tensor, qb0: int, qb1: int, q_len: int, kv_len: int,
                bs: int) -> torch.Tensor:
    """bool ``[Bl, Hl, rows, kv_len]``: the layout's token mask for query blocks ``qb0:qb1``."""
    part = tiles[slot[:, :, qb0:qb1]]  # [Bl, Hl, n, NK, bs, bs]
    Bl, Hl, n, NK = part.shape[:4]
    dense = part.permute(0, 1, 2, 4, 3, 5).reshape(Bl, Hl, n * bs, NK * bs)
    return dense[:, :, : min(q_len, qb1 * bs) - qb0 * bs, :kv_len]


def _as_layout(p: Pattern | Layout, query, key, causal, block_size) -> Layout:
    if isinstance(p, Layout):
        return p
    if not isinstance(p, Pattern):
        raise TypeError(f"pattern and baseline must be spattn Patterns or Layouts, got {type(p).__name__}")
    B, H, Lq, _ = query.shape
    return compile_pattern(p, Lq, key.shape[2], causal=causal, block_size=block_size, batch=B, heads=H,
                           device=query.device, query=query, key=key)


def diagnose(
    query: torch.Tensor,
    key: torch.Tensor,
    pattern: Pattern | Layout,
    baseline: Pattern | Layout,
    *,
    causal: bool = True,
    scale: float | None = None,
    block_size: int = 128,
    sinks: int = 64,
    local: int = 512,
    chunk: int = 256,
) -> Diagnosis:
    """Per head: true recall and keys per query of ``pattern`` and ``baseline``, and where each misses mass.

    Args:
        query: ``[B, H, Lq, D]``; key: ``[B, Hkv, Lk, D]`` (GQA: ``Hkv`` divides ``H``).
        pattern, baseline: patterns (compiled here with ``query``/``key``) or compiled Layouts.
        causal: causal dense reference (default True; queries aligned bottom-right).
        scale: softmax scale (default ``1/sqrt(D)``).
        block_size: compile block size (default 128).
        sinks: keys ``j < sinks`` form the "sinks" region (default 64).
        local: keys at distance ``0 <= i - j < local`` (outside the sinks) form the "local" region (default 512).
        chunk: queries per step (rounded to whole blocks; default 256).
    """
    B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
    for name, v in (("sinks", sinks), ("local", local), ("chunk", chunk)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "chunk" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'chunk' else 0}, got {v!r}")
    scale = default_scale(scale, D)
    layouts = [_as_layout(p, query, key, causal, block_size) for p in (pattern, baseline)]
    for lay in layouts:
        if (lay.q_len, lay.kv_len) != (Lq, Lk):
            raise ValueError(f"a layout is for ({lay.q_len}, {lay.kv_len}) but query/key give ({Lq}, {Lk})")
    bs = layouts[0].block_size
    if layouts[1].block_size != bs:
        raise ValueError("pattern and baseline layouts must share one block size")
    slots = [(_tables.unpack(lay)[1], _tables.tiles(lay.masks)) for lay in layouts]
    off = Lk - Lq
    step = max(1, chunk // bs)
    NQ = -(-Lq // bs)
    kept = [torch.zeros(B, H, dtype=torch.float64, device=query.device) for _ in layouts]
    keys = [torch.zeros_like(kept[0]) for _ in layouts]
    missed = [{r: torch.zeros_like(kept[0]) for r in REGIONS} for _ in layouts]
    j = torch.arange(Lk, device=query.device)
    k32 = key.float()
    for qb0 in range(0, NQ, step):
        qb1 = min(NQ, qb0 + step)
        i = torch.arange(qb0 * bs, min(Lq, qb1 * bs), device=query.device) + off  # absolute positions
        logits = group_matmul(query[:, :, i - off].float(), k32) * scale  # [B, H, rows, Lk]
        see = (j[None, :] <= i[:, None]) if causal else torch.ones(i.numel(), Lk, dtype=torch.bool,
                                                                   device=query.device)
        logits = logits.masked_fill(~see, -math.inf)
        p = torch.softmax(logits, -1)
        dist = i[:, None] - j[None, :]
        region = {"sinks": j[None, :] < sinks}
        region["local"] = ~region["sinks"] & (dist >= 0) & (dist < local)
        region["far"] = ~region["sinks"] & ~region["local"]
        for n, (slot, tiles) in enumerate(slots):
            m = _chunk_mask(slot, tiles, qb0, qb1, Lq, Lk, bs) & see
            kept[n] += (p * m).sum(-1).double().sum(-1)
            keys[n] += m.sum(-1).double().sum(-1).expand(B, H)
            lost = p * ~m
            for r in REGIONS:
                missed[n][r] += (lost * region[r]).sum(-1).double().sum(-1)
    return Diagnosis(
        recall=kept[0] / Lq, keys=keys[0] / Lq, missed={r: v / Lq for r, v in missed[0].items()},
        baseline_recall=kept[1] / Lq, baseline_keys=keys[1] / Lq,
        baseline_missed={r: v / Lq for r, v in missed[1].items()}, sinks=sinks, local=local,
    )


__all__ = ["Diagnosis", "diagnose", "REGIONS"]
