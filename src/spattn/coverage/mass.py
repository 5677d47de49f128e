"""Dense attention mass pooled to blocks, and the oracle block choice built from it.

``block_mass`` streams query chunks x key chunks like ``measure``: per query row it keeps a running max and,
per key block, the running sum and max of ``exp(s - max)``, rescaled when the max moves; at the end of the row
it divides by the row's total and pools rows into query blocks. Memory: one score tile plus [B, H, chunk, NK].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from spattn._checks import check_int
from spattn.coverage.measure import check_qk, chunk_tokens, compute_dtype
from spattn.layout.layout import Layout
from spattn.patterns.builtin import BlockLayout
from spattn.patterns.compile import compile as compile_pattern


@dataclasses.dataclass(eq=False)
class BlockMass:
    """Dense attention mass pooled to (query block, key block) cells.

    Attributes:
        sum: [B, H, NQ, NK] — total softmax probability of the cell summed over its queries; summed over key
            blocks it gives the number of queries of the block that see at least one key.
        max: [B, H, NQ, NK] — largest single probability in the cell.
        block_size: tokens per block (NQ = ceil(Lq / block_size), NK = ceil(Lk / block_size)).
        queries: [NQ] — queries per block that see at least one key, per batch and head [B, H, NQ].
    """

    sum: torch.Tensor
    max: torch.Tensor
    block_size: int
    queries: torch.Tensor

    def __getitem__(self, name: str) -> torch.Tensor:  # dict-style access: mass["sum"]
        return getattr(self, name)


def block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_size: int,
    causal: bool = False,
    *,
    scale: float | None = None,
    chunk: int | None = None,
) -> BlockMass:
    """The dense attention mass pooled to (query block, key block) cells: sum and max.

    Args:
        query: [B, H, Lq, D]; key: [B, Hkv, Lk, D] (Hkv divides H).
        block_size: tokens per block for both queries and keys.
        causal: causal dense attention (queries aligned bottom-right, query i at position i + Lk - Lq).
        scale: score scale, default 1/sqrt(D).
        chunk: tokens per query/key chunk (rounded to ``block_size``); default as in :func:`measure`.

    Returns:
        :class:`BlockMass` with ``sum`` and ``max`` [B, H, NQ, NK] (float64 for float64 inputs, else float32).

    Example:
        >>> import torch, spattn
        >>> q, k = torch.randn(1, 2, 100, 16), torch.randn(1, 2, 100, 16)
        >>> mass = spattn.coverage.block_mass(q, k, 32, causal=True)
        >>> mass.sum.shape, round(float(mass.sum[0, 0, 0].sum()), 4)
        (torch.Size([1, 2, 4, 4]), 32.0)
    """
    B, H, Hkv, Lq, Lk = check_qk(query, key)
    bs = check_int(block_size, "block_size", 1)
    dev = query.device
    chunk = chunk_tokens(chunk, B * H, bs, dev)
    G = H // Hkv
    D = query.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = compute_dtype(query)
    NQ, NK = math.ceil(Lq / bs), math.ceil(Lk / bs)
    offset = Lk - Lq
    k_all = key.to(cdt)
    out_sum = torch.zeros(B, H, NQ, NK, dtype=cdt, device=dev)
    out_max = torch.zeros_like(out_sum)
    queries = torch.zeros(B, H, NQ, dtype=cdt, device=dev)
    for i0 in range(0, Lq, chunk):
        i1 = min(Lq, i0 + chunk)
        cq = i1 - i0
        q = (query[:, :, i0:i1].to(cdt) * scale).view(B, Hkv, G, cq, D)
        m = torch.full((B, H, cq), -math.inf, dtype=cdt, device=dev)
        S = torch.zeros_like(m)
        row_sum = torch.zeros(B, H, cq, NK, dtype=cdt, device=dev)
        row_max = torch.zeros_like(row_sum)
        for j0 in range(0, Lk, chunk):
            if causal and j0 > i1 - 1 + offset:
                break
            j1 = min(Lk, j0 + chunk)
            ck = j1 - j0
            s = torch.matmul(q, k_all[:, :, None, j0:j1].transpose(-1, -2)).view(B, H, cq, ck)
            if causal and j1 - 1 > i0 + offset:
                qi = torch.arange(i0, i1, device=dev)[:, None] + offset
                kj = torch.arange(j0, j1, device=dev)[None, :]
                s = s.masked_fill(kj > qi, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            alpha = torch.exp(m - m_safe)
            p = s.sub_(m_safe[..., None]).exp_()
            nk = math.ceil(ck / bs)
            if nk * bs != ck:
                p = torch.nn.functional.pad(p, (0, nk * bs - ck))
            p = p.view(B, H, cq, nk, bs)
            kb0 = j0 // bs
            S = S * alpha + p.sum((-1, -2))
            row_sum.mul_(alpha[..., None])
            row_max.mul_(alpha[..., None])
            row_sum[..., kb0:kb0 + nk] += p.sum(-1)
            row_max[..., kb0:kb0 + nk] = torch.maximum(row_max[..., kb0:kb0 + nk], p.amax(-1))
            m = m_new
        nonempty = S > 0
        inv = torch.where(nonempty, 1.0 / torch.where(nonempty, S, torch.ones_like(S)), torch.zeros_like(S))
        row_sum *= inv[..., None]
        row_max *= inv[..., None]
        nq = math.ceil(cq / bs)
        pad = nq * bs - cq
        qb0 = i0 // bs
        rs = torch.nn.functional.pad(row_sum, (0, 0, 0, pad)).view(B, H, nq, bs, NK)
        rm = torch.nn.functional.pad(row_max, (0, 0, 0, pad)).view(B, H, nq, bs, NK)
        out_sum[:, :, qb0:qb0 + nq] = rs.sum(-2)
        out_max[:, :, qb0:qb0 + nq] = rm.amax(-2)
        queries[:, :, qb0:qb0 + nq] = torch.nn.functional.pad(nonempty.to(cdt), (0, pad)).view(B, H, nq, bs).sum(-1)
    return BlockMass(sum=out_sum, max=out_max, block_size=bs, queries=queries)


def select_blocks(scores: torch.Tensor, *, budget: int | None = None, mass: float | None = None,
                  total: torch.Tensor | None = None) -> torch.Tensor:
    """bool [..., NK]: per row, the top ``budget`` cells by score, or the fewest cells whose scores reach
    ``mass`` x ``total`` (``total`` [...] defaults to the row sum). Cells with score 0 are never selected."""
    if (budget is None) == (mass is None):
        raise ValueError("give exactly one of budget= (blocks per query block) or mass= (fraction in (0, 1])")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    ranked = scores.gather(-1, order)
    rank = torch.arange(scores.shape[-1], device=scores.device)
    if budget is not None:
        check_int(budget, "budget (key blocks per query block)", 0)
        keep_sorted = rank < budget
    else:
        if not isinstance(mass, (int, float)) or not 0 < mass <= 1:
            raise ValueError(f"mass must be a fraction in (0, 1], got {mass!r}")
        total = ranked.sum(-1) if total is None else total
        target = mass * total
        before = ranked.cumsum(-1) - ranked  # mass of the strictly better cells
        keep_sorted = before < target[..., None]  # keep until the target is reached
    keep_sorted = keep_sorted & (ranked > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def oracle_layout(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    budget: int | None = None,
    mass: float | None = None,
    block_size: int = 128,
    causal: bool = False,
    scale: float | None = None,
    chunk: int | None = None,
) -> Layout:
    """The best possible block choice, from the dense attention itself (an upper bound for selectors).

    Per batch, head and query block: the ``budget`` key blocks with the most dense mass, or (``mass``) the
    fewest key blocks whose mass reaches that fraction of the block's total. Blocks with no mass (all in
    the future under ``causal``) are never chosen.

    Args:
        query: [B, H, Lq, D]; key: [B, Hkv, Lk, D].
        budget: key blocks kept per query block. Exactly one of ``budget`` / ``mass``.
        mass: fraction in (0, 1] of the dense mass to keep per query block.
        block_size: tokens per block. causal: causal attention (bottom-right aligned).

    Returns:
        a :class:`spattn.Layout` with tables [B, H, ...] (causality applied inside the kept blocks).

    Example:
        >>> import torch, spattn
        >>> q, k = torch.randn(1, 2, 256, 16), torch.randn(1, 2, 256, 16)
        >>> layout = spattn.coverage.oracle_layout(q, k, mass=0.9, block_size=64, causal=True)
        >>> spattn.coverage.measure(q, k, layout, causal=True).recall.mean() >= 0.9
        tensor(True)
    """
    bm = block_mass(query, key, block_size, causal, scale=scale, chunk=chunk)
    selected = select_blocks(bm.sum, budget=budget, mass=mass, total=bm.queries if mass is not None else None)
    return blocks_to_layout(selected, block_size, query.shape[2], key.shape[2], causal=causal,
                            batch=query.shape[0], heads=query.shape[1], device=query.device,
                            info={"oracle": {"budget": budget, "mass": mass}})


def blocks_to_layout(selected: torch.Tensor, block_size: int, q_len: int, kv_len: int, *, causal: bool,
                     batch: int, heads: int, device: torch.device, info: dict[str, Any] | None = None) -> Layout:
    """Layout keeping the selected blocks (bool [B, H, NQ, NK]), intersected with causality when asked."""
    layout = compile_pattern(BlockLayout(selected, block=block_size), q_len, kv_len, causal=causal,
                             block_size=block_size, batch=batch, heads=heads, device=device)
    if info:
        layout.info.update(info)
    return layout
