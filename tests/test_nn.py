"""spattn.nn: SparseAttention against the float64 dense oracle on its own projections, parametrised patterns
(registered parameters, straight-through pass == sparse pass), TransformerLM, and the trainer's checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import spattn
from spattn.learned import LearnedTopK
from spattn.nn import SparseAttention, TransformerLM
from spattn.testing import assert_within, brute_force_mask, dense_attention, plain_attention


@pytest.mark.parametrize(
    "L, H, Hkv, pattern",
    [
        pytest.param(63, 4, 2, None, id="L63-gqa-dense"),
        pytest.param(127, 4, 4, spattn.Sinks(4) | spattn.Window(16), id="L127-mha-sinks-window"),
        pytest.param(100, 4, 1, spattn.Window(8) | spattn.Essential(positions=(3, 50)), id="L100-mqa-essential"),
    ],
)
def test_sparse_attention_matches_the_dense_oracle(L, H, Hkv, pattern):
    layer = SparseAttention(64, H, Hkv, pattern=pattern, block_size=16)
    x = torch.randn(2, L, 64)
    q, k, v = layer.project(x)
    mask = brute_force_mask(pattern if pattern is not None else spattn.Full(), L, causal=True)
    golden, _ = dense_attention(q, k, v, mask)
    baseline, _ = plain_attention(q, k, v, mask)
    assert_within(layer.attend(q, k, v).detach(), golden, baseline, k=2.0, eps=1e-6)
    assert layer(x).shape == x.shape


def test_dynamic_pattern_and_rotary_options():
    layer = SparseAttention(32, 2, pattern=spattn.Window(16) | spattn.TopK("pooled", 1), block_size=16, rotary=500.0)
    out = layer(torch.randn(1, 80, 32))
    assert out.shape == (1, 80, 32) and bool(torch.isfinite(out).all())
    plain = SparseAttention(32, 2, rotary=False)
    assert plain(torch.randn(1, 5, 32)).shape == (1, 5, 32)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="num_kv_heads"):
        SparseAttention(64, 4, 3)
    with pytest.raises(TypeError, match="attend"):
        SparseAttention(64, 4, pattern=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rotary"):
        SparseAttention(30, 2, head_dim=15)
    with pytest.raises(ValueError, match=r"\[B, L, 64\]"):
        SparseAttention(64, 4)(torch.randn(2, 10, 32))


def test_parametrised_pattern_is_a_submodule_and_straight_through_equals_sparse():
    router = LearnedTopK(4, 2, 16, blocks=2, block_size=16, safeguard=spattn.Sinks(4) | spattn.Window(16))
    layer = SparseAttention(64, 4, 2, pattern=router)
    assert "pattern.gate.query_proj" in layer.state_dict()
    assert any(p is router.gate.key_proj for p in layer.parameters())
    x = torch.randn(2, 150, 64)
    layer.train()
    out_train = layer(x)  # straight-through pass (block bias as extra head dims)
    out_train.square().sum().backward()
    assert router.gate.query_proj.grad.abs().sum() > 0  # the LM loss reaches the gate
    layer.eval()
    with torch.no_grad():
        out_eval = layer(x)  # plain sparse attention on the same selection
    torch.testing.assert_close(out_train.detach(), out_eval, atol=1e-5, rtol=1e-4)
    q, k, v = layer.project(x)
    chosen = router.route(q, k, causal=True)
    mask = router.layout(q, k, chosen, causal=True).to_dense()
    golden, _ = dense_attention(q, k, v, mask, scale=0.25)
    inner = router.attend(q, k, v, causal=True, scale=0.25)
    assert_within(inner.detach(), golden, plain_attention(q, k, v, mask, scale=0.25)[0], k=2.0, eps=1e-6)


def test_distill_router_trains_the_gate_only_through_its_loss():
    router = LearnedTopK(2, 1, 16, blocks=1, block_size=16, safeguard=spattn.Window(16), training="distill")
    layer = SparseAttention(32, 2, 1, pattern=router)
    out = layer(torch.randn(1, 96, 32))
    losses = layer.regularisers()
    assert set(losses) == {"distill_loss"}
    out.sum().backward(retain_graph=True)
    assert router.gate.query_proj.grad is None  # the LM loss does not reach the detached gate
    losses["distill_loss"].backward()
    assert router.gate.query_proj.grad.abs().sum() > 0
    assert layer.query_proj.weight.grad is not None


def _recall_task(n, L=64, pairs=4, vocab=40, seed=0):
    """A tiny associative-recall task: key/value pairs first, then keys again; label = the value after a key."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.zeros(n, L, dtype=torch.long)
    labels = torch.full((n, L), -100, dtype=torch.long)
    for i in range(n):
        keys = torch.randperm(vocab // 2 - 1, generator=g)[:pairs] + 1
        values = torch.randperm(vocab // 2, generator=g)[:pairs] + vocab // 2
        inputs[i, 0:2 * pairs:2], inputs[i, 1:2 * pairs:2] = keys, values
        slots = torch.randperm((L - 2 * pairs) // 2, generator=g)[:pairs] * 2 + 2 * pairs
        inputs[i, slots] = keys
        labels[i, slots] = values
    return inputs, labels


def test_train_task_with_learned_attention_logs_and_checkpoints(tmp_path):
    pytest.importorskip("safetensors")
    from spattn.learned.train import Regularisers, evaluate, fit, load_checkpoint, task_batches

    inputs, labels = _recall_task(64)
    factory = lambda _layer: LearnedTopK(2, 1, 16, blocks=1, block_size=16, safeguard=spattn.Window(8))  # noqa: E731
    model = TransformerLM(40, dim=32, layers=1, num_heads=2, num_kv_heads=1, pattern=factory, block_size=16)
    held = [(inputs[:16], labels[:16])]
    result = fit(model, task_batches(inputs[16:], labels[16:], 8), steps=12, lr=1e-2,
                 regularisers=Regularisers(entropy=0.1, density=0.1, balance=0.1, drop=0.1),
                 eval_batches=held, log_every=6, log_path=tmp_path / "log.jsonl", checkpoint=tmp_path / "m.safetensors",
                 meta={"recipe": "test"})
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 6, 11] and result["final"] == lines[-1]
    for key in ("loss", "entropy", "density", "balance", "distinct_blocks", "gate_entropy", "eval_loss"):
        assert key in lines[-1]
    assert lines[-1]["loss"] < lines[0]["loss"]
    again = TransformerLM(40, dim=32, layers=1, num_heads=2, num_kv_heads=1, pattern=factory, block_size=16)
    meta = load_checkpoint(tmp_path / "m.safetensors", again)
    assert meta["recipe"] == "test"
    assert evaluate(again, held) == pytest.approx(evaluate(model, held))
