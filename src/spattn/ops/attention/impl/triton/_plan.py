"""Host-side facts about a Layout that choose a kernel path, computed from the block tables only.

- :func:`band`: Note [band] in ``_forward.py``: the closed form ``(left, right, sinks, sink_min_d)`` whose iota
  mask equals every stored mask tile, and whether each row's full blocks form one contiguous run; ``None`` when
  the layout is not banded. A candidate comes from the layout's pattern (a union of a window or causal part and
  sinks) and is then *checked* against the tables, so a wrong guess only costs the check. Cached per tables.
- :func:`order`: Note [persistent]: row tiles sorted by visited-block count, heaviest first (device ops, no
  host synchronisation).
- :func:`facts`: the tuner's key: block size, density bucket, full/partial mix and GQA group, from the tables'
  shapes alone (no synchronisation, so it is CUDA-graph safe).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch

BIG = 1 << 30  # "unbounded" in the band's closed form (int32 arithmetic in the kernels)
NO_BAND = (0, 0, 0, 0, False)


class PerObject:
    """A cache keyed by an object's identity (a tensor, a Layout) that forgets the entry when the object is freed
    (tensors compare elementwise, so they cannot be dictionary keys themselves). A value must not refer to its
    key, or the entry is never freed."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref, object]] = {}

    def get(self, t: torch.Tensor, default=None):
        hit = self._data.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else default

    def __contains__(self, t: torch.Tensor) -> bool:
        hit = self._data.get(id(t))
        return hit is not None and hit[0]() is t

    def __getitem__(self, t: torch.Tensor):
        return self._data[id(t)][1]

    def __setitem__(self, t: torch.Tensor, value) -> None:
        key = id(t)
        self._data[key] = (weakref.ref(t, lambda _ref, key=key: self._data.pop(key, None)), value)


_bands = PerObject()
_orders = PerObject()


def _candidate(pattern, causal: bool) -> tuple[int, int, int] | None:
    """(left, right, sinks) when the pattern is a union of at most one window-like part and sinks."""
    if pattern is None:
        return None
    parts = getattr(pattern, "parts", None) if getattr(pattern, "kind", None) == "union" else (pattern,)
    if parts is None:
        return None
    band, sinks = None, 0
    for p in parts:
        kind = getattr(p, "kind", None)
        if kind == "window" and band is None:
            band = (int(p.left), int(p.right))
        elif kind == "causal" and band is None:
            band = (BIG, 0)
        elif kind == "sinks":
            sinks = max(sinks, int(p.n))
        else:
            return None
    if band is None:
        if not sinks:
            return None
        band = (-BIG, -BIG)  # sinks alone: an empty band
    left, right = band
    if causal:
        right = min(right, 0)
    return min(left, BIG), min(right, BIG), sinks


def _expected_tiles(qb, kb, bs, q_len, kv_len, left, right, sinks, sink_min_d):
    """bool [E, bs, bs]: the closed form at the (query block, key block) of each entry (False out of bounds,
    as stored masks are)."""
    r = torch.arange(bs, device=qb.device)
    row = (qb[:, None] * bs + r[None, :])[:, :, None]
    j = (kb[:, None] * bs + r[None, :])[:, None, :]
    d = row + (kv_len - q_len) - j
    keep = ((d <= left) & (d >= -right)) | ((j < sinks) & (d >= sink_min_d))
    return keep & (j < kv_len) & (row < q_len)


def band(layout) -> tuple[int, int, int, int, bool] | None:
    """``(left, right, sinks, sink_min_d, full_run)`` when the layout's stored masks are all that closed form,
    else None. One host synchronisation the first time per layout (never under CUDA-graph capture or tracing)."""
    key = layout.kv_mask_ids
    if key in _bands:
        return _bands[key]
    cand = _candidate(getattr(layout, "pattern", None), bool(getattr(layout, "causal", False)))
    if cand is None or capturing(layout.device) or torch.compiler.is_compiling():
        return None
    left, right, sinks = cand
    sink_min_d = 0 if layout.causal else -BIG
    bs = layout.block_size
    result = None
    num, idx, mid = layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids
    W = idx.shape[-1]
    Bl, Hl, NQ = num.shape
    entries = Bl * Hl * NQ * W
    if entries * bs * bs <= 1 << 28:
        valid = torch.arange(W, device=num.device) < num[..., None].long()
        qb = torch.arange(NQ, device=num.device).view(1, 1, NQ, 1).expand(Bl, Hl, NQ, W)[valid]
        kb = idx.long()[valid]
        ok = True
        if kb.numel():
            want = _expected_tiles(qb, kb, bs, layout.q_len, layout.kv_len, left, right, sinks, sink_min_d)
            ok = bool(torch.equal(layout.masks[mid.long()[valid]].bool(), want))
        if ok:
            fnum, fidx = layout.full_kv_num_blocks, layout.full_kv_indices
            WF = fidx.shape[-1]
            run = WF > 0
            if run:
                e = torch.arange(WF, device=fidx.device)
                within = e < fnum[..., None].long()
                run = bool(((fidx.long() == fidx[..., :1].long() + e) | ~within).all())
            result = (left, right, sinks, sink_min_d, run)
    _bands[key] = result
    return result


def order(kv_num: torch.Tensor, fkv_num: torch.Tensor, B: int, H: int, block_m: int, bs: int, Lq: int) -> torch.Tensor:
    """int32 [B * H * NM] work items ``bh * NM + m`` sorted by visited blocks (full + partial), heaviest first."""
    key = kv_num
    cached = _orders.get(key)
    if cached is not None and cached[0] == (B, H, block_m, Lq):
        return cached[1]
    NM = -(-Lq // block_m)
    weight = (kv_num + fkv_num).to(torch.int32).expand(B, H, kv_num.shape[-1])
    per_tile = weight[:, :, (torch.arange(NM, device=kv_num.device) * block_m) // bs].reshape(-1)
    out = torch.argsort(per_tile, descending=True, stable=True).to(torch.int32)
    if not capturing(kv_num.device):
        _orders[key] = ((B, H, block_m, Lq), out)
    return out


def facts(kv_idx: torch.Tensor, fkv_idx: torch.Tensor, num_kv_blocks: int, bs: int, group: int) -> str:
    """``bs128|dens2^-3|mix-full|G1``: density bucket = log2 of the widest row's visited fraction, mix = the
    share of full entries in the table widths; from shapes only."""
    width = kv_idx.shape[-1] + fkv_idx.shape[-1]
    frac = max(width, 1) / max(num_kv_blocks, 1)
    dens = max(-8, min(0, round(math.log2(frac))))
    share = fkv_idx.shape[-1] / max(width, 1)
    mix = "full" if share >= 2 / 3 else ("partial" if share <= 1 / 3 else "mixed")
    return f"bs{bs}|dens2^{dens}|mix-{mix}|G{group}"


def capturing(device: torch.device) -> bool:
    """True while the current CUDA stream records a graph (always False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@functools.cache
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device ``index`` (read from the device)."""
    return torch.cuda.get_device_properties(index).multi_processor_count
