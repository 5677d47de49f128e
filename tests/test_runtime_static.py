"""The static decode step (``Runtime(cuda_graph=True)``, :mod:`spattn.runtime.graph`) on the CPU, where it runs
eagerly: token for token what the eager ``generate`` path gives, the step equal to the full forward, the same
selection as :func:`~spattn.runtime.select` with the safeguards always in it, device-side page statistics equal
to the eager ones, and the fallbacks (a kernel that raises or returns NaN) counted with a correct answer."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("transformers")

import spattn  # noqa: E402
from spattn.runtime import ControllerConfig, Runtime, decode_plan, paged_attention, select  # noqa: E402
from spattn.runtime.cache import PagedLayer, SpattnCache  # noqa: E402
from spattn.runtime.decode import select_from_row, static_rows  # noqa: E402
from spattn.runtime.graph import StaticDecoder  # noqa: E402
from spattn.selectors.common import pool  # noqa: E402

from .hf_support import tiny_llama  # noqa: E402

NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=1)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 97, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # the second prompt is 27 tokens, left-padded
    return ids, mask


@pytest.fixture(scope="module")
def dense(model, prompts):
    """Dense eager ``generate`` of the prompts (what a plan covering every token must give)."""
    return generate(model, spattn.Plan(), *prompts, static=False)[0]


def generate(model, plan, ids, mask, *, static, new=NEW, gen=None, **kwargs):
    options = {"min_sparse_tokens": 0, "monitor_level": 1, **kwargs}
    runtime = Runtime(model, plan, block_size=8, cuda_graph=static, **options)
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                               **(gen or {}))
    finally:
        runtime.detach()
    return out, runtime


PLANS = [
    pytest.param(spattn.Plan(), id="dense"),
    pytest.param(spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(8) | spattn.TopK("bounds", 1)), id="bounds"),
    pytest.param(spattn.Plan.uniform(spattn.TopK("pooled", 2)), id="pooled"),
    pytest.param(spattn.Plan({0: spattn.Sinks(2) | spattn.Window(5)}), id="one-static-layer"),
]


@pytest.mark.parametrize("plan", PLANS)
def test_static_decode_equals_the_eager_path_token_for_token(model, prompts, dense, plan):
    ids, mask = prompts
    eager = dense if not plan.layers and plan.default is None else generate(model, plan, ids, mask, static=False)[0]
    static, runtime = generate(model, plan, ids, mask, static=True)
    assert torch.equal(static, eager)
    decoder = runtime.decoder
    assert decoder is not None and decoder.replays == 0 and "CUDA" in decoder.reason  # eager on the CPU
    assert not runtime.controller.counts
    assert len(runtime.step_seconds) == NEW  # the prefill and every decode step were clocked


def test_static_decode_step_equals_the_full_forward(model, prompts):
    """Every static decode step's logits equal the model's full forward over the sequence so far (a plan whose
    safeguards cover every token; positions from the attention mask, as ``generate`` computes them)."""
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Sinks(2) | spattn.Window(64) | spattn.TopK("bounds", 1))
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=0)
    try:
        with torch.inference_mode():
            decoder = StaticDecoder(runtime, ids, mask, 4, pad_token_id=0, eos_token_id=None, cuda_graph=False,
                                    keep_logits=True)
            out = decoder.run()
    finally:
        runtime.detach()
    for step, logits in enumerate(decoder.logits):
        seq = out[:, : ids.shape[1] + step]
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        with torch.inference_mode():
            expected = model(seq, attention_mask=full_mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_min_new_tokens_and_eos_follow_generate(model, prompts):
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(8) | spattn.TopK("bounds", 1))
    eager, _ = generate(model, plan, ids[:1], mask[:1], static=False)
    eos = int(eager[0, ids.shape[1] + 2])  # the third generated token ends the sequence
    outs = [generate(model, plan, ids, mask, static=static, gen={"eos_token_id": eos})[0] for static in (False, True)]
    assert torch.equal(outs[0], outs[1]) and (outs[1][:, ids.shape[1]:] == eos).any()
    static_min, _ = generate(model, plan, ids, mask, static=True, gen={"eos_token_id": eos, "min_new_tokens": NEW})
    assert static_min.shape[1] == ids.shape[1] + NEW and not (static_min[:, ids.shape[1]:] == eos).any()


def test_unsupported_generate_options_fall_back_to_model_generate(model, prompts):
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(8))
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, cuda_graph=True)
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=True, top_k=5, pad_token_id=0)
    finally:
        runtime.detach()
    assert runtime.decoder is None and out.shape == (2, ids.shape[1] + 3)


# ---------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("pattern", [
    pytest.param(spattn.Sinks(3) | spattn.Window(12) | spattn.TopK("bounds", 2), id="top-k"),
    pytest.param(spattn.Window(12) | spattn.TopP("bounds", 0.5), id="top-p"),
])
def test_select_from_row_over_the_capacity_equals_select_and_keeps_the_safeguards(pattern):
    torch.manual_seed(0)
    B, H, Hkv, D, S, C = 2, 4, 2, 16, 8, 64
    plan = decode_plan(pattern)
    offsets = [0, 5]
    lengths = range(20, 60, 3)
    rows, pages = static_rows(plan, C, lengths, batch=B, heads=H, page_size=S, device=torch.device("cpu"), group=2,
                              offsets=offsets)
    assert rows.shape[0] == len(lengths) and rows.shape[-1] == C
    for t, L in enumerate(lengths):
        q, k = torch.randn(B, H, 1, D), torch.randn(B, Hkv, C, D)
        valid = torch.ones(B, L, dtype=torch.bool)
        valid[1, :5] = False
        eager = select(q, L, valid, plan, 3, kv_heads=Hkv, page_size=S, scale=0.25,
                       key_min=pool(k[:, :, :L], S, "amin"), key_max=pool(k[:, :, :L], S, "amax"), offsets=offsets)
        wide = torch.zeros(B, C, dtype=torch.bool)
        wide[:, :L] = valid
        kmin, kmax = pool(k, S, "amin"), pool(k, S, "amax")  # pages past L hold other keys: never visible
        n = -(-L // S)
        kmin[:, :, :n], kmax[:, :, :n] = pool(k[:, :, :L], S, "amin"), pool(k[:, :, :L], S, "amax")
        sizes = (L - torch.arange(C // S) * S).clamp(1, S)
        static = select_from_row(q, wide, plan, torch.tensor([3]), rows[t], min(C // S, pages + 3 + 1), kv_heads=Hkv,
                                 page_size=S, scale=0.25, key_min=kmin, key_max=kmax, page_sizes=sizes)
        assert attended(eager, S) == attended(static, S)
        # the safeguards (the static row: sinks, window) are always attended
        safeguards = {(b, h, j) for b in range(B) for h in range(H) for j in range(C)
                      if rows[t, min(b, rows.shape[1] - 1), min(h, rows.shape[2] - 1), j] and wide[b, j]}
        assert safeguards <= attended(static, S)


def attended(selection, S):
    """{(b, h, token)} a selection attends."""
    out = set()
    B, H = selection.mask.shape[:2]
    G = H // selection.pages.shape[1]
    for b in range(B):
        for h in range(H):
            mask = selection.mask[b, h].view(-1, S)
            for i, page in enumerate(selection.pages[b, h // G].tolist()):
                if page >= 0:
                    out |= {(b, h, page * S + t) for t in range(S) if mask[i, t]}
    return out


# ---------------------------------------------------------------------------------------------- cache
def test_static_cache_updates_equal_the_eager_page_statistics():
    torch.manual_seed(0)
    S, P0, steps = 8, 13, 12
    keys = torch.randn(2, 2, P0 + steps, 4)
    values = torch.randn(2, 2, P0 + steps, 4)
    eager, static = PagedLayer(S, reserve=32, track_means=True), PagedLayer(S, reserve=32, track_means=True)
    eager.update(keys[:, :, :P0], values[:, :, :P0])
    static.update(keys[:, :, :P0], values[:, :, :P0])
    slot = torch.tensor([P0])
    static.start_static(slot)
    for t in range(P0, P0 + steps):
        eager.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        k, v = static.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        assert k.shape[2] == 32 and static.holds(k)  # the whole buffer, every step
        slot += 1
    static.end_static(P0 + steps)
    assert torch.equal(static.keys, eager.keys) and torch.equal(static.values, eager.values)
    for a, b in zip((*static.page_bounds(), static.page_means()), (*eager.page_bounds(), eager.page_means()),
                    strict=True):
        torch.testing.assert_close(a, b)


def test_start_static_needs_whole_pages_and_a_prefill():
    layer = PagedLayer(8)
    with pytest.raises(ValueError, match="prefill"):
        layer.start_static(torch.tensor([0]))
    cache = SpattnCache(2, page_size=8)
    with pytest.raises(ValueError, match="num_layers"):
        SpattnCache(0)
    assert all(isinstance(layer, PagedLayer) for layer in cache.layers)


# ---------------------------------------------------------------------------------------------- faults
def raising_kernel(*args, **kwargs):
    raise RuntimeError("injected kernel failure")


def nan_on_layer_0(query, key, value, selection, **kwargs):
    out = paged_attention(query, key, value, selection, **kwargs)
    return out * float("nan") if nan_on_layer_0.layer == 0 else out


@pytest.mark.parametrize("kernel,reason", [(raising_kernel, "error"), (nan_on_layer_0, "nonfinite")],
                         ids=["raises", "nan"])
def test_a_failing_kernel_in_the_static_step_is_answered_dense_and_counted(model, prompts, dense, kernel, reason):
    ids, mask = prompts
    plan = spattn.Plan.uniform(spattn.Sinks(2) | spattn.Window(64))  # covers every token: sparse = dense
    expected = dense
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=1, cuda_graph=True,
                      controller=ControllerConfig(error_limit=100))
    original = runtime.attend

    def attend(module, *args, **kwargs):  # tell the NaN kernel which layer calls it
        nan_on_layer_0.layer = module.layer_idx
        return original(module, *args, **kwargs)

    runtime.attend = attend
    runtime.kernel = kernel
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        runtime.detach()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    counts = runtime.controller.counts
    if reason == "error":  # the layer stays dense for the rest of this generation: one count per layer
        assert counts[("fallback", 0, "error")] == 1 and counts[("fallback", 1, "error")] == 1
    else:  # every decode step of layer 0 is flagged and rerun; layer 1 never
        assert counts[("fallback", 0, "nonfinite")] == NEW - 1 and counts[("fallback", 1, "nonfinite")] == 0


# ---------------------------------------------------------------------------------------------- capturable
@contextlib.contextmanager
def no_host_reads():
    """Every Python-level read of a tensor's value (what a CUDA graph capture cannot contain) raises."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"]
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read inside the static decode step: Tensor.{name}")
        return read

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


