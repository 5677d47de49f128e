"""Issue 11, item 12: BlockMask interop with masks written for other projects."""

from __future__ import annotations

import warnings

import pytest
import torch

import spattn
from spattn.testing import dense_attention

fa = pytest.importorskip("torch.nn.attention.flex_attention")


def test_mask_mod_never_called_past_the_sequence_end():
    doc = torch.tensor([0] * 100 + [1] * 157)  # indexing past 257 raises IndexError

    def mask_mod(b, h, q, k):
        return doc[q] == doc[k]

    bm = fa.create_block_mask(mask_mod, None, None, 257, 257, device="cpu")
    layout = spattn.Layout.from_block_mask(bm)
    want = doc[:, None] == doc[None, :]
    assert torch.equal(layout.to_dense()[0, 0], want)


def test_mask_mod_argument_resolves_partial_blocks_and_a_missing_one_warns():
    mask = torch.ones(64, 64, dtype=torch.bool).tril()
    layout = spattn.compile(spattn.Causal(), 64, block_size=16)
    tables = layout.to_block_mask()
    bare = fa.BlockMask.from_kv_blocks(tables.kv_num_blocks, tables.kv_indices, tables.full_kv_num_blocks,
                                       tables.full_kv_indices, BLOCK_SIZE=16, seq_lengths=(64, 64))
    with pytest.warns(UserWarning, match="no mask_mod"):
        coarse = spattn.Layout.from_block_mask(bare)
    assert coarse.to_dense()[0, 0].sum() > mask.sum()  # partial blocks taken as full, said out loud
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = spattn.Layout.from_block_mask(bare, mask_mod=lambda b, h, q, k: q >= k)
    assert torch.equal(exact.to_dense()[0, 0], mask)
    with pytest.raises(TypeError, match="mask_mod"):
        spattn.Layout.from_block_mask(bare, mask_mod=3)
    with pytest.raises(TypeError):
        spattn.Layout.from_block_mask(bare, mask_mod_exact=False)  # the keyword that did nothing is gone


def test_cross_attention_block_mask_runs():
    Lq, Lk = 300, 192

    def mask_mod(b, h, q, k):
        return (q // 3) >= k  # a few partial blocks, more queries than keys

    bm = fa.create_block_mask(mask_mod, None, None, Lq, Lk, device="cpu", BLOCK_SIZE=64)
    layout = spattn.Layout.from_block_mask(bm)
    assert (layout.q_len, layout.kv_len) == (Lq, Lk)
    q, k, v = torch.randn(1, 2, Lq, 16), torch.randn(1, 2, Lk, 16), torch.randn(1, 2, Lk, 16)
    want, _ = dense_attention(q, k, v, layout.to_dense())
    for backend in ("reference", "dense"):
        out = spattn.attention(q, k, v, layout, backend=backend)
        torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="key length"):
        spattn.attention(q, k, v, spattn.Full())  # compiling a pattern keeps the bottom-right rule
