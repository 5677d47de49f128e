"""The dynamic path under ``torch.compile(fullgraph=True)``: a function calling ``LayoutBuilder.build`` for
``Sinks(64) | Window(512) | TopK("pooled", 4)`` traces as one graph and gives the eager tables exactly (issue 18;
it used to stop on "Unsupported dataclass fields failure" in ``get_selector``). The ``eager`` backend runs
dynamo's full trace without inductor's compile time; the H200 suite runs inductor + the triton kernel."""

from __future__ import annotations

import torch

import spattn
from spattn.selectors import LayoutBuilder, TopK
from spattn.testing import assert_within, dense_attention, plain_attention


def test_layout_builder_traces_fullgraph_and_matches_eager():
    H, Hkv, L = 4, 2, 777  # GQA, a length that is no multiple of the block
    torch._dynamo.reset()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, H, L, 16), torch.randn(1, Hkv, L, 16), torch.randn(1, Hkv, L, 16)
    pattern = spattn.Sinks(64) | spattn.Window(512) | TopK("pooled", 4)
    builder = LayoutBuilder(pattern, L, causal=True, batch=1, heads=H, block_size=128)

    def tables(q, k):
        layout = builder.build(q, k)
        return tuple(layout.tables().values())

    traced = torch.compile(tables, fullgraph=True, backend="eager")(q, k)
    eager = tables(q, k)
    for got, want in zip(traced, eager, strict=True):
        assert torch.equal(got, want)
    # the traced tables run the attention the float64 oracle agrees with
    ref = builder.build(q, k)
    layout = spattn.Layout(q_len=L, kv_len=L, block_size=128, causal=True,
                           **dict(zip(ref.tables(), traced, strict=True)))
    allowed, scale = ref.to_dense(), 16**-0.5
    out = spattn.attention(q, k, v, layout, causal=True, backend="reference")
    assert_within(out, dense_attention(q, k, v, allowed, scale)[0], plain_attention(q, k, v, allowed, scale)[0])
