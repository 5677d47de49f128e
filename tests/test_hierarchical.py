"""Hierarchical (NSA-style) attention: the fast path (layouts through ``spattn.attention``) and the dense
reference against a brute-force oracle written here from the definitions (per query, float64, explicit key
sets), plus causality per branch, gradients to gates and pooling, the cost model against the layouts' counts,
coverage and the pattern's JSON / algebra."""

from __future__ import annotations

import math

import pytest
import torch

import spattn
from spattn.hierarchical import (
    HierarchicalAttention,
    branch_layouts,
    cost,
    coverage,
    decode_tokens,
    hierarchical_attention,
    prefill_pairs,
    reference,
)
from spattn.hierarchical.common import compress
from spattn.hierarchical.plan import branch_plan, static_block
from spattn.patterns import CompressedCausal, Hierarchical, Sinks, Window
from spattn.testing import assert_within, brute_force_mask, poison_empty


# ------------------------------------------------------------------------------------------------ the oracle
def oracle(q, k, v, config, *, gate_logits=None, pool_logits=None, chosen=None):
    """float64, query by query: explicit compressed tokens, block scores, chosen blocks and key sets."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, L, D = q.shape
    Hkv = k.shape[1]
    G, cb, s, sb = H // Hkv, config.compress_block, config.compress_stride, config.select_block
    NQ = -(-L // sb)
    scale = D ** -0.5
    nc = (L - cb) // s + 1 if L >= cb else 0
    wk = torch.full((Hkv, cb), 1.0 / cb, dtype=torch.float64) if pool_logits is None else \
        torch.softmax(pool_logits[0].double(), -1)
    wv = wk if pool_logits is None else torch.softmax(pool_logits[1].double(), -1)
    kc = torch.stack([torch.einsum("bgpd,gp->bgd", k[:, :, t * s:t * s + cb], wk) for t in range(nc)], 2) \
        if nc else k.new_zeros(B, Hkv, 0, D)
    vc = torch.stack([torch.einsum("bgpd,gp->bgd", v[:, :, t * s:t * s + cb], wv) for t in range(nc)], 2) \
        if nc else v.new_zeros(B, Hkv, 0, v.shape[-1])
    overlap = torch.tensor([[len(set(range(t * s, t * s + cb)) & set(range(c * sb, (c + 1) * sb))) / cb
                             for c in range(NQ)] for t in range(nc)], dtype=torch.float64).view(nc, NQ)
    guard = brute_force_mask(config.safeguard, L, L, causal=True) if config.safeguard is not None else \
        torch.zeros(1, 1, L, L, dtype=torch.bool)
    guard = guard.expand(B, H, L, L)

    def visible_compressed(i):
        return [t for t in range(nc) if t * s + cb - 1 <= i]

    if chosen is None:
        scores = torch.zeros(B, Hkv, NQ, NQ, dtype=torch.float64)
        for b in range(B):
            for h in range(H):
                for i in range(L):
                    ts = visible_compressed(i)
                    if ts:
                        p = torch.softmax(kc[b, h // G, ts] @ q[b, h, i] * scale, 0)
                        scores[b, h // G, i // sb] += p @ overlap[ts]
        chosen = torch.zeros(B, Hkv, NQ, NQ, dtype=torch.bool)
        for b in range(B):
            for g in range(Hkv):
                for qb in range(NQ):
                    rows = slice(qb * sb, (qb + 1) * sb)
                    kept = [bool(guard[b, g * G:(g + 1) * G, rows, c * sb:(c + 1) * sb].flatten(1).any(1).all())
                            for c in range(NQ)]
                    candidates = sorted((c for c in range(qb) if not kept[c]), key=lambda c: -scores[b, g, qb, c])
                    for c in candidates[:config.select_count - 1] + [qb]:
                        chosen[b, g, qb, c] = True

    def attend(qi, keys, values):
        if keys.shape[0] == 0:
            return torch.zeros(values.shape[-1], dtype=torch.float64)
        return torch.softmax(keys @ qi * scale, 0) @ values

    out = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    gates = config.gates or (1.0, 1.0, 1.0)
    for b in range(B):
        for h in range(H):
            g = h // G
            for i in range(L):
                ts = visible_compressed(i)
                j = torch.arange(i + 1)
                sel = j[chosen[b, g, i // sb][j // sb] | guard[b, h, i, :i + 1]]
                win = j[j > i - config.window]
                branches = [attend(q[b, h, i], kc[b, g, ts], vc[b, g, ts]),
                            attend(q[b, h, i], k[b, g, sel], v[b, g, sel]),
                            attend(q[b, h, i], k[b, g, win], v[b, g, win])]
                if gate_logits is None:
                    w = torch.tensor(gates, dtype=torch.float64)
                else:
                    gl = gate_logits.double()
                    w = gl[min(b, gl.shape[0] - 1), min(h, gl.shape[1] - 1), min(i, gl.shape[2] - 1)].exp()
                w = w * torch.tensor([1.0 if ts else 0.0, 1.0, 1.0], dtype=torch.float64)
                out[b, h, i] = sum(w[c] * branches[c] for c in range(3)) / w.sum()
    return out, chosen


CASES = [
    pytest.param(dict(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=24,
                      safeguard=Sinks(4)), (2, 4, 2, 50, 8), id="B2-L50-H4-gqa-sinks"),
    pytest.param(dict(compress_block=32, compress_stride=16, select_block=16, select_count=2, window=8),
                 (1, 2, 2, 63, 8), id="B1-L63-H2-cb32"),
    pytest.param(dict(compress_block=16, compress_stride=16, select_block=16, select_count=8, window=40,
                      gates=(0.2, 0.5, 0.3)), (1, 2, 1, 70, 8), id="L70-mqa-fixed-gates-count>blocks"),
    pytest.param(dict(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=4),
                 (1, 2, 1, 1, 8), id="L1"),
    pytest.param(dict(compress_block=16, compress_stride=16, select_block=16, select_count=2, window=100),
                 (1, 2, 1, 130, 8), id="L130-window-block128-compressed-block16"),
]


def _inputs(shape, dtype=torch.float64, seed=0):
    B, H, Hkv, L, D = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return mk(B, H, L, D), mk(B, Hkv, L, D), mk(B, Hkv, L, D)


@pytest.mark.parametrize("params,shape", CASES)
def test_reference_and_fast_equal_oracle_float64(params, shape):
    config = Hierarchical(**params)
    q, k, v = _inputs(shape)
    expected, chosen = oracle(q, k, v, config)
    ref, ref_info = reference(q, k, v, config, return_info=True)
    fast, info = hierarchical_attention(q, k, v, config, backend="reference", return_info=True)
    assert torch.equal(ref_info["chosen"], chosen) and torch.equal(info["chosen"], chosen)
    torch.testing.assert_close(ref, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-10)


def test_static_branches_block_size_follows_their_reach():
    """Note [static block size]: 128 where the branch reaches at least 128 - 2 * select_block keys back."""
    mqar = Hierarchical(compress_block=16, compress_stride=16, select_block=32, select_count=2, window=32)
    plan = branch_plan(mqar, 256, 2, 1, 1, "cpu")
    assert (plan.compressed.block_size, plan.window.block_size) == (32, 32)  # 16 compressed tokens, window 32
    plan = branch_plan(mqar, 1040, 1, 1, 1, "cpu")
    assert (plan.compressed.block_size, plan.window.block_size) == (128, 32)  # 65 compressed tokens
    long = Hierarchical(compress_block=32, compress_stride=16, select_block=64, select_count=4, window=512)
    plan = branch_plan(long, 640, 1, 2, 1, "cpu")
    assert (plan.compressed.block_size, plan.window.block_size) == (128, 128)
    assert [static_block(r, 32) for r in (63, 64)] == [32, 128] and static_block(0, 256) == 256


def test_learned_gates_and_pooling_equal_oracle():
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=20,
                          pooling="learned")
    q, k, v = _inputs((1, 4, 2, 90, 8), seed=3)
    g = torch.Generator().manual_seed(5)
    gates = torch.randn(1, 4, 90, 3, generator=g, dtype=torch.float64)
    pool = (torch.randn(2, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, generator=g, dtype=torch.float64))
    expected, chosen = oracle(q, k, v, config, gate_logits=gates, pool_logits=pool)
    fast, info = hierarchical_attention(q, k, v, config, gate_logits=gates, pool_logits=pool, backend="reference",
                                        return_info=True)
    assert torch.equal(info["chosen"], chosen)
    torch.testing.assert_close(fast, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(reference(q, k, v, config, gate_logits=gates, pool_logits=pool), expected,
                               rtol=1e-10, atol=1e-10)


def test_fast_float32_forward_backward_within_tolerance(backend="reference"):
    """fp32 fast path (NaN-poisoned allocations) vs the float64 reference at the fast path's selection, with the
    fp32 reference as the baseline: out and the gradients of q, k, v, gate logits and pooling logits."""
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=24,
                          pooling="learned", safeguard=Sinks(4))
    q, k, v = _inputs((2, 4, 2, 64, 16), torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    gl = torch.randn(2, 4, 64, 3, generator=g)
    pool = (torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g))
    do = torch.randn(2, 4, 64, 16, generator=g)
    with torch.no_grad():
        chosen = hierarchical_attention(q, k, v, config, gate_logits=gl, pool_logits=pool, return_info=True,
                                        backend=backend)[1]["chosen"]

    def run(fn, dtype, **extra):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, gl, *pool)]
        out = fn(*leaves[:3], config, gate_logits=leaves[3], pool_logits=(leaves[4], leaves[5]), **extra)
        (out.double() * do.double()).sum().backward()
        return [out.detach()] + [x.grad for x in leaves]

    with poison_empty():
        fast = run(hierarchical_attention, torch.float32, backend=backend)
    golden = run(reference, torch.float64, chosen=chosen)
    baseline = run(reference, torch.float32, chosen=chosen)
    names = ("out", "dq", "dk", "dv", "dgate", "dpool_key", "dpool_value")
    for name, f, gd, bl in zip(names, fast, golden, baseline, strict=True):
        assert torch.isfinite(f).all(), name
        assert_within(f, gd, bl, k=2.0, eps=1e-5, what=name)


def test_causality_per_branch():
    """Changing keys/values after position p changes no branch output (nor the selection) at queries <= p."""
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=24,
                          safeguard=Sinks(4))
    q, k, v = _inputs((1, 2, 2, 96, 8), torch.float32, seed=4)
    _, before = hierarchical_attention(q, k, v, config, return_info=True)
    for p in (47, 63):  # the last query of a block: the block's selection may use all of its queries
        k2, v2 = k.clone(), v.clone()
        k2[:, :, p + 1:] = torch.randn_like(k2[:, :, p + 1:]) * 10
        v2[:, :, p + 1:] = torch.randn_like(v2[:, :, p + 1:]) * 10
        _, after = hierarchical_attention(q, k2, v2, config, return_info=True)
        for name, a, b in zip(("compressed", "selected", "window"), before["outputs"], after["outputs"], strict=True):
            torch.testing.assert_close(a[:, :, :p + 1], b[:, :, :p + 1], msg=name)
        rows = (p + 1) // 16
        assert torch.equal(before["chosen"][:, :, :rows], after["chosen"][:, :, :rows])
    # the compressed mask itself: token t is visible at i iff it summarises keys <= i only
    layout = spattn.compile(config.compressed_pattern(), 96, 96, block_size=16)
    i, t = torch.arange(96)[:, None], torch.arange(96)[None, :]
    assert torch.equal(layout.to_dense()[0, 0], t * 8 + 16 - 1 <= i)
    assert torch.equal(brute_force_mask(CompressedCausal(16, 8), 96, 96)[0, 0], t * 8 + 16 - 1 <= i)


def test_gradients_reach_gates_and_pooling_in_sparse_attention():
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=16,
                          pooling="learned")
    torch.manual_seed(0)
    layer = spattn.nn.SparseAttention(32, 4, 2, pattern=HierarchicalAttention(config, 4, 2, 8))
    with torch.no_grad():  # a fresh module is the parameter-free form: equal gates, mean pooling
        x = torch.randn(2, 70, 32)
        q, k, v = layer.project(x)
        plain = hierarchical_attention(q, k, v, dataclass_replace(config, pooling="mean"))
        torch.testing.assert_close(layer.attend(q, k, v), plain)
    layer(x).square().mean().backward()
    pattern = layer.pattern
    for name in ("gate_weight", "gate_bias", "pool_key", "pool_value"):
        grad = getattr(pattern, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert pattern.last["gate_mean"].shape == (3,)
    assert {n for n, _ in layer.named_parameters()} >= {"pattern.gate_weight", "pattern.pool_key"}
    fixed = HierarchicalAttention(dataclass_replace(config, gates=(1.0, 2.0, 1.0), pooling="mean"), 4, 2, 8)
    assert list(fixed.parameters()) == []
    with pytest.raises(ValueError, match="causal"):
        fixed.attend(q, k, v, causal=False, scale=1.0)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


@pytest.mark.parametrize("length", [1, 40, 64, 100, 257])
@pytest.mark.parametrize("count", [2, 5])
def test_cost_model_equals_layout_counts(length, count):
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=count, window=24)
    q, k, _ = _inputs((1, 2, 1, length, 8), torch.float32, seed=length)
    layouts = branch_layouts(q, k, config)
    pairs, tokens = prefill_pairs(config, length), decode_tokens(config, length)
    for name in ("compressed", "selected", "window"):
        layout = layouts[name]
        if layout is None:  # no compressed token yet
            assert pairs[name] == tokens[name] == 0
            continue
        assert layout.allowed_pairs().flatten().tolist() == [pairs[name]] * layout.allowed_pairs().numel(), name
        assert int(layout.to_dense()[0, 0, -1].sum()) == tokens[name], name
    report = cost(config, length, head_dim=8, heads=2, kv_heads=1)
    assert report["prefill_flops"] == 2 * (4 * 8 * pairs["total"] + 2 * 8 * pairs["compressed"])
    assert report["decode_bytes"] == 2 * 8 * 2 * tokens["total"]


def test_coverage_of_the_fine_branches():
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=16)
    q, k, v = _inputs((1, 2, 1, 128, 8), torch.float32, seed=7)
    report = coverage(q, k, config, value=v)
    assert 0.0 < report.density < 1.0 and 0.0 < float(report.recall.mean()) < 1.0
    everything = coverage(q, k, dataclass_replace(config, window=128))
    assert float(everything.recall.min()) == pytest.approx(1.0, abs=1e-5)


def test_pattern_json_algebra_and_errors():
    config = Hierarchical(select_count=4, window=128) | Sinks(16) | Window(3)
    assert config.safeguard == Sinks(16) | Window(3)
    assert spattn.pattern_from_dict(config.to_dict()) == config
    fixed = Hierarchical(gates=(0, 1, 2))
    assert fixed.gates == (0.0, 1.0, 2.0) and spattn.pattern_from_dict(fixed.to_dict()) == fixed
    for bad, match in ((dict(compress_stride=64), "compress_stride"), (dict(window=0), "window"),
                       (dict(pooling="max"), "pooling"), (dict(gates=(1, 0, 0)), "gates"),
                       (dict(gates=(1, -1, 1)), "gates")):
        with pytest.raises(ValueError, match=match):
            Hierarchical(**bad)
    with pytest.raises(TypeError, match="static"):
        Hierarchical() | spattn.TopK("pooled", 2)
    with pytest.raises(TypeError, match="not one mask"):
        x = torch.randn(1, 1, 64, 8)
        spattn.compile(Hierarchical(), 64, 64, block_size=16, query=x, key=x)
    q, k, v = _inputs((1, 2, 1, 32, 8), torch.float32)
    with pytest.raises(ValueError, match="Lq == Lk"):
        hierarchical_attention(q, k[:, :, :16], v[:, :, :16], Hierarchical(select_block=16))
    with pytest.raises(ValueError, match="pool_logits"):
        hierarchical_attention(q, k, v, Hierarchical(select_block=16), pool_logits=(k, k))
    with pytest.raises(ValueError, match="not both"):
        hierarchical_attention(q, k, v, fixed, gate_logits=torch.zeros(1, 1, 1, 3))
    assert math.isfinite(float(hierarchical_attention(q, k, v, Hierarchical(select_block=16)).abs().sum()))


def test_frozen_hf_model_under_patched():
    """On a frozen transformers model: selecting every block with only the selected gate is dense attention;
    the default mix runs and differs; a decode step over a cache says what is missing."""
    pytest.importorskip("transformers")
    from tests.hf_support import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 80), generator=torch.Generator().manual_seed(0))
    everything = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=99, window=8,
                              gates=(0, 1, 0))
    mixed = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=16)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        with spattn.patched(model, everything, block_size=16):
            torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=1e-5, atol=1e-5)
        with spattn.patched(model, spattn.Plan(layers={0: mixed}), block_size=16):
            out = model(input_ids=ids).logits
        assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-3)
        with spattn.patched(model, mixed, block_size=16), pytest.raises(NotImplementedError, match="cache"):
            model.generate(ids[:1, :20], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("length", [64, 100, 257])
def test_decode_tokens_against_the_kernels_block_loads(length):
    """The cost model's decode tokens against what the kernels load for the last query: every block its query
    block visits in the tables the kernels iterate (``benchmarks/hierarchical.py::decode_loads``, keys past the
    end not counted). Compressed and selected load exactly the model's tokens; the window loads whole blocks of
    the query block's band: at most two blocks more than the model (and never more than the sequence)."""
    bench = _benchmark_module()
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=3, window=24)
    row = bench.decode_loads(torch.device("cpu"), length, 2, 1, 8, config)
    model, loads = row["decode_tokens_model"], row["decode_tokens_kernel_loads"]
    assert model == decode_tokens(config, length)
    assert loads["compressed"] == model["compressed"] and loads["selected"] == model["selected"]
    block = row["block_sizes"]["window"]  # the window layout's blocks: a band of whole blocks per query block
    assert model["window"] <= loads["window"] <= min(length, model["window"] + 2 * block)
    assert loads["total"] == sum(loads[n] for n in ("compressed", "selected", "window"))


