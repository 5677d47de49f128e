"""LayoutBuilder: the sync-free device build equals spattn.compile, tables and attention included."""

import pytest
import torch

import spattn
from spattn.selectors import Adaptive, LayoutBuilder, TopK, TopP

CASES = [
    pytest.param(lambda: spattn.Sinks(5) | spattn.Window(40) | TopP("pooled", 0.8), 4, 2, 300,
                 id="topp-gqa"),
    pytest.param(lambda: spattn.Sinks(40) | spattn.Window(70) | TopK("antidiagonal", 2, options={"stride": 8}),
                 2, 2, 257, id="topk-antidiagonal"),
    pytest.param(lambda: TopK("bounds", 3), 2, 1, 200, id="topk-alone"),
    pytest.param(lambda: spattn.Window(33) | TopP("vertical_slash", 0.9, sharing="head"), 4, 2, 250, id="per-head"),
    pytest.param(lambda: Adaptive("probe", 90, sinks=8, window=20, block=32, sharing="head"), 4, 2, 257,
                 id="adaptive-probe"),
    pytest.param(lambda: spattn.Sinks(3) | Adaptive("pooled", 70, window=40, block=None), 2, 1, 200,
                 id="adaptive-in-union"),
]


def _transposed_agree(layout):
    """The q tables list exactly the (query block, key block) pairs of the kv tables, per kind."""
    for num, idx, tnum, tidx in (
        (layout.kv_num_blocks, layout.kv_indices, layout.q_num_blocks, layout.q_indices),
        (layout.full_kv_num_blocks, layout.full_kv_indices, layout.full_q_num_blocks, layout.full_q_indices),
    ):
        NQ, NK = layout.num_q_blocks, layout.num_kv_blocks
        fwd = torch.zeros(*num.shape[:2], NQ, NK + 1, dtype=torch.bool)
        valid = torch.arange(idx.shape[-1]) < num[..., None]
        fwd.scatter_(-1, torch.where(valid, idx.long(), NK), valid)
        bwd = torch.zeros(*tnum.shape[:2], NK, NQ + 1, dtype=torch.bool)
        tvalid = torch.arange(tidx.shape[-1]) < tnum[..., None]
        bwd.scatter_(-1, torch.where(tvalid, tidx.long(), NQ), tvalid)
        assert torch.equal(fwd[..., :NK], bwd[..., :NQ].transpose(-1, -2))


@pytest.mark.parametrize("make,H,Hkv,L", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_build_equals_compile(make, H, Hkv, L, causal):
    torch.manual_seed(0)
    pattern = make()
    q = (torch.randn(2, H, L, 16) * 2).requires_grad_()
    k = (torch.randn(2, Hkv, L, 16) * 2).requires_grad_()
    v = torch.randn(2, Hkv, L, 16, requires_grad=True)
    ref = spattn.compile(pattern, L, L, causal=causal, block_size=32, batch=2, heads=H, query=q, key=k)
    builder = LayoutBuilder(pattern, L, causal=causal, block_size=32, batch=2, heads=H)
    got = builder.build(q, k)
    assert torch.equal(got.block_status(), ref.block_status().expand(2, H, -1, -1))
    assert torch.equal(got.to_dense(), ref.to_dense().expand(2, H, -1, -1))
    _transposed_agree(got)
    torch.testing.assert_close(got.info["estimated_mass"], ref.info["estimated_mass"])
    out = spattn.attention(q, k, v, got, causal=causal, backend="reference")
    want = spattn.attention(q, k, v, ref, causal=causal, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_builder_errors():
    with pytest.raises(ValueError, match="exactly one"):
        LayoutBuilder(spattn.Window(4), 64, batch=1, heads=1)
    with pytest.raises(NotImplementedError, match="keep"):
        LayoutBuilder(TopK("pooled", 1, keep=(3,)), 64, batch=1, heads=1)
    # cells smaller than the kernel block: the masks of partly chosen blocks depend on the input
    for dynamic in (Adaptive("probe", 40, window=8, block=16), TopK("pooled", 2, block=16)):
        with pytest.raises(ValueError, match="selection cells of the kernel block"):
            LayoutBuilder(spattn.Sinks(4) | dynamic, 128, block_size=32, batch=1, heads=1)
