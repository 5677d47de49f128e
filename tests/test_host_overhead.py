"""Per-call host work kept between calls (issues 16 and 21): the triton forward's launch plan per Layout and input
signature, ``spattn.attention``'s checks per Layout, the HF integration's layout per layer. Each cache must give
the launches, outputs and errors the uncached path gives.

The triton launch is recorded instead of run (no GPU here): equal kernel arguments on equal inputs are equal
results, and the kernels themselves are tested against the oracle in ``test_triton_kernels.py`` (which now runs
them through the same launch plan)."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch

import spattn
import spattn.ops.attention.api as api
from spattn.integrations import hf

pytest.importorskip("triton")

from spattn.ops.attention.impl import triton as tri  # noqa: E402
from spattn.ops.attention.impl.triton import _launch  # noqa: E402


class Recorder:
    """Stands in for ``attn_fwd_kernel``: records each launch's grid, arguments and meta-parameters."""

    def __init__(self) -> None:
        self.launches: list[tuple] = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return launch


@contextlib.contextmanager
def recorded(monkeypatch):
    recorder = Recorder()
    monkeypatch.setattr(_launch, "attn_fwd_kernel", recorder)
    monkeypatch.setattr(tri, "supports", lambda q, k, v, layout: tri._check(q, k, v, layout))  # CPU tensors
    yield recorder


def _same_launch(a, b, outputs_differ: bool = True) -> None:
    """Equal grids, meta-parameters and arguments; tensors by identity of storage and layout, except the fresh
    outputs (positions 3 and 4: out and lse), compared by shape, strides and dtype."""
    (grid_a, args_a, kw_a), (grid_b, args_b, kw_b) = a, b
    assert grid_a == grid_b and kw_a == kw_b and len(args_a) == len(args_b)
    for i, (x, y) in enumerate(zip(args_a, args_b, strict=True)):
        if isinstance(x, torch.Tensor):
            assert (x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype), f"argument {i}"
            if i in (3, 4) and outputs_differ:
                continue
            assert torch.equal(x, y), f"argument {i}"
        else:
            assert x == y, f"argument {i}: {x!r} != {y!r}"


CASES = [
    pytest.param(spattn.Causal(), 256, False, id="causal-band"),
    pytest.param(spattn.Sinks(4) | spattn.Window(40), 300, False, id="sinks-window-tail"),
    pytest.param(spattn.PerHead((spattn.Window(40), spattn.Budgeted(48, sinks=4), spattn.Window(40),
                                 spattn.Window(100))), 256, True, id="per-head-strided"),
]


@pytest.mark.parametrize("pattern,L,strided", CASES)
def test_kept_launch_plan_launches_what_the_uncached_path_launches(monkeypatch, pattern, L, strided):
    gen = torch.Generator().manual_seed(0)
    if strided:  # the model's views: [B, L, H, D] transposed
        q = torch.randn(1, L, 4, 32, generator=gen).transpose(1, 2)
        k, v = (torch.randn(1, L, 2, 32, generator=gen).transpose(1, 2) for _ in range(2))
    else:
        q = torch.randn(1, 4, L, 32, generator=gen)
        k, v = (torch.randn(1, 2, L, 32, generator=gen) for _ in range(2))
    layout = spattn.compile(pattern, L, causal=True, block_size=64, heads=4)
    with recorded(monkeypatch) as rec, torch.no_grad():
        # the uncached launcher (what the custom op and autograd call), then a first and a kept call
        _launch.forward(q, k, v, layout.kv_num_blocks, layout.kv_indices, layout.kv_mask_ids,
                        layout.full_kv_num_blocks, layout.full_kv_indices, layout.masks, 0.125, tri._band(layout))
        for _ in range(2):
            spattn.attention(q, k, v, layout, causal=True, scale=0.125, backend="triton")
        assert len(_launch._forward_plans.get(layout)) == 1
    assert len(rec.launches) == 3
    _same_launch(rec.launches[0], rec.launches[1])
    _same_launch(rec.launches[1], rec.launches[2])
    # a new scale is a new signature: a new plan, with the new scale in its arguments
    with recorded(monkeypatch) as rec, torch.no_grad():
        spattn.attention(q, k, v, layout, causal=True, scale=0.25, backend="triton")
    assert len(_launch._forward_plans.get(layout)) == 2
    assert rec.launches[0][1][12] == pytest.approx(0.25 * _launch.LOG2E)