def _benchmark_module():
    """``benchmarks/hierarchical.py`` as a module (it is a script, not part of the package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "hierarchical.py"
    spec = importlib.util.spec_from_file_location("spattn_bench_hierarchical", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_gate_passes_and_catches_a_wrong_result(monkeypatch):
    """The H200 benchmark's gate (Note [gate precision]): float32 passes the strict rule on every result, bf16
    passes its fatal bound; an output 2% off fails the float32 gate, 10% off the bf16 one."""
    bench = _benchmark_module()
    small = {"shape": (96, 4, 2, 16), "config": Hierarchical(compress_block=16, compress_stride=8, select_block=16,
                                                             select_count=2, window=16, pooling="learned") | Sinks(4)}
    cpu = torch.device("cpu")
    strict = bench.gate(cpu, torch.float32, True, **small)
    assert strict["ok"] and all(strict["within_rule"].values()) and strict["fatal_rule_k"] == 2.0
    assert bench.gate(cpu, torch.bfloat16, True, **small)["ok"]
    right = bench.hierarchical_attention
    for dtype, factor in ((torch.float32, 1.02), (torch.bfloat16, 1.1)):
        monkeypatch.setattr(bench, "hierarchical_attention", lambda *a, factor=factor, **kw: (
            right(*a, **kw) if kw.get("return_info") else right(*a, **kw) * factor))
        with pytest.raises(AssertionError, match="out"):
            bench.gate(cpu, dtype, True, **small)


def test_learned_pooling_accumulates_in_float32():
    """Note [pooling gradient in float32]: bf16 keys, float32 pool logits: the pooled tokens are bf16 and the
    logits' gradient is the float32 computation's (not one rounded to bf16 before the softmax's backward)."""
    config = Hierarchical(compress_block=16, compress_stride=8, select_block=16, select_count=2, window=8,
                          pooling="learned")
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 96, 32, generator=g).bfloat16()
    logit = torch.randn(2, 16, generator=g)
    upstream = torch.randn(2, 2, config.num_compressed(96), 32, generator=g).bfloat16()
    grads = []
    for x in (k, k.float()):
        leaf = logit.clone().requires_grad_()
        out = compress(x, config, leaf)
        assert out.dtype == x.dtype
        (out.float() * upstream.float()).sum().backward()
        grads.append(leaf.grad)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
