"""Gate distillation on a frozen Hugging Face model: trains only the gates, saves safetensors, and the loaded
gates drive a JSON plan that patches the model; the CLI mounts ``spattn train``."""

from __future__ import annotations

import pytest
import torch

import spattn
from spattn.learned import distill, load, read_meta

pytest.importorskip("safetensors")
from tests.hf_support import tiny_llama  # noqa: E402 - skips without transformers


def test_distill_a_frozen_model_then_plan_with_the_gates(tmp_path):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chunks = torch.randint(0, 97, (2, 128))
    path = tmp_path / "gates.safetensors"
    gates = distill(model, chunks, block_size=16, hidden=8, steps=8, lr=1e-2, path=path)
    assert sorted(gates) == [0, 1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model stays frozen
    meta = read_meta(path)
    assert meta["steps"] == 8 and set(meta["final_loss"]) == {"0", "1"}
    plan = spattn.Plan(layers={i: spattn.Window(16) | spattn.TopK(load(path, i), 2) for i in gates})
    plan = spattn.Plan.from_json(plan.to_json())  # the gates travel as (path, layer)
    with spattn.patched(model, plan, block_size=16):
        sparse = model(input_ids=chunks).logits
    dense = model(input_ids=chunks).logits
    assert bool(torch.isfinite(sparse).all()) and not torch.equal(sparse, dense)
    with pytest.raises(ValueError, match="chunks"):
        distill(model, torch.randn(2, 8))


def test_cli_mounts_train():
    from typer.testing import CliRunner

    from spattn.cli.main import app
    from spattn.cli.train import attention_factory

    result = CliRunner().invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and all(w in result.output for w in ("distil", "lm", "task"))
    window = attention_factory("window", heads=2, kv_heads=1, head_dim=16, budget=3, block_size=16)(0)
    assert window == spattn.Window(32)
    learned = attention_factory("learned", heads=2, kv_heads=1, head_dim=16, budget=3, block_size=16)(0)
    assert learned.blocks == 2 and learned.local == 1
    with pytest.raises(ValueError, match="variant"):
        attention_factory("moba", heads=2, kv_heads=1, head_dim=16, budget=3, block_size=16)
