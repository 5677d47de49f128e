"""spattn.learned: the gate against its float64 reference, gradients, distillation on planted structure, the
gate selector inside TopK (safeguards kept, save -> load -> same selections), regularisers, collapse."""

from __future__ import annotations

import math

import pytest
import torch

import spattn
from spattn.learned import (
    BlockGate,
    LearnedTopK,
    Schedule,
    balance_loss,
    block_targets,
    collapse_metrics,
    density_loss,
    distill_loss,
    drop_blocks,
    entropy_loss,
    expected_density,
    load,
    load_gates,
    save_gates,
    train_gate,
)
from spattn.learned.regularisers import importance, row_entropy
from spattn.selectors import TopK, TopP
from spattn.selectors.common import visible_blocks
from spattn.testing import brute_force_mask

pytest.importorskip("safetensors")


@pytest.mark.parametrize(
    "B, H, Hkv, Lq, Lk, D, bs, causal",
    [
        pytest.param(1, 2, 2, 64, 64, 16, 16, True, id="B1-L64-mha-causal"),
        pytest.param(2, 4, 2, 63, 63, 8, 16, True, id="B2-L63-gqa-causal"),
        pytest.param(1, 3, 1, 37, 100, 8, 16, True, id="B1-Lq37-Lk100-mqa-decode"),
        pytest.param(1, 2, 1, 1, 33, 8, 16, False, id="B1-Lq1-noncausal"),
    ],
)
def test_gate_matches_float64_reference(B, H, Hkv, Lq, Lk, D, bs, causal):
    gate = BlockGate(H, Hkv, D, block_size=bs, hidden=8)
    q, k = torch.randn(B, H, Lq, D), torch.randn(B, Hkv, Lk, D)
    fast = gate(q, k, causal=causal)
    ref = gate.reference(q, k, causal=causal)
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-4)
    visible = visible_blocks(Lq, Lk, bs, causal, q.device)
    assert bool((fast[..., ~visible] == 0).all())
    torch.testing.assert_close(fast.sum(-1), torch.ones(B, H, fast.shape[2]))


def test_gate_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_kv_heads"):
        BlockGate(4, 3, 16)
    gate = BlockGate(4, 2, 16, block_size=8)
    with pytest.raises(ValueError, match="gate was built for"):
        gate(torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8))
    with pytest.raises(ValueError, match="path="):
        spattn.learned.Gate()


def test_gradients_reach_the_gate_parameters():
    gate = BlockGate(2, 1, 16, block_size=16, hidden=8)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 1, 128, 16)
    logits, visible = gate.logits(q, k, causal=True)
    loss = distill_loss(logits, visible, block_targets(q, k, 16, causal=True))
    loss.backward()
    assert gate.query_proj.grad.abs().sum() > 0 and gate.key_proj.grad.abs().sum() > 0
    assert bool(torch.isfinite(loss)) and float(loss.detach()) >= 0


