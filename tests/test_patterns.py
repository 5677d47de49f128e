"""Compiled layouts are exactly the pairs the pattern semantics allow (property tests)."""

import json

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns import brute_force_mask

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ independent spec (pure Python)
def spec(p, b, h, i, j, q_len, kv_len):
    """The issue's semantics, written out by hand for the primitives (i absolute query position)."""
    if isinstance(p, spattn.Causal):
        return j <= i
    if isinstance(p, spattn.Full):
        return True
    if isinstance(p, spattn.Window):
        return i - p.left <= j <= i + p.right
    if isinstance(p, spattn.Sinks):
        return j < p.n
    if isinstance(p, spattn.Global):
        return i in p.tokens or j in p.tokens
    if isinstance(p, spattn.Dilated):
        return i - p.left <= j <= i + p.right and (i - j) % p.dilation == 0
    if isinstance(p, spattn.Strided):
        return ((i // p.block) - (j // p.block)) % p.stride == 0
    if isinstance(p, spattn.Document):
        ids = p.segment_ids[b if p.segment_ids.shape[0] > 1 else 0]
        return bool(ids[i] == ids[j]) and int(ids[i]) >= 0
    if isinstance(p, spattn.Union):
        return any(spec(c, b, h, i, j, q_len, kv_len) for c in p.parts)
    if isinstance(p, spattn.Intersection):
        return all(spec(c, b, h, i, j, q_len, kv_len) for c in p.parts)
    if isinstance(p, spattn.PerHead):
        return spec(p.patterns[h], b, h, i, j, q_len, kv_len)
    raise NotImplementedError(type(p))


def spec_dense(p, q_len, kv_len, causal, batch=1, heads=1):
    out = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    off = kv_len - q_len
    for b in range(batch):
        for h in range(heads):
            for qi in range(q_len):
                for j in range(kv_len):
                    i = qi + off
                    out[b, h, qi, j] = spec(p, b, h, i, j, q_len, kv_len) and (not causal or j <= i)
    return out


# ------------------------------------------------------------------ strategies
def primitives(kv_len_max=96):
    return st.one_of(
        st.just(spattn.Causal()),
        st.builds(spattn.Window, st.integers(0, 40), st.integers(0, 20)),
        st.builds(spattn.Sinks, st.integers(0, 40)),
        st.builds(lambda t: spattn.Global(tuple(t)), st.lists(st.integers(0, kv_len_max - 1), max_size=4)),
        st.builds(spattn.Dilated, st.integers(0, 50), st.integers(1, 5), st.integers(0, 10)),
        st.builds(spattn.Strided, st.integers(1, 7), st.integers(1, 20)),
        st.builds(spattn.RandomBlocks, st.integers(0, 3), st.integers(0, 5), st.sampled_from([8, 16, 24])),
        st.builds(lambda n, s: spattn.Budgeted(n, sinks=s), st.integers(8, 120), st.integers(0, 16)),
    )


def compositions():
    return st.recursive(
        primitives(),
        lambda inner: st.one_of(
            st.builds(lambda a, b: a | b, inner, inner),
            st.builds(lambda a, b: a & b, inner, inner),
        ),
        max_leaves=4,
    )


shapes = st.tuples(st.integers(1, 96), st.integers(0, 40), st.sampled_from([8, 16, 32]), st.booleans())


def _check_exact(pattern, q_len, kv_len, bs, causal, **kw):
    layout = spattn.compile(pattern, q_len, kv_len, causal=causal, block_size=bs, **kw)
    dense = layout.to_dense()
    ref = brute_force_mask(pattern, q_len, kv_len, causal=causal, block_size=bs, **kw)
    assert torch.equal(dense, ref.expand_as(dense)), (pattern, q_len, kv_len, bs, causal)
    return layout, dense


@SETTINGS
@given(compositions(), shapes)
@example(spattn.Sinks(25), (25, 21, 8, True))  # a signature once collided with a status code
def test_compile_matches_brute_force(pattern, shape):
    q_len, extra, bs, causal = shape
    _check_exact(pattern, q_len, q_len + extra, bs, causal)


@SETTINGS
@given(st.recursive(st.one_of(
    st.just(spattn.Causal()),
    st.builds(spattn.Window, st.integers(0, 40), st.integers(0, 20)),
    st.builds(spattn.Sinks, st.integers(0, 40)),
    st.builds(lambda t: spattn.Global(tuple(t)), st.lists(st.integers(0, 60), max_size=3)),
    st.builds(spattn.Dilated, st.integers(0, 50), st.integers(1, 5), st.integers(0, 10)),
    st.builds(spattn.Strided, st.integers(1, 7), st.integers(1, 20)),
), lambda inner: st.builds(lambda a, b, u: a | b if u else a & b, inner, inner, st.booleans()), max_leaves=3),
    st.integers(1, 60), st.integers(0, 20), st.sampled_from([8, 16]), st.booleans())
def test_brute_force_matches_hand_written_semantics(pattern, q_len, extra, bs, causal):
    kv_len = q_len + extra
    layout = spattn.compile(pattern, q_len, kv_len, causal=causal, block_size=bs)
    assert torch.equal(layout.to_dense()[0, 0], spec_dense(pattern, q_len, kv_len, causal)[0, 0])


@SETTINGS
@given(st.lists(st.integers(-1, 3), min_size=2, max_size=90), st.sampled_from([8, 16]), st.booleans(), st.integers(1, 90))
def test_document_varlen_exact(ids, bs, causal, q_len):
    kv_len = len(ids)
    q_len = min(q_len, kv_len)
    seg = torch.tensor([sorted(ids), ids])  # one packed (contiguous) and one scattered sequence
    pattern = spattn.Document(seg) | spattn.Sinks(0)
    layout, dense = _check_exact(pattern, q_len, kv_len, bs, causal, batch=2)
    assert torch.equal(dense, spec_dense(spattn.Document(seg), q_len, kv_len, causal, batch=2))


@SETTINGS
@given(compositions(), compositions(), shapes)
def test_per_head(p0, p1, shape):
    q_len, extra, bs, causal = shape
    _, dense = _check_exact(spattn.PerHead((p0, p1)), q_len, q_len + extra, bs, causal, heads=2)
    one = spattn.compile(p1, q_len, q_len + extra, causal=causal, block_size=bs, heads=2).to_dense()
    assert torch.equal(dense[:, 1], one[:, 0])


@SETTINGS
@given(compositions(), compositions(), shapes)
def test_union_and_intersection_algebra(a, b, shape):
    q_len, extra, bs, causal = shape
    kv_len = q_len + extra
    da = spattn.compile(a, q_len, kv_len, causal=causal, block_size=bs).to_dense()
    db = spattn.compile(b, q_len, kv_len, causal=causal, block_size=bs).to_dense()
    du = spattn.compile(a | b, q_len, kv_len, causal=causal, block_size=bs).to_dense()
    di = spattn.compile(a & b, q_len, kv_len, causal=causal, block_size=bs).to_dense()
    assert torch.equal(du, da | db)
    assert torch.equal(di, da & db)


@SETTINGS
@given(compositions())
def test_json_round_trip(pattern):
    d = pattern.to_dict()
    again = spattn.pattern_from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    a = spattn.compile(pattern, 70, 90, causal=True, block_size=16).to_dense()
    b = spattn.compile(again, 70, 90, causal=True, block_size=16).to_dense()
    assert torch.equal(a, b)


def test_json_round_trip_tensors_and_heads():
    p = spattn.PerHead((spattn.Document(torch.tensor([[0, 0, 1, 1, -1]])), spattn.BlockLayout(torch.eye(3, dtype=torch.bool), block=2)))
    d = json.loads(json.dumps(p.to_dict()))
    again = spattn.pattern_from_dict(d)
    assert torch.equal(spattn.compile(again, 5, heads=2, block_size=2).to_dense(), spattn.compile(p, 5, heads=2, block_size=2).to_dense())


@SETTINGS
@given(compositions(), shapes)
def test_transposed_tables_agree(pattern, shape):
    q_len, extra, bs, causal = shape
    layout = spattn.compile(pattern, q_len, q_len + extra, causal=causal, block_size=bs)

    def entries(num, idx, mids, swap):
        out = set()
        for b in range(num.shape[0]):
            for h in range(num.shape[1]):
                for r in range(num.shape[2]):
                    for e in range(int(num[b, h, r])):
                        c = int(idx[b, h, r, e])
                        m = -1 if mids is None else int(mids[b, h, r, e])
                        out.add((b, h, c, r, m) if swap else (b, h, r, c, m))
        return out

    assert entries(layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids, False) == entries(
        layout.q_num_blocks, layout.q_indices, layout.q_mask_ids, True)
    assert entries(layout.full_kv_num_blocks, layout.full_kv_indices, None, False) == entries(
        layout.full_q_num_blocks, layout.full_q_indices, None, True)
    # indices sorted ascending and partial masks neither empty nor full
    for num, idx in ((layout.kv_num_blocks, layout.kv_indices), (layout.full_kv_num_blocks, layout.full_kv_indices)):
        for row_n, row in zip(num.flatten().tolist(), idx.flatten(0, -2).tolist()):
            assert row[:row_n] == sorted(row[:row_n])
    # every partial entry's mask keeps some but not all of the block's in-bounds pairs
    for b in range(layout.batch):
        for h in range(layout.heads):
            for qb in range(layout.num_q_blocks):
                for e in range(int(layout.kv_num_blocks[b, h, qb])):
                    kb = int(layout.kv_indices[b, h, qb, e])
                    rows = min(bs, layout.q_len - qb * bs)
                    cols = min(bs, layout.kv_len - kb * bs)
                    mask = layout.masks[int(layout.kv_mask_ids[b, h, qb, e])]
                    assert 0 < int(mask[:rows, :cols].sum()) < rows * cols, (b, h, qb, kb)
                    assert not mask[rows:].any() and not mask[:, cols:].any()  # nothing out of bounds


@settings(max_examples=25, deadline=None)
@given(compositions(), shapes)
def test_block_mask_round_trip(pattern, shape):
    pytest.importorskip("torch.nn.attention.flex_attention")
    q_len, extra, bs, causal = shape
    if bs < 16:
        bs = 16
    layout = spattn.compile(pattern, q_len, q_len + extra, causal=causal, block_size=bs)
    back = spattn.Layout.from_block_mask(layout.to_block_mask())
    assert torch.equal(back.to_dense(), layout.to_dense())
    assert torch.equal(back.block_status(), layout.block_status())


def test_from_torch_create_block_mask():
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    bm = fa.create_block_mask(lambda b, h, q, k: (q >= k) & ((q - k < 40) | (k < 8)), None, None, 200, 200,
                              device="cpu", BLOCK_SIZE=32)
    layout = spattn.Layout.from_block_mask(bm)
    ref = spattn.compile(spattn.Sinks(8) | spattn.Window(39), 200, causal=True, block_size=32)
    assert torch.equal(layout.to_dense(), ref.to_dense())


@pytest.mark.parametrize("L", [100, 1000, 5000, 33000])
@pytest.mark.parametrize("budget", [64, 300, 2048])
def test_budgeted_keeps_budget(L, budget):
    bs = 128
    layout = spattn.compile(spattn.Budgeted(budget), L, causal=False, block_size=bs)
    per_query = layout.keys_per_query()  # mean per query block; max per query is bounded by block max
    dense_rows = None
    if L <= 1000:
        dense_rows = layout.to_dense().sum(-1).max().item()
        assert dense_rows <= min(L, budget) + bs
    # analytic bound on the block mean holds at every length
    assert per_query.max().item() <= min(L, budget) + bs
    if L > budget:
        assert per_query[..., -1].min().item() >= 0.4 * budget  # the budget is spent where the past is long


def test_density_flops_and_repr():
    layout = spattn.compile(spattn.Window(15), 64, causal=True, block_size=16)
    dense = layout.to_dense()
    causal = torch.ones(64, 64, dtype=torch.bool).tril()
    assert layout.density() == pytest.approx(dense.sum().item() / causal.sum().item())  # against causal pairs
    assert layout.flops(64) == pytest.approx(4 * dense.sum().item() * 64)
    assert layout.density("block") == layout.block_density() == pytest.approx(7 / 10)  # 4 + 3 of 10 causal blocks
    assert layout.flops(64, level="block") == pytest.approx(4 * 7 * 16 * 16 * 64)
    assert "density=" in repr(layout) and "64" in repr(layout)
    grid = layout.to_string()
    assert set(grid) <= set("█▒░\n") and grid.count("\n") == 3


def test_causal_never_leaks_future():
    layout = spattn.compile(spattn.Sinks(64) | spattn.Window(100, 100), 300, causal=True, block_size=32)
    dense = layout.to_dense()[0, 0]
    assert not torch.triu(dense, diagonal=1).any()


def test_long_compile_is_block_linear():
    import time

    t = time.perf_counter()
    layout = spattn.compile(spattn.Sinks(64) | spattn.Window(4096), 131072, causal=True)
    elapsed = time.perf_counter() - t
    assert layout.masks.shape[0] <= 8  # masks deduplicated: memory proportional to kept blocks
    assert layout.kv_indices.shape[-1] <= 4 and layout.full_kv_indices.shape[-1] <= 34
    assert elapsed < 30  # generous: a correctness-of-complexity check, not a speed target


def test_plot_draws_the_block_status(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    layout = spattn.compile(spattn.Sinks(16) | spattn.Window(64), 512, causal=True, block_size=32)
    ax = layout.plot()
    image = ax.get_images()[0].get_array()
    assert image.shape == (16, 16)
    assert torch.equal(torch.as_tensor(image.data), layout.block_status()[0, 0].to(torch.as_tensor(image.data).dtype))
    ax.figure.savefig(tmp_path / "layout.png")
    assert (tmp_path / "layout.png").stat().st_size > 1000


def test_compile_hands_dynamic_parts_what_the_static_parts_keep_and_allow():
    """Phase 2 of compile: a dynamic part gets kept = the static parts of its union, allowed = the static parts
    of the enclosing intersection (with causal), as int8 block status."""
    import dataclasses
    from typing import ClassVar

    from spattn.patterns.base import Context
    from spattn.patterns.builtin import BlockSelection

    seen = {}

    @dataclasses.dataclass(frozen=True)
    class Recorder(BlockSelection):
        block: int = 8
        dynamic: ClassVar[bool] = True
        kind: ClassVar[str] = "test_recorder"

        def selection(self, ctx, *, kept, allowed):
            seen["kept"], seen["allowed"] = kept, allowed
            return torch.eye(ctx.num_q_blocks, ctx.num_kv_blocks, dtype=torch.bool)

    q = k = torch.zeros(1, 1, 32, 4)
    pattern = (spattn.Sinks(8) | Recorder()) & spattn.Window(12)
    layout = spattn.compile(pattern, 32, causal=True, block_size=8, query=q, key=k)
    ctx = Context(32, 32, 8, torch.device("cpu"))
    assert torch.equal(seen["kept"], spattn.Sinks(8).status(ctx))
    want_allowed = torch.minimum(spattn.Window(12).status(ctx), spattn.Causal().status(ctx))
    assert torch.equal(seen["allowed"], want_allowed)
    ref = brute_force_mask(pattern, 32, causal=True, block_size=8, query=q, key=k)
    assert torch.equal(layout.to_dense(), ref)


def test_top_k_and_top_p_round_trip_through_pattern_from_dict():
    import importlib

    from spattn.patterns import serialize

    for kind, module in serialize._DEFINED_IN.items():  # the lazily imported kinds register themselves
        cls = getattr(importlib.import_module(module), {"top_k": "TopK", "top_p": "TopP"}[kind])
        assert cls.kind == kind
    pattern = spattn.Sinks(4) | spattn.TopK("pooled", 2) | spattn.TopP("pooled", 0.5)
    assert spattn.pattern_from_dict(json.loads(json.dumps(pattern.to_dict()))) == pattern
