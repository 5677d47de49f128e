"""Task profiles: the retrieval scorer (answer log-likelihood of pass keys) and its use by the planner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import spattn
from spattn.eval import retrieval
from spattn.planner import TaskScorer
from tests.hf_support import smollm2, tiny_llama

pytest.importorskip("transformers")
typer = pytest.importorskip("typer")

from spattn.cli.plan import RetrievalScorer  # noqa: E402


class _Tokenizer:
    """Token ids are the characters' codes modulo the tiny model's vocabulary."""

    all_special_ids = []

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}

    def decode(self, ids, **_):
        return "".join(chr(65 + i % 26) for i in ids)

    def __len__(self):
        return 97


HAYSTACK = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 20


def test_retrieval_score_is_the_answer_log_likelihood_of_greedy_steps():
    model, tok = tiny_llama(), _Tokenizer()
    scorer = RetrievalScorer(tok, HAYSTACK, 320, 2, block_size=32)
    assert isinstance(scorer, TaskScorer) and len(scorer.samples) == 2
    expected = []
    with torch.no_grad():  # oracle: one forward per answer token on the growing prefix
        for s in scorer.samples:
            ids, total = s.input_ids, 0.0
            for t in s.answer_ids:
                total += float(F.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)[t])
                ids = torch.cat([ids, t.view(1, 1)], dim=1)
            expected.append(total / len(s.answer_ids))
    likelihoods, correct = scorer.per_sample(model, None)
    assert likelihoods == pytest.approx(expected, abs=1e-4)
    assert scorer.score(model, None) == pytest.approx(sum(expected) / 2, abs=1e-4)
    assert correct == retrieval.retrieval_accuracy(model, tok, scorer.samples).correct
    with pytest.raises(ValueError, match="samples"):
        RetrievalScorer(tok, HAYSTACK, 320, 0)


def test_retrieval_score_drops_when_the_needle_is_out_of_reach():
    from spattn.data import load_text

    model, tokenizer = smollm2()
    scorer = RetrievalScorer(tokenizer, load_text("austen")[:20000], 320, 2, block_size=64)
    dense = scorer.score(model, None)
    short = scorer.score(model, spattn.Plan(default=spattn.Sinks(16) | spattn.Window(32)))
    assert dense > -1.0 and short < dense - 1.0, (dense, short)