def test_block_targets_are_the_block_pooled_dense_mass():
    q, k = torch.randn(1, 2, 48, 8, dtype=torch.float64), torch.randn(1, 1, 48, 8, dtype=torch.float64)
    t = block_targets(q, k, 16, causal=True)
    p = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)).masked_fill(
        torch.ones(48, 48, dtype=torch.bool).triu(1), -math.inf), -1)  # dense, by definition
    pooled = p.view(1, 2, 3, 16, 3, 16).sum((-1, -3))
    torch.testing.assert_close(t.double(), pooled / pooled.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def _planted(seed: int, L: int = 192, bs: int = 16, D: int = 16, strength: float = 5.0):
    """q/k where two far key blocks (different per sample) hold most of every later query's mass: their keys
    share a direction (a content feature, the same in every sample) that every query carries."""
    direction = torch.randn(D, generator=torch.Generator().manual_seed(12345))
    direction = direction / direction.norm()
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, L, D, generator=g) * 0.3
    k = torch.randn(1, 1, L, D, generator=g) * 0.3
    blocks = torch.randperm(L // bs - 4, generator=g)[:2] + 1  # far from the last query blocks
    for c in blocks.tolist():
        k[0, 0, c * bs:(c + 1) * bs] += strength * direction
    q += strength * direction
    return q, k, sorted(blocks.tolist())


def test_distilled_gate_finds_planted_far_blocks():
    gate = BlockGate(2, 1, 16, block_size=16, hidden=16)
    pairs = [_planted(s)[:2] for s in range(3)]
    losses = train_gate(gate, pairs, steps=40, lr=1e-2)
    assert losses[-1] < losses[0] * 0.5
    hits, total = 0, 0
    for seed in (100, 101, 102):  # held-out samples, other planted blocks
        q, k, planted = _planted(seed)
        chosen = torch.topk(gate(q, k, causal=True), 2, dim=-1).indices  # [1, 2, NQ, 2]
        for qb in range(max(planted) + 1, chosen.shape[2]):
            hits += sum(int(c in planted) for c in chosen[0, :, qb].flatten().tolist())
            total += chosen[0, :, qb].numel()
    assert hits / total >= 0.9


def _gate_file(tmp_path, H=4, Hkv=2, D=16, bs=16):
    gates = {0: BlockGate(H, Hkv, D, block_size=bs, hidden=8), 3: BlockGate(H, Hkv, D, block_size=bs, hidden=8)}
    path = save_gates(tmp_path / "gates.safetensors", gates, meta={"note": "test"})
    return gates, path


def test_save_load_same_selections_and_json_round_trip(tmp_path):
    gates, path = _gate_file(tmp_path)
    loaded = load_gates(path)
    assert sorted(loaded) == [0, 3] and spattn.learned.read_meta(path) == {"note": "test"}
    q, k, v = torch.randn(2, 4, 200, 16), torch.randn(2, 2, 200, 16), torch.randn(2, 2, 200, 16)
    torch.testing.assert_close(loaded[3](q, k), gates[3](q, k))
    pattern = spattn.Sinks(4) | spattn.Window(16) | TopK(load(path, layer=3), 3)
    again = spattn.pattern_from_dict(pattern.to_dict())
    assert again.to_dict() == pattern.to_dict()
    a = spattn.compile(pattern, 200, causal=True, block_size=16, batch=2, heads=4, query=q, key=k)
    b = spattn.compile(again, 200, causal=True, block_size=16, batch=2, heads=4, query=q, key=k)
    assert torch.equal(a.to_dense(), b.to_dense())
    # the loaded gate's scores drive the selection: the selector's top block is always kept
    top = gates[3](q, k).view(2, 2, 2, 13, 13).mean(2).argmax(-1).repeat_interleave(2, 1)  # group sharing
    st = a.block_status()
    assert bool((st.gather(-1, top[..., None]) > 0).all())
    out = spattn.attention(q, k, v, pattern, causal=True, block_size=16)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    p = TopP("gate", 0.8, options={"path": str(path), "layer": 0})
    assert spattn.compile(p, 200, causal=True, block_size=16, batch=2, heads=4, query=q, key=k).density() > 0


def test_gate_selector_errors(tmp_path):
    _, path = _gate_file(tmp_path)
    with pytest.raises(ValueError, match="no layer 5"):
        load(path, layer=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "missing.safetensors")
    q, k = torch.randn(1, 4, 64, 16), torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="block_size=16"):
        spattn.compile(TopK(load(path), 2), 64, causal=True, block_size=32, query=q, key=k)


def test_safeguards_are_never_dropped_by_learned_selection(tmp_path):
    _, path = _gate_file(tmp_path)
    L, bs = 160, 16
    q, k = torch.randn(1, 4, L, 16), torch.randn(1, 2, L, 16)
    ids = torch.randint(0, 30, (1, L))
    essential = spattn.Essential(positions=(7, 90), flags=spattn.essential_flags(ids, "rare"))
    safeguard = spattn.Sinks(2) | spattn.Window(8) | essential
    layout = spattn.compile(safeguard | TopK(load(path, layer=0), 1), L, causal=True, block_size=bs, heads=4,
                            query=q, key=k)
    must = brute_force_mask(safeguard, L, causal=True)
    assert bool((layout.to_dense() | ~must).all())
    router = LearnedTopK(4, 2, 16, blocks=1, block_size=bs, safeguard=safeguard, drop=0.9, noise=3.0)
    router.train()
    chosen = router.route(q, k, causal=True)
    routed = router.layout(q, k, chosen, causal=True)
    assert bool((routed.to_dense() | ~must).all())


