"""A distilled gate reads rotary queries and keys, so it is trained only for the positions of its distillation
chunks (SmolLM2 at 8192 with gates distilled at 4096: ``docs/learned.md``). Using it past them warns."""

from __future__ import annotations

import warnings

import pytest
import torch

import spattn
from spattn.learned import BlockGate, load, save_gates

pytest.importorskip("safetensors")


def _checkpoint(tmp_path, meta):
    torch.manual_seed(0)
    gate = BlockGate(num_heads=2, num_kv_heads=1, head_dim=8, block_size=16, hidden=8)
    return save_gates(tmp_path / "gates.safetensors", {0: gate}, meta=meta)


def _select(path, length):
    q, k = torch.randn(1, 2, length, 8), torch.randn(1, 1, length, 8)
    return spattn.compile(spattn.TopK(load(path, 0), 2), length, length, causal=True, block_size=16, query=q, key=k)


def test_gate_used_past_its_distillation_length_warns(tmp_path):
    path = _checkpoint(tmp_path, {"chunk_length": 64})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the distilled positions: silent
        _select(path, 64)
        _select(path, 48)
    with pytest.warns(UserWarning, match="distilled on 64-token chunks and is used on 128 keys"):
        _select(path, 128)


def test_gate_without_a_recorded_length_stays_silent(tmp_path):
    path = _checkpoint(tmp_path, {"note": "saved by hand"})  # save_gates without distill's notes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _select(path, 128)
