"""TopK / TopP patterns: safeguards, dense limit, needle, batch / varlen / GQA invariance, autograd, JSON."""

import json

import pytest
import torch

import spattn
from spattn.patterns.compile import brute_force_mask
from spattn.selectors import TopK, TopP
from spattn.testing import assert_within, dense_attention

SELECTORS = [("pooled", ()), ("vertical_slash", (("last", 16),)), ("antidiagonal", (("stride", 8),)), ("bounds", ()),
             ("probe", (("queries", 4),))]
IDS = [s for s, _ in SELECTORS]
BS = 32


def _dense(pattern, q, k, causal=True, bs=BS):
    layout = spattn.compile(pattern, q.shape[2], k.shape[2], causal=causal, block_size=bs, batch=q.shape[0],
                            heads=q.shape[1], query=q, key=k)
    return layout, layout.to_dense().expand(q.shape[0], q.shape[1], -1, -1)


@pytest.mark.parametrize("name,opts", SELECTORS, ids=IDS)
def test_safeguards_and_keep_tokens_always_present(name, opts):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 200, 16)
    safe = spattn.Sinks(5) | spattn.Window(40)
    pattern = safe | TopK(name, 1, options=opts, keep=(77, 150))
    _, got = _dense(pattern, q, k)
    want = brute_force_mask(safe, 200, causal=True)
    assert (got >= want).all()
    i = torch.arange(200)[:, None]
    for t in (77, 150):
        assert (got[..., t] == (i[:, 0] >= t)).all()  # every query at or after t sees it, none before


