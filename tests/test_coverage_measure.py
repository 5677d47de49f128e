"""spattn.coverage.measure: exact identities in float64 against a dense brute force, and bounded memory."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spattn
from spattn.coverage import measure
from spattn.layout import from_dense


def dense_reference(q, k, v, kept, causal, scale=None):
    """float64 brute force: dense probabilities, recall, dense and sparse outputs."""
    B, H, Lq, D = q.shape
    G = H // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    Lk = k.shape[2]
    s = q @ k.transpose(-1, -2) * (scale or 1 / math.sqrt(D))
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    keep = kept & allowed
    recall = (p * keep).sum(-1)
    ps = (p * keep) / torch.where(recall > 0, recall, 1.0)[..., None]
    return p, s, keep, recall, p @ v, ps @ v


CASES = [
    pytest.param(2, 4, 2, 37, 53, 8, False, id="B2-H4-gqa-Lq37-Lk53-bs8"),
    pytest.param(1, 3, 3, 64, 64, 16, True, id="B1-H3-L64-causal"),
    pytest.param(2, 2, 1, 70, 33, 16, True, id="B2-mqa-Lq70>Lk33-causal-empty-rows"),
    pytest.param(1, 2, 2, 1, 9, 4, True, id="Lq1-decode"),
    pytest.param(1, 2, 1, 63, 127, 32, False, id="L63x127-bs32"),
]


@pytest.mark.parametrize("B,H,Hkv,Lq,Lk,bs,causal", CASES)
@pytest.mark.parametrize("chunk", [None, 1])
def test_measure_matches_dense_brute_force(B, H, Hkv, Lq, Lk, bs, causal, chunk):
    q = torch.randn(B, H, Lq, 16, dtype=torch.float64)
    k = torch.randn(B, Hkv, Lk, 16, dtype=torch.float64)
    v = torch.randn(B, Hkv, Lk, 8, dtype=torch.float64)
    kept = torch.rand(B, H, Lq, Lk) < 0.3  # dynamic layout: per batch and head
    kept[0, 0, : Lq // 2] = False  # rows that keep nothing
    layout = from_dense(kept, bs)
    r = measure(q, k, layout, value=v, causal=causal, topk=5, chunk=chunk)
    p, s, keep, recall, o, o_sparse = dense_reference(q, k, v, kept, causal)
    empty_dense = ~(p > 0).any(-1)
    want = torch.where(empty_dense, torch.ones_like(recall), recall)
    torch.testing.assert_close(r.recall, want, rtol=0, atol=1e-12)
    # KL(p_sparse || p_dense) computed from the distributions, = -log(recall), inf where nothing kept
    ps = (p * keep) / torch.where(recall > 0, recall, 1.0)[..., None]
    kl = torch.where(ps > 0, ps * (ps.log() - p.clamp(min=1e-300).log()), torch.zeros_like(ps)).sum(-1)
    kl = torch.where((recall == 0) & ~empty_dense, math.inf, kl)
    torch.testing.assert_close(r.kl, kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.kl, torch.where(empty_dense, 0.0, -torch.log(recall)), rtol=0, atol=1e-12)
    assert not r.kl.isnan().any() and not r.recall.isnan().any() and not r.topk_overlap.isnan().any()
    # output error and the bound ||o - o~|| <= 2 (1 - recall) max ||v||
    err = (o_sparse - o).norm(dim=-1)
    torch.testing.assert_close(r.output_abs_error, err, rtol=0, atol=1e-12)
    vmax = v.norm(dim=-1).amax(-1).repeat_interleave(H // Hkv, 1)[..., None]
    assert (r.output_abs_error <= 2 * (1 - r.recall) * vmax + 1e-12).all()
    rel = (o_sparse - o).flatten(2).norm(dim=-1) / o.flatten(2).norm(dim=-1)
    torch.testing.assert_close(r.output_error, rel, rtol=1e-10, atol=1e-12)
    # top-k overlap: fraction of the dense top-k (ties are measure-zero with random floats) that is kept
    n_allowed = torch.isfinite(s).sum(-1)
    kk = n_allowed.clamp(max=5)
    top = s.topk(min(5, Lk), dim=-1)
    rank = torch.arange(min(5, Lk))
    hits = (keep.gather(-1, top.indices) & (rank < kk[..., None])).sum(-1)
    want_overlap = torch.where(kk > 0, hits / kk.clamp(min=1), torch.ones_like(recall))
    torch.testing.assert_close(r.topk_overlap, want_overlap, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_recall_one_when_every_weighted_key_is_kept(causal):
    q = torch.randn(2, 4, 75, 32, dtype=torch.float64)
    k = torch.randn(2, 2, 75, 32, dtype=torch.float64)
    v = torch.randn(2, 2, 75, 32, dtype=torch.float64)
    pattern = spattn.Causal() if causal else spattn.Full()
    r = measure(q, k, pattern, value=v, causal=causal, block_size=16)
    assert torch.equal(r.recall, torch.ones_like(r.recall))  # exactly, not approximately
    assert torch.equal(r.kl, torch.zeros_like(r.kl))
    assert torch.equal(r.output_error, torch.zeros_like(r.output_error))
    assert torch.equal(r.topk_overlap, torch.ones_like(r.topk_overlap))


def test_output_matches_spattn_attention_reference():
    q = torch.randn(1, 4, 130, 32, dtype=torch.float64)
    k = torch.randn(1, 2, 130, 32, dtype=torch.float64)
    v = torch.randn(1, 2, 130, 32, dtype=torch.float64)
    pattern = spattn.Sinks(4) | spattn.Window(20)
    layout = spattn.compile(pattern, 130, 130, causal=True, block_size=32)
    r = measure(q, k, layout, value=v, causal=True)
    dense = spattn.attention(q, k, v, spattn.Causal(), causal=True, backend="reference")
    sparse = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    err = (sparse - dense).norm(dim=-1)
    torch.testing.assert_close(r.output_abs_error, err, rtol=1e-9, atol=1e-12)
    assert 0 < float(r.recall.mean()) < 1


def test_summary_and_per_head():
    q, k = torch.randn(1, 3, 100, 16), torch.randn(1, 3, 100, 16)
    r = measure(q, k, spattn.Window(10), causal=True, block_size=16)
    s = r.summary()
    assert set(s["overall"]["recall"]) == {"mean", "p5", "min"}
    assert len(s["per_head"]["recall"]["mean"]) == 3
    head = r.per_head("recall", "min")
    torch.testing.assert_close(head, r.recall.double().amin((0, 2)))
    assert s["overall"]["recall"]["min"] <= s["overall"]["recall"]["p5"] <= 1
    with pytest.raises(ValueError, match="output_error"):
        r.per_head("output_error")
    with pytest.raises(ValueError, match="metric"):
        r.per_head("nope")


def test_bad_inputs():
    q, k = torch.randn(1, 3, 10, 8), torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="key heads"):
        measure(q, k, spattn.Full())
    with pytest.raises(ValueError, match="query"):
        measure(q[0], k, spattn.Full())
    lay = spattn.compile(spattn.Full(), 12, 12, block_size=4)
    with pytest.raises(ValueError, match="q_len"):
        measure(q, torch.randn(1, 3, 10, 8), lay)
    with pytest.raises(ValueError, match="topk"):
        measure(q, torch.randn(1, 3, 10, 8), spattn.Full(), topk=-1)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_bounded_at_8192():
    L = 8192
    q, k, v = torch.randn(1, 1, L, 16), torch.randn(1, 1, L, 16), torch.randn(1, 1, L, 16)
    layout = spattn.compile(spattn.Sinks(64) | spattn.Window(512), L, L, causal=True, block_size=128)
    with _LargestTensor() as spy:
        r = measure(q, k, layout, value=v, causal=True, chunk=1024)
    assert r.recall.shape == (1, 1, L)
    assert spy.largest <= 1024 * (1024 + 16)  # one score tile (plus the top-k columns), never L x L
    # the spy can fail: a dense score matrix is caught
    with _LargestTensor() as spy:
        q[0, 0] @ k[0, 0].T
    assert spy.largest >= L * L
