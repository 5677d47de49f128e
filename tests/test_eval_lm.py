"""spattn.eval.lm on tiny random models: dense vs itself is exact, a window does measurable damage."""

import math

import pytest
import torch

import spattn
from spattn.eval import lm
from spattn.integrations.plan import Plan
from tests.hf_support import tiny_bert, tiny_llama


class _WordTokenizer:
    """Tiny tokenizer for the encoder: one id per word, padding to the longest sentence."""

    def __init__(self):
        self.vocab: dict[str, int] = {}  # a fixed word -> id map (str hashes change per process)

    def __call__(self, sentences, padding=True, truncation=True, max_length=512, return_tensors="pt"):
        rows = [[1 + self.vocab.setdefault(w, len(self.vocab) % 100) for w in s.split()][:max_length]
                for s in sentences]
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


def test_dense_plan_is_exact_and_window_is_not():
    model = tiny_llama()
    chunks = torch.randint(0, 97, (3, 65))
    same = lm.compare_lm(model, chunks, None, batch_size=2, backend="reference", progress=False)
    assert same.top1_agreement == 1.0 and same.mean_kl < 1e-6
    assert same.dense_perplexity == pytest.approx(same.sparse_perplexity, rel=1e-5)
    assert same.tokens == 3 * 64 and len(same.per_chunk) == 2
    # perplexity() agrees with the comparison's dense side and with a hand computation
    ppl = lm.perplexity(model, chunks, progress=False)
    assert ppl == pytest.approx(same.dense_perplexity, rel=1e-5)
    with torch.no_grad():
        logits = model(input_ids=chunks).logits[:, :-1]
    manual = math.exp(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunks[:, 1:].flatten())))
    assert ppl == pytest.approx(manual, rel=1e-5)

    window = lm.compare_lm(model, chunks, Plan.uniform(spattn.Window(1)), backend="reference", progress=False)
    assert math.isfinite(window.sparse_perplexity)
    assert window.top1_agreement < 1.0 and window.mean_kl > 1e-4
    assert window.dense_perplexity == pytest.approx(same.dense_perplexity, rel=1e-6)
    assert lm.perplexity(model, chunks, spattn.Window(1), backend="reference", progress=False) == pytest.approx(
        window.sparse_perplexity, rel=1e-5
    )
    assert "perplexity dense" in str(window) and window.to_dict()["chunks"] == 3
    assert model.config._attn_implementation == "sdpa"


def test_embeddings_cosine():
    model = tiny_bert()
    tok = _WordTokenizer()
    sentences = ["one two three four five six seven eight nine ten eleven twelve", "short one", "a b c d e f"]
    same = lm.compare_embeddings(model, tok, sentences, None, batch_size=2, backend="reference", progress=False)
    assert same.sentences == 3 and same.min_cosine > 1 - 1e-5
    drift = lm.compare_embeddings(model, tok, sentences, spattn.Window(0), backend="reference", progress=False)
    assert drift.cosines[0] < 0.9999 and drift.mean_cosine < same.mean_cosine


def test_parse_plan(tmp_path):
    assert lm.parse_plan(None) == Plan() and lm.parse_plan("dense") == Plan()
    assert lm.parse_plan("sinks=64,window=256") == Plan.uniform(spattn.Sinks(64) | spattn.Window(256))
    assert lm.parse_plan("window=4:2") == Plan.uniform(spattn.Window(4, 2))
    plan = Plan(layers={1: spattn.Window(3)})
    assert lm.parse_plan(plan.to_json()) == plan
    assert lm.parse_plan('{"type": "window", "left": 3, "right": 0}') == Plan.uniform(spattn.Window(3))
    assert lm.parse_plan(str(plan.save(tmp_path / "p.json"))) == plan
    with pytest.raises(ValueError, match="cannot read plan"):
        lm.parse_plan("banana=3")


def test_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="chunks"):
        lm.compare_lm(model, torch.randint(0, 97, (2, 1)), None, progress=False)
    with pytest.raises(ValueError, match="integer token ids"):
        lm.perplexity(model, torch.randn(2, 10), progress=False)
    with pytest.raises(TypeError, match="chunks"):
        lm.perplexity(model, [[1, 2, 3]], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        lm.perplexity(model, torch.randint(0, 97, (2, 10)), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="sentences"):
        lm.compare_embeddings(tiny_bert(), _WordTokenizer(), [], None, progress=False)
    with pytest.raises(ValueError, match="model_name"):
        lm.evaluate("gpt5", "austen", None)
