"""``Runtime.generate`` end to end on a tiny random Llama: full density equals dense, padded batches of different
lengths, ``min_sparse_tokens``, and fault injection (a kernel that raises, returns NaN or stalls)."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.runtime import ControllerConfig, Runtime, paged_attention  # noqa: E402

from .hf_support import tiny_llama  # noqa: E402

NEW = 5


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def expected(model, prompts):
    return dense_generate(model, *prompts)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # the second prompt is 27 tokens, left-padded
    return ids, mask


def dense_generate(model, ids, mask):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)


def run(model, plan, ids, mask, **kwargs):
    runtime = Runtime(model, plan, block_size=8, **{"min_sparse_tokens": 0, "monitor_level": 1, **kwargs})
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        runtime.detach()
    return out, runtime


@pytest.mark.parametrize("plan", [
    pytest.param(spattn.Full(), id="full"),
    pytest.param(spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 2), id="window-covers-all"),
    pytest.param(spattn.TopK("bounds", 8), id="budget-covers-all"),
    pytest.param(spattn.TopK("pooled", 8), id="pooled-budget-covers-all"),
    pytest.param(spattn.TopK("pooled", 8, sharing="head"), id="generic-decode-path"),
])
def test_generate_at_full_density_equals_dense(model, prompts, expected, plan):
    ids, mask = prompts
    out, runtime = run(model, spattn.Plan.uniform(plan), ids, mask, recall_sample=1.0)
    assert torch.equal(out, expected)
    assert not runtime.controller.counts, runtime.controller.summary()  # no fallback, no switch
    assert model.config._attn_implementation == "sdpa"  # detached


def test_batched_sequences_of_different_lengths_decode_like_alone(model, prompts):
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Window(12))  # shift-invariant: padding on the left changes nothing
    batched, _ = run(model, plan, ids, mask)
    alone, _ = run(model, plan, ids[1:, 13:], mask[1:, 13:])
    assert torch.equal(batched[1, 13:], alone[0])
    first, _ = run(model, plan, ids[:1], mask[:1])
    assert torch.equal(batched[0], first[0])


@pytest.mark.parametrize("pattern,pad", [
    pytest.param(spattn.Sinks(4) | spattn.Window(6), 13, id="sinks-window"),
    # pages are the cache's (slot 0 first): a dynamic part picks the same pages alone only when the padding is a
    # whole number of pages (8 here)
    pytest.param(spattn.Sinks(3) | spattn.Window(5) | spattn.TopK("bounds", 1, keep=(5,)), 16, id="sinks-topk-keep"),
])
def test_sinks_under_left_padding_land_on_the_first_real_tokens(model, prompts, pattern, pad):
    ids, mask = prompts[0], prompts[1].clone()
    mask[1] = 1
    mask[1, :pad] = 0
    plan = spattn.Plan.uniform(pattern)
    batched, _ = run(model, plan, ids, mask, monitor_level=0)
    alone, _ = run(model, plan, ids[1:, pad:], mask[1:, pad:], monitor_level=0)
    assert torch.equal(batched[1, pad:], alone[0])
    first, _ = run(model, plan, ids[:1], mask[:1], monitor_level=0)
    assert torch.equal(batched[0], first[0])


def test_left_padded_decode_rows_keep_the_sinks_of_the_real_tokens():
    from spattn.runtime import decode_plan, select

    L, S, pad = 40, 8, 13
    valid = torch.ones(2, L, dtype=torch.bool)
    valid[1, :pad] = False
    sel = select(torch.randn(2, 2, 1, 4), L, valid, decode_plan(spattn.Sinks(4) | spattn.Window(3)), 0, kv_heads=2,
                 page_size=S, scale=0.5, offsets=[0, pad])
    tokens = (sel.pages.clamp_min(0)[..., None] * S + torch.arange(S)).flatten(2)
    kept = [sorted(set(tokens[b, 0][sel.mask[b, 0]].tolist())) for b in range(2)]
    assert kept[0] == [0, 1, 2, 3, 36, 37, 38, 39]  # Window(3): the query and the 3 keys before it
    assert kept[1] == [pad, pad + 1, pad + 2, pad + 3, 36, 37, 38, 39]


def test_min_sparse_tokens_runs_short_sequences_dense(model, prompts, expected):
    ids, mask = prompts
    sparse_plan = spattn.Plan.uniform(spattn.Window(3))
    out, _ = run(model, sparse_plan, ids, mask, min_sparse_tokens=1000)
    assert torch.equal(out, expected)
    # only the short (27-token) sequence is dense: the long one keeps its sparse answer
    mixed, _ = run(model, sparse_plan, ids, mask, min_sparse_tokens=35)
    sparse, _ = run(model, sparse_plan, ids, mask)
    assert torch.equal(mixed[1], expected[1]) and torch.equal(mixed[0], sparse[0])


# ---------------------------------------------------------------------------------------------- faults
def raising_kernel(*args, **kwargs):
    raise RuntimeError("injected kernel failure")


def nan_kernel(query, key, value, selection, **kwargs):
    return paged_attention(query, key, value, selection, **kwargs) * float("nan")


@pytest.mark.parametrize("kernel,reason", [(raising_kernel, "error"), (nan_kernel, "nonfinite")], ids=["raises", "nan"])
def test_a_failing_kernel_falls_back_dense_and_is_counted(model, prompts, expected, kernel, reason):
    ids, mask = prompts
    # the window covers every token, so the sparse answer is the dense one whatever the kernel does
    runtime = Runtime(model, spattn.Plan.uniform(spattn.Sinks(2) | spattn.Window(64)), block_size=8,
                      min_sparse_tokens=0, monitor_level=1, controller=ControllerConfig(error_limit=2, cooldown=2))
    runtime.kernel = kernel
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        runtime.detach()
    assert torch.equal(out, expected)
    counts = runtime.controller.counts
    assert counts[("fallback", 0, reason)] >= 2 and counts[("switch", 0, "dense", reason)] >= 1
    assert counts[("switch", 0, "sparse", "cooldown")] >= 1  # it retried sparse after the cooldown
    from prometheus_client import generate_latest

    text = generate_latest(runtime.metrics.registry).decode()
    assert f'spattn_fallbacks_total{{layer="0",reason="{reason}"}}' in text


def test_a_stalling_kernel_lowers_the_budget_then_switches_dense(model, prompts, expected):
    ids, mask = prompts

    def stalling_kernel(*args, **kwargs):
        time.sleep(0.05)
        return paged_attention(*args, **kwargs)

    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 4))  # covers everything
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=1,
                      controller=ControllerConfig(latency_target_ms=1, budget=4, window=1, patience=1, cooldown=100))
    runtime.kernel = stalling_kernel
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        runtime.detach()
    assert torch.equal(out, expected)
    counts = runtime.controller.counts
    assert counts[("budget", "latency_down")] >= 1 and runtime.controller.budget == 0
    assert counts[("switch", 0, "dense", "latency")] == 1 and counts[("switch", 1, "dense", "latency")] == 1


def test_request_latency_target_lowers_the_budget_after_a_slow_generate(model, prompts, expected):
    """The per-request target through ``Runtime.generate``: one generate call of 2 sequences is 2 requests over
    the target, so the budget drops once, after the call (not during it), and the answer is unchanged."""
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 4))  # covers everything
    config = ControllerConfig(latency_target_ms=1e-3, latency_scope="request", budget=4, window=4, patience=100)
    out, runtime = run(model, plan, ids, mask, controller=config)
    assert torch.equal(out, expected)
    assert runtime.controller.counts[("budget", "latency_down")] == 1 and runtime.controller.budget < 4
    assert len(runtime.controller.latencies) == 2
