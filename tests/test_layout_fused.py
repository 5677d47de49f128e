"""The fused static build (spattn.patterns.fused) equals compile's general path block for block and token for
token, on block-exact patterns with and without the causal cut, awkward lengths, per-head and per-batch tables;
it runs without host synchronisation (it traces under torch.compile(fullgraph=True)); attention on its tables
passes the float64 oracle rule with NaN-poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.patterns.compile import _check_sizes, block_status, make_context
from spattn.patterns.compile import compile as compile_pattern
from spattn.patterns.fused import fused_layout, supports_fused_build
from spattn.testing import assert_within, brute_force_mask, dense_attention, plain_attention, poison_empty

BL, RB, ST = spattn.BlockLayout, spattn.RandomBlocks, spattn.Strided


def _blocks(*shape, p=0.3, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < p


# (pattern factory (NQ, NK, bs) -> Pattern, q_len, kv_len, block_size, causal, heads, batch)
CASES = [
    pytest.param(lambda nq, nk, bs: BL(_blocks(nq, nk), block=bs), 1000, 1000, 64, True, 1, 1, id="block-causal"),
    pytest.param(lambda nq, nk, bs: BL(_blocks(nq, nk), block=bs), 1000, 1000, 64, False, 1, 1, id="block-noncausal"),
    pytest.param(lambda nq, nk, bs: BL(_blocks(3, nq, nk), block=bs), 63, 300, 32, True, 3, 1, id="per-head-decodeish"),
    pytest.param(lambda nq, nk, bs: BL(_blocks(2, 2, nq, nk), block=bs), 129, 129, 16, True, 2, 2, id="per-batch"),
    pytest.param(lambda nq, nk, bs: BL(_blocks(nq, nk), block=bs) & spattn.Causal(), 200, 1025, 128, False, 1, 1,
                 id="and-causal-offset"),
    pytest.param(lambda nq, nk, bs: RB(2, seed=3, block=bs) | ST(3, block=bs), 512, 640, 32, True, 1, 1,
                 id="random|strided"),
    pytest.param(lambda nq, nk, bs: (BL(_blocks(nq, nk, p=0.6), block=bs) & BL(_blocks(nq, nk, p=0.6, seed=1),
                                                                               block=bs)) | spattn.Full(),
                 1, 1, 16, True, 1, 1, id="one-token"),
    pytest.param(lambda nq, nk, bs: BL(_blocks(nq, nk, p=0.0), block=bs), 100, 100, 32, True, 1, 1, id="empty"),
]


def _general(pattern, ctx_args):
    """compile's general path (analytic status, per-signature token masks, dedupe), the reference here."""
    full, ctx = make_context(pattern, **ctx_args)
    return full, ctx, block_status(full, ctx)


@pytest.mark.parametrize("make,Lq,Lk,bs,causal,H,B", CASES)
def test_fused_equals_general_compile(make, Lq, Lk, bs, causal, H, B):
    pattern = make(-(-Lq // bs), -(-Lk // bs), bs)
    args = dict(q_len=Lq, kv_len=Lk, causal=causal, block_size=bs, batch=B, heads=H, device="cpu", query=None,
                key=None)
    _, ctx = make_context(pattern, **args)
    assert supports_fused_build(pattern, ctx)
    got = fused_layout(pattern, ctx)
    _check_sizes(got.kv_num_blocks, B, H)
    assert got.info["builder"] == "fused"
    want = compile_pattern(pattern, Lq, Lk, causal=causal, block_size=bs, batch=B, heads=H)  # CPU: general path
    assert "builder" not in want.info
    assert torch.equal(got.block_status(), want.block_status())
    dense = got.to_dense()
    assert torch.equal(dense, want.to_dense())
    oracle = brute_force_mask(pattern, Lq, Lk, causal=causal, heads=H, batch=B)
    assert torch.equal(dense, oracle.expand_as(dense))
    # the transposed tables describe the same blocks as the forward ones
    for b in range(got.batch):
        for h in range(got.heads):
            fwd = {(int(q), int(k)) for q in range(got.num_q_blocks)
                   for k in got.kv_indices[b, h, q, : got.kv_num_blocks[b, h, q]]}
            bwd = {(int(q), int(k)) for k in range(got.num_kv_blocks)
                   for q in got.q_indices[b, h, k, : got.q_num_blocks[b, h, k]]}
            assert fwd == bwd


def test_fused_refuses_what_is_not_block_exact():
    _, ctx = make_context(BL(_blocks(4, 4), block=32), 128, 128, causal=True, block_size=64, batch=None,
                          heads=None, device="cpu", query=None, key=None)
    assert not supports_fused_build(BL(_blocks(4, 4), block=32), ctx)  # cells smaller than the kernel block
    assert not supports_fused_build(spattn.Sinks(4) | spattn.Window(8), ctx)
    # absolute rows not aligned to the blocks (offset 100 with 64-token blocks) take the general path
    _, ctx = make_context(RB(1, block=64), 28, 128, causal=True, block_size=64, batch=None, heads=None, device="cpu",
                          query=None, key=None)
    assert not supports_fused_build(RB(1, block=64), ctx)
    with pytest.raises(ValueError, match="block-exact"):
        fused_layout(spattn.Window(8), ctx)


def test_fused_build_has_no_host_sync():
    """fullgraph tracing fails on any data-dependent host read (nonzero, unique, int(tensor))."""
    torch._dynamo.reset()
    blocks = _blocks(8, 8)
    pattern = BL(blocks, block=32)
    _, ctx = make_context(pattern, 256, 256, causal=True, block_size=32, batch=None, heads=None, device="cpu",
                          query=None, key=None)
    want = fused_layout(pattern, ctx)  # also builds the cached causal template (host work, once per shape)

    def build(blocks):
        _, ctx = make_context(BL(blocks, block=32), 256, 256, causal=True, block_size=32, batch=None, heads=None,
                              device="cpu", query=None, key=None)
        return tuple(fused_layout(BL(blocks, block=32), ctx).tables().values())

    got = torch.compile(build, fullgraph=True, backend="eager")(blocks)
    for a, b in zip(got, want.tables().values(), strict=True):
        assert torch.equal(a, b)


def test_attention_on_fused_tables_passes_the_oracle():
    torch.manual_seed(0)
    B, H, L, D, bs = 2, 2, 200, 16, 32
    pattern = BL(_blocks(H, -(-L // bs), -(-L // bs), p=0.4), block=bs)
    _, ctx = make_context(pattern, L, L, causal=True, block_size=bs, batch=B, heads=H, device="cpu", query=None,
                          key=None)
    layout = fused_layout(pattern, ctx)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    allowed = layout.to_dense()
    with poison_empty():
        out = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    golden, _ = dense_attention(q, k, v, allowed, D**-0.5)
    base, _ = plain_attention(q, k, v, allowed, D**-0.5)
    assert not out.isnan().any()
    assert_within(out, golden, base)
