"""Shared, once-per-session loaders for the Hugging Face tests (real offline models, tiny random models)."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")


@functools.cache
def smollm2():
    """(model, tokenizer) of SmolLM2-135M; the first call converts the GGUF file (~20-30 s) into the cache."""
    from spattn.integrations.models import load_smollm2

    return load_smollm2()


@functools.cache
def smollm2_float64():
    from spattn.integrations.models import load_smollm2

    model, _ = load_smollm2(dtype=torch.float64)
    return model


@functools.cache
def minilm():
    from spattn.integrations.models import load_minilm

    return load_minilm()


@functools.cache
def minilm_float64():
    from spattn.integrations.models import load_minilm

    model, _ = load_minilm(dtype=torch.float64)
    return model


def tiny_llama(seed: int = 0):
    """A 2-layer random Llama (GQA 4/2 heads, head dim 16) for fast unit tests."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=120, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
        max_position_embeddings=256, initializer_range=0.3, attn_implementation="sdpa",
    )
    return transformers.BertModel(config, add_pooling_layer=False).eval()
