"""A patched plan's per-forward cost: layouts compiled once per plan and length, no host reads in later forwards."""

from __future__ import annotations

import collections
import gc
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import spattn
import spattn.patterns
import spattn.selectors
from spattn.integrations import hf

from .hf_support import transformers

# tensor calls that read a device value on the host (a synchronisation on CUDA)
_HOST_READS = {"__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "unique",
               "masked_select", "argwhere", "equal"}


class HostReads(TorchFunctionMode):
    """Counts the tensor calls of ``_HOST_READS`` made inside the block by spattn outside the PyTorch attention
    backends (the CPU backends check their inputs on the host; the triton path, which CUDA runs, does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_READS:
            ours = [f.filename for f in traceback.extract_stack()[:-1] if "/spattn/" in f.filename]
            if ours and "/ops/attention/impl/" not in ours[-1]:
                self.calls[f"{name} in {ours[-1].split('/spattn/')[-1]}"] += 1
        return func(*args, **(kwargs or {}))


def _llama(layers: int):
    """A random Llama with ``layers`` layers and 4 query heads in 2 key/value groups."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def _per_head_plan(layers: int) -> spattn.Plan:
    """A different PerHead pattern in every layer (windows, sinks + window, a Budgeted head)."""
    return spattn.Plan(layers={
        i: spattn.PerHead((spattn.Window(8 + i), spattn.Sinks(4) | spattn.Window(16), spattn.Budgeted(48, sinks=4),
                           spattn.Window(8 + i)))
        for i in range(layers)
    })


@pytest.fixture
def compile_calls(monkeypatch):
    """Counts ``spattn.compile`` calls made by the integration (it imports the function at each call)."""
    calls = {"n": 0}
    real = spattn.patterns.compile

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(spattn.patterns, "compile", counting)
    return calls


def test_second_forward_compiles_nothing_and_reads_nothing(compile_calls, monkeypatch):
    # more distinct layer patterns than the process-wide LRU keeps (32 there, 2 here, so that the model is small):
    # cycling through it used to recompile every layer in every forward
    monkeypatch.setattr(hf, "_LAYOUT_CACHE_SIZE", 2)
    layers = 3
    model, plan = _llama(layers), _per_head_plan(layers)
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), spattn.patched(model, plan, backend="dense", block_size=16):
        first = model(input_ids=ids).logits
        compiled_first = compile_calls["n"]
        reads = HostReads()
        with reads:
            second = model(input_ids=ids).logits
    assert compiled_first == layers  # one layout per distinct layer pattern
    assert compile_calls["n"] == compiled_first, "the second forward at the same length compiled layouts"
    assert not reads.calls, f"the second forward read tensors on the host: {dict(reads.calls)}"
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    # a new patch of the same plan object keeps its layouts; another length compiles once more per layer
    with torch.no_grad(), spattn.patched(model, plan, backend="dense", block_size=16):
        model(input_ids=ids)
        assert compile_calls["n"] == compiled_first
        model(input_ids=ids[:, :50])
    assert compile_calls["n"] == 2 * compiled_first


def test_plan_layouts_are_dropped_with_the_plan(compile_calls):
    model = _llama(2)
    ids = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(2))
    plan = _per_head_plan(2)
    with torch.no_grad(), spattn.patched(model, plan, backend="reference", block_size=16):
        model(input_ids=ids)
    gc.collect()  # plans of earlier tests still waiting in reference cycles must not be counted here
    kept = len(hf._PLAN_LAYOUTS)
    del plan
    gc.collect()
    assert len(hf._PLAN_LAYOUTS) == kept - 1


def test_dynamic_plan_builds_sync_free_and_matches_compile(compile_calls, monkeypatch):
    model = _llama(2)
    ids = torch.randint(0, 50, (1, 96), generator=torch.Generator().manual_seed(3))
    pattern = spattn.Sinks(4) | spattn.Window(16) | spattn.TopK("pooled", 2)
    plan = spattn.Plan(default=pattern)
    builders = {"n": 0}
    real = spattn.selectors.LayoutBuilder

    def counting(*args, **kwargs):
        builders["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(spattn.selectors, "LayoutBuilder", counting)
    with torch.no_grad(), spattn.patched(model, plan, backend="reference", block_size=16):
        fast = model(input_ids=ids).logits
        made = builders["n"]
        reads = HostReads()
        with reads:
            again = model(input_ids=ids).logits
    assert made == 1 and builders["n"] == 1  # one builder for both layers (equal patterns), kept
    assert compile_calls["n"] == 0
    assert not reads.calls, f"the dynamic layers read tensors on the host: {dict(reads.calls)}"
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    # the general compile path (what a pattern the builder refuses takes) gives the same model output
    monkeypatch.setattr(hf, "_builder", lambda *args: hf._NO_BUILDER)
    with torch.no_grad(), spattn.patched(model, spattn.Plan(default=pattern), backend="reference", block_size=16):
        general = model(input_ids=ids).logits
    assert compile_calls["n"] == 2  # compiled with the input in each layer
    torch.testing.assert_close(fast, general)


def test_padded_batches_are_not_kept_on_the_plan(compile_calls):
    model = _llama(2)
    plan = _per_head_plan(2)
    ids = torch.randint(0, 50, (2, 48), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, :10] = 0  # left padding
    with torch.no_grad(), spattn.patched(model, plan, backend="reference", block_size=16):
        for _ in range(3):
            model(input_ids=ids, attention_mask=mask)
    kept = hf._plan_layouts(plan)
    assert all(len(v) == 0 for v in kept.values())  # each forward's padding is its own pattern
    assert compile_calls["n"] == 3 * 2


def test_per_head_compiles_heads_sharing_a_pattern_together():
    from spattn.patterns.compile import brute_force_mask

    shared = spattn.Budgeted(40, sinks=4)
    heads = (shared, spattn.Window(9), shared, spattn.RandomBlocks(1, seed=3, per_head=True), shared,
             spattn.RandomBlocks(1, seed=3, per_head=True))
    pattern = spattn.PerHead(heads)
    layout = spattn.compile(pattern, 64, causal=True, block_size=16, heads=len(heads))
    dense = layout.to_dense()
    assert torch.equal(dense, brute_force_mask(pattern, 64, causal=True, block_size=16, heads=len(heads)))
    for h, p in enumerate(heads):  # each head is its pattern compiled for all heads (per-head seeds included)
        alone = spattn.compile(p, 64, causal=True, block_size=16, heads=len(heads)).to_dense()
        assert torch.equal(dense[:, h], alone[:, h if alone.shape[1] > 1 else 0])
    # the shared pattern's partial blocks are evaluated once for its three heads, not once per head
    one = spattn.compile(spattn.PerHead((shared, spattn.Window(9))), 64, causal=True, block_size=16, heads=2)
    assert layout.info["masks_evaluated"] == one.info["masks_evaluated"]
