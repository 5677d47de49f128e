"""LearnedTopK.layout: the safeguard compiled once per shape and the routed blocks merged into it on the device
(no host read, so the training step can be recorded in a CUDA graph) equals compiling
``safeguard | BlockLayout(chosen | local)`` token for token, for every safeguard, band, causality and shape."""

import pytest
import torch

import spattn
from spattn.learned.router import LearnedTopK
from spattn.patterns import BlockLayout


@pytest.mark.parametrize(
    ("safeguard", "local", "causal", "Lq", "Lk", "H", "Hkv", "blocks"),
    [
        pytest.param(spattn.Window(8), 0, True, 64, 64, 1, 1, 1, id="window-causal"),
        pytest.param(spattn.Sinks(3) | spattn.Window(5), 1, True, 61, 61, 4, 2, 2, id="sinks-window-local-gqa-L61"),
        pytest.param(None, 1, True, 40, 72, 2, 2, 2, id="no-safeguard-local-Lk72"),
        pytest.param(spattn.Window(6, 6), 0, False, 48, 48, 2, 1, 1, id="bidirectional"),
        pytest.param(None, 0, True, 33, 33, 1, 1, 3, id="routing-only-L33"),
    ],
)
def test_merged_layout_equals_the_compiled_union(safeguard, local, causal, Lq, Lk, H, Hkv, blocks):
    torch.manual_seed(0)
    router = LearnedTopK(H, Hkv, 16, blocks=blocks, block_size=8, safeguard=safeguard, local=local,
                         backend="reference")
    query, key = torch.randn(2, H, Lq, 16), torch.randn(2, Hkv, Lk, 16)
    chosen = router.route(query, key, causal=causal)
    assert chosen.any()  # something was routed
    merged = router.layout(query, key, chosen, causal=causal)
    pattern = BlockLayout(chosen | router.local_blocks(Lq, Lk, query.device), block=8)
    if safeguard is not None:
        pattern = safeguard | pattern
    compiled = spattn.compile(pattern, Lq, Lk, causal=causal, block_size=8, batch=2, heads=H)
    assert torch.equal(merged.to_dense(), compiled.to_dense().expand(2, H, Lq, Lk))
    assert merged.kv_indices.shape[-1] == merged.num_kv_blocks  # fixed width: no count read on the host
    # a second call reuses the shape's tables and still follows the new selection
    again = router.layout(query, key, torch.zeros_like(chosen), causal=causal)
    base = router.local_blocks(Lq, Lk, query.device)
    fixed = BlockLayout(base, block=8) if safeguard is None else safeguard | BlockLayout(base, block=8)
    expected = spattn.compile(fixed, Lq, Lk, causal=causal, block_size=8, batch=2, heads=H).to_dense()
    assert torch.equal(again.to_dense(), expected.expand(2, H, Lq, Lk))


def test_straight_through_training_matches_the_sparse_forward_and_reaches_the_gate():
    """The training pass (with its routing bias riding in extra head dimensions) gives the evaluation pass's
    output, and the loss reaches the gate parameters."""
    torch.manual_seed(1)
    router = LearnedTopK(2, 2, 16, blocks=1, block_size=8, safeguard=spattn.Window(8), local=0,
                         backend="reference")
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    out = router.attend(q, k, v, causal=True, scale=0.25)
    out.square().sum().backward()
    assert router.gate.query_proj.grad is not None and router.gate.query_proj.grad.abs().sum() > 0
    router.eval()
    with torch.no_grad():
        plain = router.attend(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out.detach(), plain, rtol=1e-5, atol=1e-6)