class GuardedDecoder(StaticDecoder):
    """Every static step after the first runs with host reads refused (what a replayed graph contains)."""

    steps = 0

    def _forward(self, st, tokens, positions, cache):
        self.steps += 1
        if self.steps == 1:
            return super()._forward(st, tokens, positions, cache)
        with no_host_reads():
            return super()._forward(st, tokens, positions, cache)


@pytest.mark.parametrize("plan", [
    pytest.param(spattn.Plan(), id="dense"),
    pytest.param(spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(8) | spattn.TopK("bounds", 1)), id="top-k"),
    pytest.param(spattn.Plan.uniform(spattn.Window(12) | spattn.TopP("pooled", 0.5)), id="top-p-pooled"),
])
def test_the_static_decode_step_reads_nothing_on_the_host(model, prompts, plan):
    ids, mask = prompts
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=1)
    try:
        with torch.inference_mode():
            decoder = GuardedDecoder(runtime, ids, mask, 4, pad_token_id=0, eos_token_id=None, cuda_graph=False)
            decoder.run()
    finally:
        runtime.detach()
    assert decoder.steps == 3


def test_the_controller_moves_the_device_budget_and_switches_layers_dense_in_the_static_loop(model, prompts, dense):
    """A kernel that stalls past the latency target: the budget (a device tensor of the static step) goes down,
    then the layers switch dense, and the answer is unchanged (the plan's safeguards cover every token)."""
    import time

    ids, mask = prompts
    expected = dense

    def stalling_kernel(*args, **kwargs):
        time.sleep(0.05)
        return paged_attention(*args, **kwargs)

    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(64) | spattn.TopK("bounds", 4))
    runtime = Runtime(model, plan, block_size=8, min_sparse_tokens=0, monitor_level=1, cuda_graph=True,
                      controller=ControllerConfig(latency_target_ms=1, budget=4, window=1, patience=1, cooldown=100))
    runtime.kernel = stalling_kernel
    seen = []
    original = StaticDecoder._configure

    def configure(self, st, heads, kv_heads):
        key = original(self, st, heads, kv_heads)
        seen.append((list(st.budget.tolist()), sorted(st.dense_layers)))
        return key

    StaticDecoder._configure = configure
    try:
        out = runtime.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        StaticDecoder._configure = original
        runtime.detach()
    assert torch.equal(out, expected)
    assert seen[0] == ([4, 4], [])
    assert any(budget == [0, 0] for budget, _ in seen) and seen[-1][1] == [0, 1]
    counts = runtime.controller.counts
    assert counts[("budget", "latency_down")] >= 1 and counts[("switch", 0, "dense", "latency")] == 1


