"""The sync-free fast path of hierarchical attention: the selected branch's tables built on the device equal
``spattn.compile`` of the same selection; the scores from the compressed branch's lse equal the reference's
probabilities; one call does no host synchronisation once its shape is planned."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.hierarchical import hierarchical_attention, reference, selection_scores
from spattn.hierarchical.attention import choose_blocks, selected_layout
from spattn.hierarchical.common import compress
from spattn.hierarchical.plan import branch_plan
from spattn.hierarchical.scores import compressed_lse, token_scores_torch
from spattn.layout import tables
from spattn.patterns import BlockLayout, Sinks, Window

SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::unique", "aten::_unique2",
            "aten::masked_select", "aten::equal")


def _random_chosen(B, Hkv, NQ, count, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, Hkv, NQ, NQ, generator=g)
    config = spattn.Hierarchical(select_block=16, select_count=count)
    return choose_blocks(scores, config, torch.zeros(1, 1, NQ, NQ, dtype=torch.bool)), config


@pytest.mark.parametrize("B,H,Hkv,L,count,safeguard", [
    pytest.param(2, 4, 2, 100, 3, None, id="B2-L100-gqa-tail"),
    pytest.param(1, 3, 1, 64, 2, Sinks(5), id="B1-L64-mqa-sinks"),
    pytest.param(1, 2, 2, 81, 4, Sinks(16) | Window(20), id="B1-L81-mha-sinks-window-tail1"),
    pytest.param(1, 4, 2, 1, 2, None, id="L1"),
])
def test_selected_tables_equal_compile(B, H, Hkv, L, count, safeguard):
    NQ = -(-L // 16)
    chosen, config = _random_chosen(B, Hkv, NQ, count, seed=L)
    if safeguard is not None:
        config = config | safeguard
        kept = branch_plan(config, L, B, H, Hkv, "cpu").kept
        chosen = choose_blocks(torch.rand(B, Hkv, NQ, NQ), config, kept)
    got = branch_plan(config, L, B, H, Hkv, "cpu").selected(chosen)
    want = selected_layout(chosen, config, L, H)
    assert got.causal and got.q_len == L and got.block_size == 16
    assert torch.equal(got.to_dense().expand(B, H, L, L), want.to_dense().expand(B, H, L, L))
    assert torch.equal(got.block_status().expand(B, H, NQ, NQ), want.block_status().expand(B, H, NQ, NQ))
    # the transposed tables list the same blocks as the forward ones
    fwd = got.block_status().expand(B, H, NQ, NQ)
    status_t, _ = tables.unpack_tables(got.q_num_blocks, got.q_indices, got.full_q_num_blocks, got.full_q_indices,
                                       NQ, got.q_mask_ids, got.masks.shape[0])
    assert torch.equal(status_t.expand(B, H, NQ, NQ).transpose(-1, -2), fwd)


def test_per_head_safeguard_merges_at_query_heads():
    B, H, Hkv, L = 1, 4, 2, 96
    per_head = torch.zeros(1, H, 6, 6, dtype=torch.bool)
    per_head[0, 0, 3:, 0] = per_head[0, 1, 4:, 1] = per_head[0, 3, 5, 2] = True  # a different block per head
    config = spattn.Hierarchical(select_block=16, select_count=2) | BlockLayout(per_head, block=16)
    plan = branch_plan(config, L, B, H, Hkv, "cpu")
    assert plan.per_head
    chosen = choose_blocks(torch.rand(B, Hkv, 6, 6), config, plan.kept)
    assert torch.equal(plan.selected(chosen).to_dense(), selected_layout(chosen, config, L, H).to_dense())


def test_scores_from_lse_equal_reference_probabilities():
    B, H, Hkv, L, D = 2, 4, 2, 90, 16
    config = spattn.Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=16)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    kc = compress(k, config)
    lse = compressed_lse(q, kc, config, scale=0.25)
    assert torch.isinf(lse[..., :15]).all() and torch.isfinite(lse[..., 15:]).all()
    got = selection_scores(q, kc, config, scale=0.25, lse=lse)
    again = selection_scores(q, kc, config, scale=0.25)  # computes the lse itself
    torch.testing.assert_close(got, again)
    # the reference's own block scores (probabilities summed per group and query block, mapped by overlap)
    _, info = reference(q, k, v, config, scale=0.25, return_info=True)
    torch.testing.assert_close(choose_blocks(got, config, torch.zeros(1, 1, 6, 6, dtype=torch.bool)),
                               info["chosen"])
    token = token_scores_torch(q, kc, lse, config, scale=0.25)
    # every query row's probabilities sum to 1: a block sums to G x (its rows that see a compressed token)
    per_block = torch.zeros(6).index_add_(0, torch.arange(L) // 16, (torch.arange(L) >= 15).float()) * 2
    torch.testing.assert_close(token.sum(-1), per_block.expand(B, Hkv, 6).float())


def test_one_call_does_not_synchronise():
    """After the first call of a shape (the plan), the fast path's own work runs no op that reads a device value
    back (on the CPU the profiler sees the same aten ops a CUDA run would launch)."""
    B, H, Hkv, L, D = 1, 4, 2, 256, 16
    config = spattn.Hierarchical(compress_block=16, compress_stride=8, select_block=32, select_count=3,
                                 window=32) | Sinks(4)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (H, Hkv, Hkv))
    hierarchical_attention(q, k, v, config)  # plans the shape
    plan = branch_plan(config, L, B, H, Hkv, "cpu")
    kc = compress(k, config)
    lse = compressed_lse(q, kc, config, scale=0.25)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        scores = selection_scores(q, kc, config, scale=0.25, lse=lse, overlap=plan.overlap, backend="torch")
        layout = plan.selected(choose_blocks(scores, config, plan.kept))
        spattn.hierarchical.common.mix([q, q, q], config, None)
    names = {e.key for e in prof.key_averages()}
    assert not names & set(SYNC_OPS), names & set(SYNC_OPS)
    assert layout.kv_num_blocks.shape == (1, H, L // 32)
    assert branch_plan(config, L, B, H, Hkv, "cpu") is plan  # cached


def test_fast_equals_reference_with_tables_from_the_plan():
    B, H, Hkv, L, D = 1, 4, 2, 150, 16
    config = spattn.Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3,
                                 window=20, gates=(0.5, 1.0, 2.0)) | Sinks(3)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, L, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    out, info = hierarchical_attention(q, k, v, config, backend="reference", return_info=True)
    want = reference(q, k, v, config, chosen=info["chosen"])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(reference(q, k, v, config, return_info=True)[1]["chosen"], info["chosen"])