def test_regularisers_move_their_metrics():
    torch.manual_seed(1)
    visible = visible_blocks(128, 128, 16, True, torch.device("cpu"))
    logits = (torch.randn(1, 2, 8, 8) * 4).requires_grad_()

    def probs():
        return spattn.selectors.common.masked_softmax(logits, visible)

    def descend(loss_fn, steps=30, lr=0.5):
        opt = torch.optim.SGD([logits], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()

    def mean_entropy():
        e, ok = row_entropy(probs().detach(), visible)
        return float((e * ok).sum() / ok.sum())

    before = mean_entropy()
    descend(lambda: entropy_loss(probs(), visible), lr=20.0)
    assert mean_entropy() > before + 0.1
    before = float(expected_density(probs().detach(), visible))
    descend(lambda: density_loss(probs(), visible, 0.1), lr=5.0)
    assert float(expected_density(probs().detach(), visible)) < before
    with torch.no_grad():
        logits.copy_(torch.randn(1, 2, 8, 8) * 0.5)
        logits[..., 0] += 3.0  # every row piles onto key block 0
    before = float(balance_loss(probs().detach(), visible))
    descend(lambda: balance_loss(probs(), visible), lr=2.0)
    assert float(balance_loss(probs().detach(), visible)) < 0.5 * before
    uniform = spattn.selectors.common.masked_softmax(torch.zeros(1, 1, 8, 8), visible)
    imp, seen = importance(uniform, visible)
    torch.testing.assert_close(imp[seen], torch.ones(int(seen.sum())))
    assert float(balance_loss(uniform, visible)) < 1e-10
    chosen = torch.ones(4, 4, 32, 32, dtype=torch.bool)
    kept = drop_blocks(chosen, 0.25, generator=torch.Generator().manual_seed(0)).float().mean()
    assert 0.72 < float(kept) < 0.78 and drop_blocks(chosen, 0.0) is chosen
    with pytest.raises(ValueError, match="rate"):
        drop_blocks(chosen, 1.0)


def test_collapse_metrics_on_known_selections():
    spread = torch.eye(8, dtype=torch.bool)[None, None]  # each query block its own key block
    same = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    same[..., 0] = True  # every query block picks block 0
    a, b = collapse_metrics(spread), collapse_metrics(same)
    assert a["distinct_blocks"] == 1.0 and a["usage_entropy"] == pytest.approx(1.0)
    assert b["distinct_blocks"] == pytest.approx(1 / 8) and b["usage_entropy"] == 0.0


def _copy_stream(n=4000, vocab=64, seed=0):
    """Tokens made of repeated random phrases: looking back pays, so routing matters."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(0, vocab, (32, 16), generator=g)
    return phrases[torch.randint(0, 32, (n // 16,), generator=g)].flatten()


def _train_tiny(regularisers, steps=30):
    from spattn.learned.train import fit, lm_batches
    from spattn.nn import TransformerLM

    torch.manual_seed(0)

    def router(_layer):
        return LearnedTopK(2, 1, 16, blocks=2, block_size=16, safeguard=spattn.Window(16), temperature=0.1,
                           backend="reference")

    lm = TransformerLM(64, dim=32, layers=1, num_heads=2, num_kv_heads=1, pattern=router, block_size=16)
    return fit(lm, lm_batches(_copy_stream(), 128, 2), steps=steps, lr=1e-2, regularisers=regularisers,
               log_every=steps - 1)["history"]


def test_collapse_without_regularisers_and_not_with_them():
    from spattn.learned.train import Regularisers

    plain = _train_tiny(Regularisers())
    guarded = _train_tiny(Regularisers.anti_collapse())
    assert plain[0]["gate_entropy"] == pytest.approx(guarded[0]["gate_entropy"], abs=1e-6)  # same start
    assert plain[-1]["gate_entropy"] < 0.5 * plain[0]["gate_entropy"]  # the gate collapses onto one block
    assert guarded[-1]["gate_entropy"] > plain[0]["gate_entropy"]  # and does not with the regularisers
    assert guarded[-1]["gate_entropy"] > plain[-1]["gate_entropy"] + 0.3
    assert "entropy" in guarded[-1] and "balance" in guarded[-1]


def test_schedule():
    s = Schedule(2.0, 0.5, 100)
    assert s.at(0) == 2.0 and s.at(50) == 1.25 and s.at(100) == 0.5 and s.at(1000) == 0.5
    e = Schedule(1.0, 0.01, 10, shape="exponential")
    assert e.at(5) == pytest.approx(0.1)
    assert Schedule(8, 2, 6, integer=True).at(3) == 5
    assert Schedule.constant(3.0).at(7) == 3.0
    with pytest.raises(ValueError, match="shape"):
        Schedule(1, 2, 3, shape="step")