@pytest.mark.parametrize("name,opts", SELECTORS, ids=IDS)
def test_top_k_all_blocks_is_dense(name, opts):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 2, 150, 16), torch.randn(1, 1, 150, 16), torch.randn(1, 1, 150, 16)
    pattern = TopK(name, 999, options=opts)
    layout, mask = _dense(pattern, q, k)
    assert torch.equal(mask[0, 0], torch.ones(150, 150, dtype=torch.bool).tril())
    out = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    full = spattn.attention(q, k, v, spattn.compile(spattn.Full(), 150, causal=True, block_size=BS), causal=True,
                            backend="reference")
    # the same keys as Full(): within the tolerance rule of the float64 oracle (a dynamic layout's tables are NK
    # wide, so the reference backend sums its padded rows in another order than Full()'s; not bitwise equal)
    golden, _ = dense_attention(q, k, v, mask, scale=16 ** -0.5)
    assert_within(out, golden, full, what="TopK(all) vs the float64 oracle, Full() as baseline")
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.expand(1, 2, -1, -1), v.expand(1, 2, -1, -1),
                                                            is_causal=True)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def _needle(B=1, H=2, Hkv=1, L=512, D=16, needle=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = 0.3 * torch.randn(B, H, L, D, generator=g)
    k = 0.3 * torch.randn(B, Hkv, L, D, generator=g)
    u = torch.zeros(D)
    u[3] = 5.0
    q = q + u
    k[:, :, needle * BS:(needle + 1) * BS] += u
    return q, k


@pytest.mark.parametrize("name,opts", SELECTORS, ids=IDS)
@pytest.mark.parametrize("rule", ["topk", "topp"])
def test_needle_far_outside_the_window_is_found(name, opts, rule):
    q, k = _needle()
    dyn = TopK(name, 1, options=opts) if rule == "topk" else TopP(name, 0.5, options=opts)
    layout, mask = _dense(spattn.Sinks(4) | spattn.Window(64) | dyn, q, k)
    status = layout.block_status()
    far = torch.arange(layout.num_q_blocks) >= 5 + 4  # query blocks where the needle is outside the window
    assert (status[..., far, 5] == spattn.patterns.FULL).all()
    # it really carries most of the mass there, and the layout keeps it
    from spattn.selectors import get_selector

    scores = get_selector(name, **dict(opts)).scores(q, k, block_size=BS, causal=True)
    outside = torch.arange(16)[None, :] < torch.arange(16)[:, None] - 2  # key blocks outside the window
    best = torch.where(outside, scores, -1.0).argmax(-1)
    assert (best[..., far] == 5).all()
    # the needle carries most of the true mass of those rows, and the layout keeps it
    logits = (q @ k.expand_as(q).transpose(-1, -2)) / 4.0
    probs = torch.softmax(logits.masked_fill(~torch.ones(512, 512, dtype=torch.bool).tril(), -torch.inf), -1)
    rows = far.repeat_interleave(BS)
    assert (probs[..., rows, 5 * BS:6 * BS].sum(-1) > 0.5).all()
    assert ((probs * mask)[..., rows, :].sum(-1) > 0.9).all()


@pytest.mark.parametrize("name,opts", SELECTORS, ids=IDS)
def test_batch_equals_one_by_one(name, opts):
    torch.manual_seed(2)
    q, k = torch.randn(3, 4, 190, 16) * 2, torch.randn(3, 2, 190, 16) * 2
    pattern = spattn.Sinks(4) | spattn.Window(32) | TopP(name, 0.6, options=opts)
    _, batched = _dense(pattern, q, k)
    for b in range(3):
        _, one = _dense(pattern, q[b:b + 1], k[b:b + 1])
        assert torch.equal(batched[b:b + 1], one)


@pytest.mark.parametrize("name,opts", [s for s in SELECTORS if s[0] != "vertical_slash"],
                         ids=[s for s in IDS if s != "vertical_slash"])
def test_varlen_documents_equal_one_by_one(name, opts):
    torch.manual_seed(3)
    lengths = [96, 160, 64]
    L = sum(lengths)
    q, k = torch.randn(1, 2, L, 16) * 2, torch.randn(1, 2, L, 16) * 2
    ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    doc = spattn.Document(ids)
    packed = doc & (spattn.Window(32) | TopK(name, 2, options=opts, within=doc))
    _, got = _dense(packed, q, k)
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        _, one = _dense(spattn.Window(32) | TopK(name, 2, options=opts), q[:, :, sl], k[:, :, sl])
        assert torch.equal(got[..., sl, sl], one)
        assert not got[..., sl, :start].any()
        start += n


@pytest.mark.parametrize("name,opts", SELECTORS, ids=IDS)
def test_gqa_sharing(name, opts):
    torch.manual_seed(4)
    q, k = torch.randn(1, 4, 160, 16) * 2, torch.randn(1, 2, 160, 16) * 2
    _, grouped = _dense(TopK(name, 1, options=opts), q, k)
    assert torch.equal(grouped[:, 0], grouped[:, 1]) and torch.equal(grouped[:, 2], grouped[:, 3])
    _, per_head = _dense(TopK(name, 1, options=opts, sharing="head"), q, k)
    for h in range(4):
        _, one = _dense(TopK(name, 1, options=opts), q[:, h:h + 1], k[:, h // 2:h // 2 + 1])
        assert torch.equal(per_head[:, h:h + 1], one)


def test_per_head_budget_and_estimated_mass():
    torch.manual_seed(5)
    q, k = torch.randn(2, 2, 256, 16) * 2, torch.randn(2, 2, 256, 16) * 2
    layout, _ = _dense(spattn.Window(32) | TopP("pooled", (0.5, 0.95), sharing="head"), q, k)
    est = layout.info["estimated_mass_per_block"]
    assert est.shape == (2, 2, 8) and layout.info["estimated_mass"].shape == (2, 2)
    assert (est[:, 0] >= 0.5 - 1e-6).all() and (est[:, 1] >= 0.95 - 1e-6).all()
    assert (layout.info["selected_blocks"][:, 0] <= layout.info["selected_blocks"][:, 1]).all()
    layout, _ = _dense(TopK("pooled", 8, max_keys=2 * BS), q, k)
    assert (layout.info["selected_blocks"] <= 2).all()


def test_autograd_flows_and_usage():
    torch.manual_seed(6)
    q = torch.randn(1, 4, 300, 16, requires_grad=True)
    k = torch.randn(1, 2, 300, 16, requires_grad=True)
    v = torch.randn(1, 2, 300, 16, requires_grad=True)
    pattern = spattn.Sinks(8) | spattn.Window(64) | TopP("pooled", 0.9)
    out = spattn.attention(q, k, v, pattern, causal=True, block_size=BS, backend="reference")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    layout = spattn.compile(pattern, 300, 300, causal=True, block_size=BS, query=q, key=k)
    out2 = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    grads2 = torch.autograd.grad(out2.square().sum(), (q, k, v))
    # the pattern goes through the cached LayoutBuilder (same pairs as compile, wider tables: the blockwise
    # reference sums in another order, so equal to rounding, not bit for bit)
    torch.testing.assert_close(out, out2, atol=1e-6, rtol=1e-6)
    for a, b in zip(grads, grads2, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    usage = spattn.Sinks(64) | spattn.Window(1024) | TopP("pooled", 0.95)
    out3 = spattn.attention(q.detach(), k.detach(), v.detach(), usage, causal=True)
    assert out3.shape == (1, 4, 300, 16) and torch.isfinite(out3).all()


def test_json_round_trip_and_errors():
    pattern = spattn.Sinks(4) | TopK("antidiagonal", (1, 2), options={"stride": 16}, keep=[9, 3], max_keys=512,
                                     sharing="head", within=spattn.Document(torch.tensor([[0, 0, 1]])))
    again = spattn.pattern_from_dict(json.loads(json.dumps(pattern.to_dict())))
    assert again.parts[1].options == (("stride", 16),) and again.parts[1].keep == (3, 9)
    assert again.parts[1].blocks == (1, 2) and again.parts[1].sharing == "head"
    p = TopP("vertical_slash", 0.9, options={"last": 32})
    assert spattn.pattern_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    from spattn.selectors import get_selector

    assert TopK(get_selector("antidiagonal", stride=4), 2) == TopK("antidiagonal", 2, options={"stride": 4})
    with pytest.raises(ValueError, match="unknown selector"):
        TopK("nope", 1)
    with pytest.raises(ValueError, match="mass"):
        TopP("pooled", 1.5)
    with pytest.raises(ValueError, match="mass"):
        TopP("pooled", 0.0)
    with pytest.raises(TypeError, match="blocks"):
        TopK("pooled", 1.5)
    with pytest.raises(ValueError, match="sharing"):
        TopK("pooled", 1, sharing="all")
    with pytest.raises(ValueError, match="query= and key="):
        spattn.compile(TopK("pooled", 1), 64)


def test_non_contiguous_inputs_select_the_same_blocks():
    torch.manual_seed(7)
    q, k = torch.randn(1, 2, 200, 16) * 2, torch.randn(1, 2, 200, 16) * 2
    qt, kt = q.transpose(2, 3).contiguous().transpose(2, 3), k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    for name, opts in SELECTORS:
        _, a = _dense(TopK(name, 2, options=opts), q, k)
        _, b = _dense(TopK(name, 2, options=opts), qt, kt)
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_dynamic_layout_runs_in_other_backends(backend):
    torch.manual_seed(8)
    q, k, v = torch.randn(1, 4, 160, 16), torch.randn(1, 2, 160, 16), torch.randn(1, 2, 160, 16)
    pattern = spattn.Sinks(4) | spattn.Window(32) | TopK("bounds", 1, keep=(50,))
    layout = spattn.compile(pattern, 160, 160, causal=True, block_size=BS, query=q, key=k)
    ref = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    got = spattn.attention(q, k, v, layout, causal=True, backend=backend)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
