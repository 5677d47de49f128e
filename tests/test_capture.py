"""spattn.capture: per-layer queries/keys after rotary embeddings, pooled statistics, safetensors round trip."""

import pytest
import torch

import spattn
from spattn.capture import Capture, capture
from tests.hf_support import smollm2, tiny_bert, tiny_llama

L = 512  # SmolLM2 capture length (real Austen text)


def _recall(query, key, causal, scale):
    """Dense softmax mass on the keys a full layout keeps: spattn.coverage if present, else by hand."""
    try:
        from spattn.coverage.measure import measure
    except ImportError:
        measure = None
    if measure is not None:
        return measure(query, key, spattn.Full(), causal=causal, scale=scale).recall
    H, Hk = query.shape[1], key.shape[1]
    k = key.repeat_interleave(H // Hk, 1)
    p = torch.softmax((query @ k.transpose(-1, -2) * scale).masked_fill(
        ~torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(), float("-inf")), -1)
    return p.sum(-1)


def test_smollm2_capture_shapes_and_dense_recall(tmp_path):
    from spattn.data.chunks import text_chunks

    model, tokenizer = smollm2()
    ids = text_chunks("austen", tokenizer, L, split="held_out", max_chunks=1)
    cap = capture(model, ids)
    assert cap.mode == "full" and cap.causal and cap.scale == pytest.approx(64**-0.5)
    assert cap.layers == list(range(30))
    for layer in cap.layers:
        assert cap.queries[layer].shape == (1, 9, L, 64)
        assert cap.keys[layer].shape == (1, 3, L, 64)
    for layer in (0, 17, 29):
        recall = _recall(cap.queries[layer], cap.keys[layer], cap.causal, cap.scale)
        assert torch.allclose(recall, torch.ones_like(recall), atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    # the recorded queries are the model's own, after rotary embeddings
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    with torch.no_grad():
        attn = model.model.layers[0].self_attn
        hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attn.q_proj(hidden).view(1, L, 9, 64).transpose(1, 2)
        k = attn.k_proj(hidden).view(1, L, 3, 64).transpose(1, 2)
        cos, sin = model.model.rotary_emb(hidden, torch.arange(L)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    assert (q - cap.queries[0]).abs().max() < 1e-4 and (k - cap.keys[0]).abs().max() < 1e-4
    path = cap.save(tmp_path / "cap.safetensors")
    again = Capture.load(path)
    assert again.layers == cap.layers and again.meta == cap.meta and again.scale == cap.scale
    assert torch.equal(again.keys[29], cap.keys[29])


def test_pooled_matches_full_and_padding():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 70))
    mask = torch.ones(2, 70, dtype=torch.long)
    mask[1, 50:] = 0
    full = capture(model, {"input_ids": ids, "attention_mask": mask})
    pooled = capture(model, {"input_ids": ids, "attention_mask": mask}, mode="pooled", block_size=32, layers=[1])
    assert pooled.mode == "pooled" and pooled.layers == [1]
    assert pooled.query_mean[1].shape == (2, 4, 3, 16) and pooled.key_norm_max[1].shape == (2, 2, 3)
    q = full.queries[1]
    assert torch.allclose(pooled.query_mean[1][0, :, 1], q[0, :, 32:64].mean(1), atol=1e-5)
    assert torch.allclose(pooled.query_mean[1][1, :, 1], q[1, :, 32:50].mean(1), atol=1e-5)  # padding excluded
    assert torch.allclose(pooled.key_norm_max[1][0, :, 2], full.keys[1][0, :, 64:].norm(dim=-1).amax(-1))
    assert full.segment_ids()[1, 49] == 0 and full.segment_ids()[1, 50] == -1
    # auto mode falls back to pooled when the tensors would not fit
    assert capture(model, ids, max_bytes=1000).mode == "pooled"


def test_encoder_capture_and_errors(tmp_path):
    model = tiny_bert()
    cap = capture(model, torch.randint(0, 120, (1, 9)))
    assert not cap.causal and cap.queries[0].shape == (1, 3, 9, 16) and cap.layers == [0, 1]
    with pytest.raises(ValueError, match="mode"):
        capture(model, torch.randint(0, 120, (1, 9)), mode="tiny")
    with pytest.raises(ValueError, match="out of range"):
        capture(model, torch.randint(0, 120, (1, 9)), layers=[5])
    with pytest.raises(TypeError, match="inputs"):
        capture(model, "text")
    with pytest.raises(ValueError, match="block_size"):
        capture(model, torch.randint(0, 120, (1, 9)), block_size=0)
    with pytest.raises(FileNotFoundError):
        Capture.load(tmp_path / "missing.safetensors")