class Collect:
    """A streamer: what ``generate`` puts, in order."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_streamer_stopping_criteria_and_logits_processors_as_in_generate(model, prompts):
    """What ``spattn serve`` passes to ``generate``: the static loop streams, stops rows and processes scores as
    ``model.generate`` does."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    ids, mask = prompts
    P0 = ids.shape[1]

    class StopRow0(StoppingCriteria):  # row 0 stops after 2 new tokens
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([input_ids.shape[1] - P0 >= 2, False])

    def ban(input_ids, scores):  # a processor: token 48 never wins
        return scores.index_fill(-1, torch.tensor([48]), -float("inf"))

    plan = spattn.Plan.uniform(spattn.Sinks(4) | spattn.Window(8) | spattn.TopK("bounds", 1))
    runs = []
    for static in (False, True):
        streamer = Collect()
        gen = {"streamer": streamer, "stopping_criteria": StoppingCriteriaList([StopRow0()]),
               "logits_processor": [ban], "eos_token_id": 96}
        out, _ = generate(model, plan, ids, mask, static=static, gen=gen)
        runs.append((out, streamer))
    (eager, eager_stream), (static, static_stream) = runs
    assert torch.equal(static, eager) and (static[:, P0:] != 48).all()
    assert (static[0, P0 + 2:] == 0).all()  # row 0 stopped: padded after its second token
    assert static_stream.puts == eager_stream.puts and static_stream.ended
