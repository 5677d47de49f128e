"""The static decode step's fast paths on CUDA: the fused page selection (two triton launches per layer, see
:func:`spattn.ops.decode.select_pages`, plus one for the non-finite check, :func:`flag_nonfinite`) and the
*fair* dense decode (spattn's split-K decode kernel over exactly each sequence's valid keys, instead of torch's
masked SDPA over the whole capacity).

Both write the block tables of the split-K decode kernel on the device, with no host read, so a CUDA graph
records them. The torch selection (:func:`~spattn.runtime.decode.select_from_row`) stays the reference and the
fallback; :func:`selection_of` turns fused tables back into a :class:`~spattn.runtime.decode.DecodeSelection`
(sampled recall, tests).

Dense tables (:func:`dense_tables`), shared by every dense layer of a step: the pages whose ``S`` keys are all
valid are *full* entries (no mask read), the others with a valid key are *partial* entries whose mask tile's
row 0 is the page's valid keys. Partial pages are few: the pages of the prompt that padding cuts, plus the page
being filled; :func:`partial_page_bound` counts them once per generation (the partial list's width).
"""

from __future__ import annotations

import torch

from spattn.runtime.decode import DecodePlan, DecodeSelection, table_buffers

_DENSE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def fused_applies(plan: DecodePlan, rows: torch.Tensor, mixed: bool, page_size: int) -> bool:
    """True when the fused selection computes what the torch selection does for this layer: a top-k on the
    ``bounds`` page scores, a static part equal for every head (``rows [T, Bs, 1, C]``), no sequence running
    dense inside a sparse batch, and a power-of-two page size >= 16 (the decode kernel's)."""
    return (plan.rule == "top_k" and plan.selector == "bounds" and rows.shape[2] == 1 and not mixed
            and page_size >= 16 and not page_size & (page_size - 1))


def flag_nonfinite(output: torch.Tensor, query: torch.Tensor, flags: torch.Tensor, index: int) -> None:
    """:func:`spattn.ops.decode.flag_nonfinite` (imported when called: triton is an optional extra)."""
    from spattn.ops.decode import flag_nonfinite as check

    check(output, query, flags, index)


def fused_tables(query: torch.Tensor, key_min: torch.Tensor, key_max: torch.Tensor, rows: torch.Tensor,
                 step: torch.Tensor, valid: torch.Tensor, slot: torch.Tensor, budget: torch.Tensor, *, width: int,
                 page_size: int, scale: float):
    """``(tables, page_tables)``: the decode kernel's six tables (grouped: per key/value head tiles) from
    :func:`spattn.ops.decode.select_pages`, and its :class:`~spattn.ops.decode.PageTables` (stats)."""
    from spattn.ops.decode import select_pages

    B, H = query.shape[:2]
    Hkv = key_min.shape[1]
    kv_mid, full_num, full_idx, masks = table_buffers(B, H, Hkv, width, page_size, query.device, grouped=True)
    out = select_pages(query, key_min, key_max, rows, step, valid, slot, budget, masks, width=width, scale=scale)
    return (out.kv_num, out.kv_idx, kv_mid, full_num, full_idx, masks), out


def selection_of(page_tables, *, heads: int, page_size: int) -> DecodeSelection:
    """The :class:`DecodeSelection` the fused tables encode (pages ``[B, Hkv, W]`` with -1 for unused slots, token
    mask ``[B, H, W * S]``, chosen pages per key/value head)."""
    B, _, _, W = page_tables.kv_idx.shape
    Hkv = page_tables.stats.shape[1]
    G = heads // Hkv
    S = page_size
    idx = page_tables.kv_idx[:, ::G, 0].long()                                    # [B, Hkv, W]
    num = page_tables.kv_num[:, ::G]                                              # [B, Hkv, 1]
    used = torch.arange(W, device=idx.device) < num
    pages = torch.where(used, idx, torch.full_like(idx, -1))
    tiles = page_tables.masks[: B * Hkv * W].view(B, Hkv, W, S * S)[..., :S].bool() & used[..., None]
    mask = tiles.flatten(2).repeat_interleave(G, dim=1)                          # [B, H, W * S]
    return DecodeSelection(pages=pages, mask=mask, selected=page_tables.stats[..., 2].long(), grouped=True)


def partial_page_bound(prompt_mask: torch.Tensor, page_size: int) -> int:
    """The most pages of one sequence that can hold some but not all valid keys at any decode step:
    ``prompt_mask`` bool ``[B, P0]`` (the prompt's attention mask; decoded slots after it are always valid),
    its pages cut by padding (the page holding slot ``P0`` counted as cut), plus the page being filled."""
    B, P0 = prompt_mask.shape
    S = page_size
    NP = -(-P0 // S)
    padded = torch.nn.functional.pad(prompt_mask, (0, NP * S - P0), value=True).view(B, NP, S)
    counts = padded.sum(-1)
    cut = (counts > 0) & (counts < S)
    if P0 % S:
        cut[:, -1] = True
    return int(cut.sum(-1).max()) + 1


def dense_tables(valid: torch.Tensor, *, page_size: int, partial_width: int) -> tuple[torch.Tensor, ...]:
    """The decode kernel's tables for dense attention over the keys ``valid`` marks (bool ``[B, C]``, ``C`` a
    multiple of ``page_size``), one row per sequence shared by every head: full entries for the pages whose keys
    are all valid, at most ``partial_width`` partial entries (the pages with some valid key; see
    :func:`partial_page_bound`). Device work only (a few kernels per step, shared by every dense layer)."""
    B, C = valid.shape
    S = page_size
    NP = C // S
    W = max(1, min(int(partial_width), NP))
    key = (B, NP, S, W, str(valid.device))
    bufs = _DENSE.get(key)
    if bufs is None:
        bufs = (torch.arange(B * W, dtype=torch.int32, device=valid.device).view(B, 1, 1, W),
                torch.zeros(B * W, S, S, dtype=torch.uint8, device=valid.device))
        if len(_DENSE) >= 8:
            _DENSE.pop(next(iter(_DENSE)))
        _DENSE[key] = bufs
    kv_mid, masks = bufs
    pages = valid.view(B, NP, S)
    counts = pages.sum(-1)
    full = counts == S
    part = (counts > 0) & ~full
    f_order = torch.sort((~full).to(torch.uint8), dim=-1, stable=True).indices              # [B, NP]
    p_order = torch.sort((~part).to(torch.uint8), dim=-1, stable=True).indices[:, :W]       # [B, W]
    full_num = full.sum(-1, dtype=torch.int32).view(B, 1, 1)
    part_num = part.sum(-1, dtype=torch.int32).clamp(max=W).view(B, 1, 1)
    tiles = pages.gather(1, p_order[..., None].expand(-1, -1, S))                           # [B, W, S]
    masks.view(B * W, S * S)[:, :S].copy_(tiles.reshape(B * W, S))
    return (part_num, p_order.to(torch.int32).view(B, 1, 1, W), kv_mid, full_num,
            f_order.to(torch.int32).view(B, 1, 1, NP), masks)


def tables_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tables: tuple[torch.Tensor, ...],
                     *, scale: float, grouped: bool) -> torch.Tensor:
    """``[B, H, 1, Dv]``: spattn's split-K decode kernel on ``tables`` (one launch; key/value ``[B, Hkv, C, D]``
    the cache's whole buffers)."""
    from spattn.ops.attention.impl.triton import decode_tables

    out, _ = decode_tables(query, key, value, tables, scale=scale, grouped=grouped)
    return out
