"""spattn.capture: per-layer queries/keys after rotary embeddings, pooled statistics, safetensors round trip."""

import pytest
import torch

from spattn.integrations.capture import Capture, capture
from tests.hf_support import smollm2, tiny_bert, tiny_llama

L = 512  # SmolLM2 capture length (real Austen text)


def test_smollm2_capture_shapes_and_attention_reproduced(tmp_path):
    from spattn.data.chunks import text_chunks

    model, tokenizer = smollm2()
    ids = text_chunks("austen", tokenizer, L, split="held_out", max_chunks=1)
    cap = capture(model, ids)
    assert cap.mode == "full" and cap.causal and cap.scale == pytest.approx(64**-0.5)
    assert cap.layers == list(range(30))
    for layer in cap.layers:
        assert cap.queries[layer].shape == (1, 9, L, 64)
        assert cap.keys[layer].shape == (1, 3, L, 64)
    for layer in cap.layers:
        assert torch.isfinite(cap.queries[layer]).all() and torch.isfinite(cap.keys[layer]).all()
    assert model.config._attn_implementation == "sdpa"
    # one layer alone is the same tensor as in the all-layer capture
    only = capture(model, ids, layers=[17])
    assert only.layers == [17] and torch.equal(only.queries[17], cap.queries[17])
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
    # causal softmax over the captured q/k with the recorded scale, times the layer's values, is the layer's output
    seen = {}

    def keep_output(module, args, out):
        seen["out"] = out[0]

    handle = attn.register_forward_hook(keep_output)
    with torch.no_grad():
        model(ids)
        handle.remove()
        v = attn.v_proj(hidden).view(1, L, 3, 64).transpose(1, 2).repeat_interleave(3, 1)
        s = cap.queries[0] @ cap.keys[0].repeat_interleave(3, 1).transpose(-1, -2) * cap.scale
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        o = attn.o_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(1, L, 9 * 64))
    assert (o - seen["out"]).abs().max() < 1e-3 * seen["out"].abs().max()
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
