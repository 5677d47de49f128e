"""spattn.coverage.block_mass / oracle_layout against a dense float64 brute force."""

import math

import pytest
import torch

from spattn.coverage import block_mass, measure, oracle_layout, select_blocks


def dense_probs(q, k, causal):
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, 1)
    Lq, Lk = q.shape[2], k.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + Lk - Lq, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0)


def pool(p, bs, op):
    B, H, Lq, Lk = p.shape
    NQ, NK = math.ceil(Lq / bs), math.ceil(Lk / bs)
    p = torch.nn.functional.pad(p, (0, NK * bs - Lk, 0, NQ * bs - Lq)).view(B, H, NQ, bs, NK, bs)
    return p.sum((3, 5)) if op == "sum" else p.amax((3, 5))


@pytest.mark.parametrize("Lq,Lk,bs,causal,chunk", [
    pytest.param(100, 100, 16, True, None, id="L100-bs16-causal"),
    pytest.param(37, 90, 8, False, 8, id="Lq37-Lk90-bs8-chunk8"),
    pytest.param(70, 33, 16, True, 16, id="Lq70>Lk33-causal-empty-rows"),
])
def test_block_mass_matches_dense(Lq, Lk, bs, causal, chunk):
    q = torch.randn(2, 4, Lq, 16, dtype=torch.float64)
    k = torch.randn(2, 2, Lk, 16, dtype=torch.float64)
    m = block_mass(q, k, bs, causal, chunk=chunk)
    p = dense_probs(q, k, causal)
    torch.testing.assert_close(m.sum, pool(p, bs, "sum"), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["max"], pool(p, bs, "max"), rtol=0, atol=1e-12)
    # each query block's mass sums to its number of queries that see a key
    rows = (p.sum(-1) > 0).double()
    NQ = math.ceil(Lq / bs)
    want = torch.nn.functional.pad(rows, (0, NQ * bs - Lq)).view(2, 4, NQ, bs).sum(-1)
    torch.testing.assert_close(m.sum.sum(-1), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.queries, want)


def test_oracle_mass_is_minimal():
    q = torch.randn(1, 3, 160, 16, dtype=torch.float64) * 2
    k = torch.randn(1, 3, 160, 16, dtype=torch.float64) * 2
    bs, target = 16, 0.8
    m = block_mass(q, k, bs, True)
    sel = select_blocks(m.sum, mass=target, total=m.queries)
    kept = (m.sum * sel).sum(-1)
    assert (kept >= target * m.queries - 1e-12).all()  # reaches the target
    # minimal: no smaller set reaches it (the best set of one block fewer is the top n-1 blocks)
    n = sel.sum(-1)
    top = m.sum.sort(-1, descending=True).values.cumsum(-1)
    best_fewer = torch.where(n > 1, top.gather(-1, (n - 2).clamp(min=0)[..., None])[..., 0], torch.zeros_like(kept))
    assert (best_fewer < target * m.queries).all()
    layout = oracle_layout(q, k, mass=target, block_size=bs, causal=True)
    assert torch.equal(layout.block_status()[0] > 0, sel[0])
    r = measure(q, k, layout, causal=True)
    # the kept mass per query block is exactly the recall summed over the block's queries
    per_block = torch.nn.functional.pad(r.recall, (0, 0)).view(1, 3, 10, bs).sum(-1)
    torch.testing.assert_close(per_block, kept, rtol=1e-10, atol=1e-10)


def test_oracle_budget_beats_any_other_choice():
    import itertools

    q = torch.randn(1, 2, 128, 16, dtype=torch.float64) * 2
    k = torch.randn(1, 2, 128, 16, dtype=torch.float64) * 2
    oracle = oracle_layout(q, k, budget=3, block_size=16)
    chosen = oracle.block_status()[0] > 0  # [H, NQ, NK]
    assert chosen.sum(-1).eq(3).all()
    # dense softmax mass per (query block, key block), by brute force
    p = torch.softmax(q[0] @ k[0].transpose(-1, -2) / 4, -1)  # [H, L, L], scale 1/sqrt(16)
    mass = p.view(2, 8, 16, 8, 16).sum((2, 4))  # [H, NQ, NK]
    got = (mass * chosen).sum(-1)
    for h, qb in itertools.product(range(2), range(8)):
        best = max(float(mass[h, qb, list(c)].sum()) for c in itertools.combinations(range(8), 3))
        assert float(got[h, qb]) == pytest.approx(best, rel=1e-12)  # no other 3 blocks keep more mass
    r_oracle = measure(q, k, oracle)
    torch.testing.assert_close(r_oracle.recall[0].view(2, 8, 16).sum(-1), got, rtol=1e-10, atol=1e-10)


def test_select_blocks_errors():
    with pytest.raises(ValueError, match="exactly one"):
        select_blocks(torch.rand(2, 3))
    with pytest.raises(ValueError, match="mass"):
        select_blocks(torch.rand(2, 3), mass=1.5)
    with pytest.raises(ValueError, match="budget"):
        select_blocks(torch.rand(2, 3), budget=-1)
    with pytest.raises(ValueError, match="block_size"):
        block_mass(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2), 0)
