"""``spattn.attention(q, k, v, dynamic_pattern)`` through the cached LayoutBuilder (Note [dynamic path] in
``ops/attention/api.py``), and ``CapturedAttention``'s argument checks (its capture runs on CUDA only)."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.ops.attention import api
from spattn.selectors import LayoutBuilder, TopK, TopP
from spattn.testing import assert_within, dense_attention, plain_attention

CASES = [
    pytest.param(lambda: spattn.Sinks(5) | spattn.Window(40) | TopP("pooled", 0.8), 4, 2, 230, True,
                 id="topp-gqa-causal"),
    pytest.param(lambda: spattn.Sinks(3) | TopK("pooled", 2), 2, 2, 200, False, id="topk-noncausal"),
    pytest.param(lambda: spattn.Window(33) | TopP("vertical_slash", 0.9, sharing="head"), 4, 1, 161, True,
                 id="per-head-mqa"),
]


@pytest.fixture(autouse=True)
def _fresh_cache():
    api._builders.clear()
    yield
    api._builders.clear()


def _with_grads(fn, q, k, v, do):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    (out.double() * do.double()).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("make,H,Hkv,L,causal", CASES)
def test_dynamic_pattern_takes_the_builder_and_equals_compile(make, H, Hkv, L, causal):
    torch.manual_seed(0)
    q = (torch.randn(2, H, L, 16) * 2).requires_grad_()
    k = (torch.randn(2, Hkv, L, 16) * 2).requires_grad_()
    v = torch.randn(2, Hkv, L, 16, requires_grad=True)
    out = spattn.attention(q, k, v, make(), causal=causal, block_size=32, backend="reference")
    (builder,) = api._builders.values()
    assert isinstance(builder, LayoutBuilder)
    # the layout it built equals compile's, block for block and token for token
    ref = spattn.compile(make(), L, L, causal=causal, block_size=32, batch=2, heads=H, query=q, key=k)
    got = builder.build(q, k)
    assert torch.equal(got.block_status(), ref.block_status().expand(2, H, -1, -1))
    assert torch.equal(got.to_dense(), ref.to_dense().expand(2, H, -1, -1))
    # and the attention against the independent float64 oracle on compile's token mask, forward and backward
    allowed, scale = ref.to_dense(), 16**-0.5
    do = torch.randn(2, H, L, 16)
    fast = _with_grads(lambda q, k, v: spattn.attention(q, k, v, make(), causal=causal, block_size=32,
                                                        backend="reference"), q, k, v, do)
    golden = _with_grads(lambda q, k, v: dense_attention(q, k, v, allowed, scale)[0], q, k, v, do)
    base = _with_grads(lambda q, k, v: plain_attention(q, k, v, allowed, scale)[0], q, k, v, do)
    for name, a, g, b in zip(("out", "dq", "dk", "dv"), fast, golden, base, strict=True):
        assert_within(a, g, b, what=name)
    want = spattn.attention(q, k, v, ref, causal=causal, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    # an equal pattern built again hits the same cached builder
    spattn.attention(q, k, v, make(), causal=causal, block_size=32, backend="reference")
    assert list(api._builders.values()) == [builder]


def test_patterns_the_builder_refuses_take_compile():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    for pattern in (spattn.Sinks(4) | TopK("pooled", 2, block=16),  # sub-block selection
                    TopK("pooled", 1, keep=(3,)),                   # always-kept tokens
                    spattn.Sinks(4) | spattn.Window(16)):            # static: never looks for a builder
        out = spattn.attention(q, k, v, pattern, causal=True, block_size=32, backend="reference")
        ref = spattn.compile(pattern, 128, 128, causal=True, block_size=32, batch=1, heads=2, query=q, key=k)
        torch.testing.assert_close(out, spattn.attention(q, k, v, ref, causal=True, backend="reference"))
    assert all(b is None for b in api._builders.values()) and len(api._builders) == 2


def test_builder_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(api, "_BUILDERS_KEPT", 2)
    q, k, v = (torch.randn(1, 1, 64, 8) for _ in range(3))
    first = TopK("pooled", 1)
    for n in range(4):
        spattn.attention(q, k, v, TopK("pooled", 1 + n), block_size=16, backend="reference")
    assert len(api._builders) == 2 and not any(key[0] == first for key in api._builders)


def test_captured_attention_checks_its_arguments():
    q = torch.randn(1, 2, 1, 16)
    k = v = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="CUDA tensors.*query is on cpu"):
        spattn.CapturedAttention(q, k, v, spattn.Window(8), causal=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_attention_replays_new_values():
    pytest.importorskip("triton")
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(2, 2, 3000, 64, device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    layout = spattn.compile(spattn.Sinks(64) | spattn.Window(500), 1, 3000, causal=True, device="cuda")
    step = spattn.CapturedAttention(q.clone(), k, v, layout, causal=True)
    for _ in range(2):
        q_new = torch.randn_like(q)
        k.mul_(0.5)  # the cache changes in place
        got = step(q_new).clone()
        want = spattn.attention(q_new, k, v, layout, causal=True)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_static_pattern_is_compiled_once_per_shape(monkeypatch):
    """Note [static layout cache]: the Layout of a static pattern is kept, so a loop pays the compile once."""
    calls = []
    real = api.compile_pattern
    monkeypatch.setattr(api, "compile_pattern", lambda *a, **kw: calls.append(a[1:3]) or real(*a, **kw))
    api._layouts.clear()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 100, 8), torch.randn(1, 1, 100, 8), torch.randn(1, 1, 100, 8)
    pattern = spattn.Sinks(4) | spattn.Window(20)
    outs = [spattn.attention(q, k, v, spattn.Sinks(4) | spattn.Window(20), causal=True, block_size=32,
                             backend="reference") for _ in range(3)]
    assert calls == [(100, 100)]  # equal patterns share the entry
    want = spattn.attention(q, k, v, spattn.compile(pattern, 100, causal=True, block_size=32, batch=1, heads=2),
                            causal=True, backend="reference")
    assert all(torch.equal(o, want) for o in outs)
    spattn.attention(q[:, :, :50], k, v, pattern, causal=True, block_size=32, backend="reference")
    spattn.attention(q, k, v, pattern, causal=False, block_size=32, backend="reference")
    blocks = spattn.BlockLayout(torch.ones(4, 4, dtype=torch.bool), block=32)  # holds a tensor: keyed by identity
    spattn.attention(q, k, v, blocks, block_size=32, backend="reference")
    spattn.attention(q, k, v, blocks, block_size=32, backend="reference")
    assert calls == [(100, 100), (50, 100), (100, 100), (100, 100)]
    api._layouts.clear()