def test_kept_checks_still_reject_bad_inputs(monkeypatch):
    q, k, v = torch.randn(1, 4, 128, 32), torch.randn(1, 2, 128, 32), torch.randn(1, 2, 128, 32)
    layout = spattn.compile(spattn.Window(16), 128, causal=True, block_size=32, heads=4)
    free = spattn.compile(spattn.Window(16), 128, causal=False, block_size=32, heads=4)
    first = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    torch.testing.assert_close(spattn.attention(q, k, v, layout, causal=True, backend="reference"), first,
                               rtol=0, atol=0)
    assert layout in api._checked
    with pytest.raises(TypeError, match="share a dtype"):
        spattn.attention(q, k.double(), v, layout, causal=True, backend="reference")
    with pytest.raises(ValueError, match="compiled for q_len=128"):
        spattn.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], layout, causal=True, backend="reference")
    with pytest.raises(ValueError, match="causal=True but the layout"):
        spattn.attention(q, k, v, free, causal=True, backend="reference")
    with pytest.raises(ValueError, match="backend must be one of"):
        spattn.attention(q, k, v, layout, causal=True, backend="tritn")
    with pytest.raises(ValueError, match="scale must be a finite number"):
        spattn.attention(q, k, v, layout, causal=True, backend="reference", scale=float("nan"))
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        spattn.attention(q.numpy(), k, v, layout, causal=True, backend="reference")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):  # the real triton check on CPU tensors
        spattn.attention(q, k, v, layout, causal=True, backend="triton")


def test_static_pattern_shortcut_still_checks_new_signatures():
    q, k, v = torch.randn(1, 4, 128, 32), torch.randn(1, 2, 128, 32), torch.randn(1, 2, 128, 32)
    pattern = spattn.Sinks(4) | spattn.Window(16)
    first = spattn.attention(q, k, v, pattern, causal=True, backend="reference", block_size=32)
    layout = api._known_layout(pattern, q, k, True, 32)
    assert layout is not None and layout in api._checked  # the second call takes the shortcut
    torch.testing.assert_close(spattn.attention(q, k, v, pattern, causal=True, backend="reference", block_size=32),
                               first, rtol=0, atol=0)
    with pytest.raises(TypeError, match="share a dtype"):
        spattn.attention(q, k, v.double(), pattern, causal=True, backend="reference", block_size=32)
    with pytest.raises(ValueError, match="must be >= query length"):
        spattn.attention(q, k[:, :, :64], v[:, :, :64], pattern, causal=True, backend="reference", block_size=32)


def test_kept_checks_go_with_the_layout():
    q, k, v = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    layout = spattn.compile(spattn.Window(8), 64, causal=True, block_size=16)
    spattn.attention(q, k, v, layout, causal=True, backend="reference")
    kept = len(api._checked)
    del layout
    gc.collect()
    assert len(api._checked) == kept - 1


def test_dynamic_patterns_are_not_kept_per_call():
    q, k, v = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    kept = len(api._checked)
    for _ in range(3):  # a fresh Layout per call: nothing to keep
        spattn.attention(q, k, v, spattn.Sinks(4) | spattn.TopK("pooled", 2), causal=True, backend="reference",
                         block_size=16)
    assert len(api._checked) == kept


def _llama(layers: int):
    from .hf_support import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_layer_lookup_skips_pattern_lookups_and_follows_plan_edits(monkeypatch):
    model = _llama(3)
    ids = torch.randint(0, 50, (1, 64), generator=torch.Generator().manual_seed(1))
    plan = spattn.Plan(layers={0: spattn.PerHead((spattn.Window(8), spattn.Sinks(4) | spattn.Window(16),
                                                  spattn.Budgeted(24, sinks=4), spattn.Window(8))),
                               2: spattn.Window(12)})
    finds = {"n": 0}
    real = hf._find

    def counting(*args, **kwargs):
        finds["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(hf, "_find", counting)
    with torch.no_grad(), spattn.patched(model, plan, backend="reference", block_size=16):
        first = model(input_ids=ids).logits
        assert finds["n"] == 3  # one per layer (layer 1 is dense: Full)
        again = model(input_ids=ids).logits
        assert finds["n"] == 3  # the second forward finds every layer by its index
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        plan.layers[2] = spattn.Window(4)  # an edited plan gives a new pattern object: looked up again
        edited = model(input_ids=ids).logits
        assert finds["n"] == 4
    with torch.no_grad(), spattn.patched(model, spattn.Plan(layers={0: plan.layers[0], 2: spattn.Window(4)}),
                                         backend="reference", block_size=16):
        fresh = model(input_ids=ids).logits
    torch.testing.assert_close(edited, fresh, rtol=0, atol=0)
    assert not torch.equal(edited, first)
