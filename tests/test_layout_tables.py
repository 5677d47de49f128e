"""The layout codec (spattn.layout.tables): property tests against plain-Python readings of the tables."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.layout import EMPTY, FULL, PARTIAL, from_dense, tables

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def block_views(draw):
    """A random dense per-block view: status [Bl, Hl, NQ, NK], mask ids (-1 off partial blocks), masks."""
    Bl, Hl = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    NQ = draw(st.integers(1, 5))
    NK = NQ + draw(st.integers(0, 3))
    M, bs = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    status = torch.randint(0, 3, (Bl, Hl, NQ, NK), generator=g).to(torch.int8)
    ids = torch.randint(0, M, (Bl, Hl, NQ, NK), generator=g, dtype=torch.int32)
    ids = torch.where(status == PARTIAL, ids, -1)
    masks = torch.rand(M, bs, bs, generator=g) < 0.5
    return status, ids, masks


def table_entries(num, idx, mids, transposed):
    """{(b, h, query block, key block, mask id)} read entry by entry (mask id -1 for full tables)."""
    out = set()
    for b in range(num.shape[0]):
        for h in range(num.shape[1]):
            for r in range(num.shape[2]):
                for e in range(int(num[b, h, r])):
                    c, m = int(idx[b, h, r, e]), -1 if mids is None else int(mids[b, h, r, e])
                    out.add((b, h, c, r, m) if transposed else (b, h, r, c, m))
    return out


def layout_of(status, ids, masks, width=None):
    NQ, NK = status.shape[-2:]
    bs = masks.shape[-1]
    return spattn.Layout(q_len=NQ * bs, kv_len=NK * bs, block_size=bs,
                         **tables.pack(status, ids, masks, width=width))


@SETTINGS
@given(block_views())
def test_unpack_inverts_pack(view):
    status, ids, masks = view
    got_status, slot = tables.unpack(layout_of(status, ids, masks))
    assert torch.equal(got_status, status)
    assert torch.equal(tables.mask_ids(got_status, slot), ids)
    M = masks.shape[0]  # slots of full / empty blocks point at the all-True / all-False tiles
    assert torch.equal(slot[status == FULL], torch.full_like(slot[status == FULL], M))
    assert torch.equal(slot[status == EMPTY], torch.full_like(slot[status == EMPTY], M + 1))


@SETTINGS
@given(block_views())
def test_transposed_tables_agree(view):
    status, ids, masks = view
    lay = layout_of(status, ids, masks)
    want = {(b, h, q, k, int(ids[b, h, q, k])) for b, h, q, k in (status == PARTIAL).nonzero().tolist()}
    assert table_entries(lay.kv_num_blocks, lay.kv_indices, lay.kv_mask_ids, False) == want
    assert table_entries(lay.q_num_blocks, lay.q_indices, lay.q_mask_ids, True) == want
    want_full = {(b, h, q, k, -1) for b, h, q, k in (status == FULL).nonzero().tolist()}
    assert table_entries(lay.full_kv_num_blocks, lay.full_kv_indices, None, False) == want_full
    assert table_entries(lay.full_q_num_blocks, lay.full_q_indices, None, True) == want_full
    for num, idx in ((lay.kv_num_blocks, lay.kv_indices), (lay.q_num_blocks, lay.q_indices)):
        for n, row in zip(num.flatten().tolist(), idx.flatten(0, -2).tolist(), strict=True):
            assert row[:n] == sorted(row[:n]) and all(v == 0 for v in row[n:])  # ascending, zero padding


@SETTINGS
@given(block_views(), st.integers(0, 3))
def test_fixed_width_equals_data_width_after_trimming(view, extra):
    status, ids, masks = view
    NQ, NK = status.shape[-2:]
    sized = tables.pack(status, ids, masks)
    fixed = tables.pack(status, ids, masks, width=NK + extra)
    for name, table in sized.items():
        if name == "masks" or table.dim() == 3:
            assert torch.equal(fixed[name], table), name
            continue
        axis = NQ if name.startswith(("q_", "full_q_")) else NK
        assert fixed[name].shape[-1] == axis, name  # min(width, axis): no host read of the counts
        assert torch.equal(fixed[name][..., : table.shape[-1]], table), name
        assert not fixed[name][..., table.shape[-1]:].any(), name  # the rest is zero padding


@SETTINGS
@given(st.integers(1, 40), st.integers(0, 30), st.integers(1, 9), st.integers(1, 3), st.integers(1, 2),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_dedupe_keeps_token_masks_exact(q_len, extra, bs, heads, batch, density, seed):
    g = torch.Generator().manual_seed(seed)
    kv_len = q_len + extra
    mask = torch.rand(batch, heads, q_len, kv_len, generator=g) < density
    if seed % 3 == 0:  # repeated blocks: something for dedupe to merge
        mask = mask[:, :, :1].expand_as(mask).contiguous()
    lay = from_dense(mask, bs)
    assert torch.equal(lay.to_dense(), mask)
    flat = lay.masks.flatten(1)
    assert flat.shape[0] == torch.unique(flat, dim=0).shape[0]  # distinct masks
    status, _ = tables.unpack(lay)
    # the status is exact: empty blocks keep nothing, full ones every in-bounds pair
    for b, h, qb, kb in (status != PARTIAL).nonzero().tolist():
        tile = mask[b, h, qb * bs:(qb + 1) * bs, kb * bs:(kb + 1) * bs]
        assert bool(tile.all() if status[b, h, qb, kb] == FULL else not tile.any())


def test_classify_and_dedupe_on_hand_made_tiles():
    tiles = torch.tensor([[[1, 1], [1, 1]], [[1, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[1, 1], [0, 0]]],
                         dtype=torch.bool)
    q_block = torch.tensor([0, 0, 0, 1, 1])
    kv_block = torch.tensor([0, 1, 2, 0, 1])
    # q_len 3: query block 1 has one row; kv_len 5: key block 2 has one column
    status, clipped = tables.classify(tiles, q_block, kv_block, q_len=3, kv_len=5)
    assert status.tolist() == [FULL, PARTIAL, EMPTY, PARTIAL, FULL]  # the last is full within bounds
    masks, ids = tables.dedupe(clipped, status)
    assert masks.shape[0] == 1 and ids.tolist() == [-1, 0, -1, 0, -1]
    assert torch.equal(masks[0], tiles[1])


def test_pack_rejects_a_status_without_batch_and_head_axes():
    with pytest.raises(ValueError, match="status"):
        tables.pack(torch.zeros(2, 2, dtype=torch.int8), torch.zeros(2, 2, dtype=torch.int32),
                    torch.zeros(0, 1, 1, dtype=torch.bool))


def test_from_dense_rejects_bad_input():
    with pytest.raises(ValueError, match="mask"):
        from_dense(torch.zeros(4, 4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="block_size"):
        from_dense(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 2.0)


def test_spattn_patterns_layout_is_the_same_class():
    assert spattn.patterns.Layout is spattn.layout.Layout is spattn.Layout
