"""spattn.coverage.reachability against brute-force boolean matrix powers."""

import pytest
import torch

import spattn
from spattn.coverage import reachability
from spattn.layout import from_dense


def brute(masks, causal):
    L = masks[0].shape[-1]
    R = torch.eye(L, dtype=torch.bool)
    fractions = []
    for A in masks:
        A = A.clone()
        if causal:
            A &= torch.ones(L, L, dtype=torch.bool).tril()
        A |= torch.eye(L, dtype=torch.bool)
        R = (A.double() @ R.double()) > 0
        fractions.append(R.sum().item() / (L * (L + 1) // 2 if causal else L * L))
    return torch.tensor(fractions, dtype=torch.float64), R


def token_mask(L, kind):
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    if kind == "window":
        return (j <= i) & (j > i - 5)
    if kind == "sinks+window":
        return ((j <= i) & (j > i - 7)) | (j < 2)
    if kind == "strided":
        return ((i - j) % 9 == 0) | ((j - i).abs() < 3)
    if kind == "global":
        return (j == 13) | (i == 13) | ((j - i).abs() < 2)
    return torch.rand(L, L) < 0.01


@pytest.mark.parametrize("kind", ["window", "sinks+window", "strided", "global", "random"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("L,bs", [(100, 16), (130, 4), (65, 64), (200, 128)])
def test_repeated_layout_matches_brute_force(kind, causal, L, bs):
    heads = torch.stack([token_mask(L, kind), torch.rand(L, L) < 0.002])  # union over heads
    layout = from_dense(heads[None], bs)
    r = reachability(layout, causal=causal, max_layers=10, return_matrix=True)
    want, R = brute([heads.any(0)] * 10, causal)
    torch.testing.assert_close(r.fraction, want, rtol=0, atol=1e-15)
    assert torch.equal(r.matrix, R)
    assert torch.equal(r.receptive_field, R.sum(-1))
    full = (want == 1).nonzero()
    assert r.layers_to_full == (int(full[0]) + 1 if full.numel() else None)


def test_per_layer_stack_matches_brute_force():
    L, bs = 150, 32
    masks = [torch.rand(1, 2, L, L) < 0.02 for _ in range(6)]
    r = reachability([from_dense(m, bs) for m in masks], causal=True, return_matrix=True)
    want, R = brute([m[0].any(0) for m in masks], True)
    torch.testing.assert_close(r.fraction, want, rtol=0, atol=1e-15)
    assert torch.equal(r.matrix, R)


@pytest.mark.parametrize("pattern", [
    spattn.Sinks(8) | spattn.Window(20),
    spattn.Strided(16) | spattn.Window(8),
    spattn.Global([5, 77]) | spattn.Window(4),
    spattn.RandomBlocks(2, seed=1, block=16) | spattn.Window(4),
], ids=["sinks-window", "strided", "global", "random-blocks"])
def test_compiled_patterns(pattern):
    L = 160
    layout = spattn.compile(pattern, L, L, causal=True, block_size=32)
    r = reachability(layout, causal=True, max_layers=8, return_matrix=True)
    want, R = brute([layout.to_dense()[0].any(0)] * 8, True)
    torch.testing.assert_close(r.fraction, want, rtol=0, atol=1e-15)
    assert torch.equal(r.matrix, R)


def test_window_reach_grows_by_the_window():
    L, w = 1024, 64
    layout = spattn.compile(spattn.Window(w), L, L, causal=True, block_size=64)
    r = reachability(layout, causal=True, max_layers=20)
    step = int(layout.to_dense()[0, 0, 500].sum()) - 1  # how far back one layer reads
    # after n layers token i reaches sources [i - n step, i]
    assert r.layers_to_full == -(-(L - 1) // step)
    assert r.counts[0] == sum(min(i, step) + 1 for i in range(L))
    assert int(r.receptive_field[-1]) == L and int(r.receptive_field[0]) == 1


def test_errors():
    lay = spattn.compile(spattn.Window(4), 16, 16, block_size=4)
    with pytest.raises(ValueError, match="max_layers"):
        reachability(lay, causal=True)
    with pytest.raises(ValueError, match="self-attention"):
        reachability(spattn.compile(spattn.Full(), 8, 16, block_size=4), causal=False, max_layers=2)
    with pytest.raises(TypeError, match="Layout"):
        reachability([1, 2], causal=True)


def test_swar_popcount_matches_python():
    from spattn.coverage.reach import _count, _popcount

    x = torch.randint(-(1 << 63), (1 << 63) - 1, (1000,), dtype=torch.int64)
    x[:3] = torch.tensor([-1, 0, -(1 << 63)])
    want = torch.tensor([bin(v & ((1 << 64) - 1)).count("1") for v in x.tolist()])
    assert torch.equal(_popcount(x), want)  # the GPU path
    assert torch.equal(_count(x), want)  # the CPU path (numpy when present)
