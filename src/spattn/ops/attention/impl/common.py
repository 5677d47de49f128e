"""Maths shared unchanged by the PyTorch backends: a masked softmax that never yields NaN, and the handling
of non-finite keys and values (Note [non-finite inputs])."""

from __future__ import annotations

import torch

from spattn.layout import tables
from spattn.layout.layout import Layout


def masked_softmax_lse(
    scores: torch.Tensor, blocked: torch.Tensor, return_lse: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax over the last axis of ``scores`` with ``blocked`` pairs removed; rows with nothing allowed
    give p = 0 and lse = -inf, with finite gradients. Computed in float32 at least.

    ``scores`` may be overwritten (it must be a fresh tensor whose producer does not need it for its
    backward, e.g. a matmul output). When every row keeps something (the common case) it uses the fused
    softmax kernel. Returns (p, lse or None)."""
    s = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if not bool(blocked.all(-1).any()):
        s = s.masked_fill_(blocked, float("-inf"))
        p = torch.softmax(s, -1)
        return p, (torch.logsumexp(s, -1) if return_lse else None)
    s = s.masked_fill(blocked, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(s - m)
    denom = e.sum(-1, keepdim=True)
    nonempty = denom > 0
    p = e / torch.where(nonempty, denom, torch.ones_like(denom))
    lse = torch.where(nonempty, torch.log(torch.where(nonempty, denom, torch.ones_like(denom))) + m, float("-inf"))
    return p, lse.squeeze(-1)


# Note [non-finite inputs]: a key or value that the layout excludes must never reach an output row, but a
# product 0 * NaN is NaN, so a NaN in an excluded key/value of a shared block (or a padded position) would
# spread through ``p @ v``. The PyTorch backends therefore replace non-finite key rows / value entries by 0
# (``split_nonfinite``), compute as usual, and then mark exactly the rows that *attend* such a position
# (``mark_nonfinite``): every channel of a row attending a non-finite key (and its lse), the channel of a row
# attending a non-finite value entry. A non-finite query makes its own row NaN (when it attends anything).
# All of this costs one ``isfinite`` check when the inputs are finite.
_REACH_ELEMENTS = 1 << 23


def split_nonfinite(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(key, value, None)`` when both are finite; else copies with non-finite key rows and value entries set to
    0 and flags bool ``[B, Hk, Lk, Dv + 1]``: channel ``c < Dv`` is "value entry c or the key is non-finite",
    channel ``Dv`` "the key is non-finite" (see Note [non-finite inputs])."""
    bad_k = ~torch.isfinite(key).all(-1)  # [B, Hk, Lk]
    bad_v = ~torch.isfinite(value)  # [B, Hk, Lk, Dv]
    if not bool(bad_k.any() | bad_v.any()):
        return key, value, None
    zero = torch.zeros((), dtype=key.dtype, device=key.device)
    key = torch.where(bad_k[..., None], zero, key)
    value = torch.where(bad_v, zero, value)
    flags = torch.cat([bad_v | bad_k[..., None], bad_k[..., None]], -1)
    return key, value, flags


def attended(layout: Layout, flags: torch.Tensor, heads: int) -> torch.Tensor:
    """bool ``[B, H, Lq, C]``: whether query row ``i`` of head ``h`` attends (under ``layout``) some key ``j`` with
    ``flags[b, h // (H // Hk), j, c]`` (flags bool ``[B, Hk, Lk, C]``). Blockwise, never ``Lq x Lk``."""
    B, Hk, Lk, C = flags.shape
    H, G = heads, heads // Hk
    bs, NQ, NK = layout.block_size, layout.num_q_blocks, layout.num_kv_blocks
    dev = flags.device
    fp = torch.nn.functional.pad(flags.float(), (0, 0, 0, NK * bs - Lk)).view(B, Hk, NK, bs, C)
    idx, slot = tables.entries(layout)  # [Bl, Hl, NQ, W]
    W = idx.shape[-1]
    tiles = tables.tiles(layout.masks).float()
    b_ix = torch.arange(B, device=dev)[:, None, None, None]
    h_ix = (torch.arange(H, device=dev) // G)[None, :, None, None]
    n = max(1, _REACH_ELEMENTS // max(1, B * H * W * bs * max(bs, C)))
    out = []
    for c0 in range(0, NQ, n):
        ic = idx[:, :, c0 : c0 + n].expand(B, H, -1, -1)
        m = tiles[slot[:, :, c0 : c0 + n]].expand(B, H, -1, -1, -1, -1)  # [B, H, n, W, bs(q), bs(k)]
        f = fp[b_ix, h_ix, ic]  # [B, H, n, W, bs(k), C]
        out.append(torch.einsum("bhnwqk,bhnwkc->bhnqc", m, f) > 0)
    return torch.cat(out, 2).reshape(B, H, NQ * bs, C)[:, :, : layout.q_len]


def mark_nonfinite(out: torch.Tensor, lse: torch.Tensor | None, layout: Layout, flags: torch.Tensor | None):
    """``(out, lse)`` with NaN where a row attends a non-finite key / value entry (flags from
    :func:`split_nonfinite`; a no-op when they are None)."""
    if flags is None:
        return out, lse
    reach = attended(layout, flags, out.shape[1])
    out = torch.where(reach[..., :-1], torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    if lse is not None:
        lse = torch.where(reach[..., -1], torch.full((), float("nan"), dtype=lse.dtype, device=lse.device), lse)
    return out, lse
