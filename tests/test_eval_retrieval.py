"""spattn.eval.retrieval: exact match equals greedy decoding; SmolLM2 finds a pass key dense, loses it to a
window that cannot reach it; ablations and grids compare on the same samples."""

import pytest
import torch

import spattn
from spattn.eval import ablate, retrieval, tasks
from tests.hf_support import smollm2, tiny_llama


class _Tokenizer:
    """Token ids are the characters' codes modulo the tiny model's vocabulary (decode is for display only)."""

    all_special_ids = []

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)

    def __len__(self):
        return 97


def _greedy(model, ids, steps):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(nxt))
            ids = torch.cat([ids, nxt], dim=1)
    return out


def test_exact_match_is_greedy_decoding():
    model, tok = tiny_llama(), _Tokenizer()
    prompt = torch.randint(0, 97, (1, 40))
    greedy = _greedy(model, prompt, 4)
    hit = tasks.RetrievalSample(prompt, "x", torch.tensor(greedy), 5, [5], "passkey", 40, 0.1)
    wrong = list(greedy)
    wrong[2] = (wrong[2] + 1) % 97  # a miss on a later token counts as a miss
    miss = tasks.RetrievalSample(prompt, "x", torch.tensor(wrong), 5, [5], "passkey", 40, 0.1)
    result = retrieval.retrieval_accuracy(model, tok, [hit, miss, hit], batch_size=2)
    assert result.correct == [True, False, True]
    assert result.accuracy.value == pytest.approx(2 / 3) and result.accuracy.low <= 2 / 3 <= result.accuracy.high
    # the same through spattn with full attention, and a plan changes what the model sees
    same = retrieval.retrieval_accuracy(model, tok, [hit, miss], spattn.Plan(), backend="reference", block_size=16)
    assert same.correct == [True, False]
    with pytest.raises(ValueError, match="samples"):
        retrieval.retrieval_accuracy(model, tok, [])


def test_grid_cells_comparison_and_ablation_on_a_tiny_model():
    model, tok = tiny_llama(), _Tokenizer()
    text = "\n\n".join("the quick brown fox jumps over the lazy dog " * 3 for _ in range(50))
    samples = retrieval.make_samples("passkey", tok, text, [300, 400], [0.2, 0.8], [0, 1])
    assert len(samples) == 8 and {s.context_length for s in samples} == {300, 400}
    grid = retrieval.retrieval_grid(model, tok, samples, {"dense": None, "window": spattn.Window(8)},
                                    backend="reference", block_size=64)
    plans = grid["plans"]
    assert grid["baseline"] == "dense" and set(plans) == {"dense", "window"}
    assert len(plans["dense"]["cells"]) == 4 and all(c["n"] == 2 for c in plans["dense"]["cells"])
    assert plans["window"]["versus_dense"]["winner"] in ("a", "b", "tie")
    assert len(plans["window"]["per_sample"]) == 8

    def score(spec):
        return [float(c) for c in retrieval.retrieval_accuracy(model, tok, samples[:2], spec.plan(), "reference",
                                                               block_size=spec.block_size).correct]

    result = ablate.ablate("window", [4, 16], score, base=ablate.PlanSpec(window=8, sinks=4, block_size=64))
    assert [r["value"] for r in result["rows"]] == [4, 16]
    assert "| window |" in ablate.table(result)
    with pytest.raises(ValueError, match="budget"):
        ablate.variants("selector", ["bounds"], ablate.PlanSpec())
    spec = ablate.PlanSpec(window=64, sinks=0, budget=256, block_size=128, dense_layers=(1, 0))
    assert spec.pattern() == spattn.Window(64) | spattn.TopK("pooled", 2)
    assert spec.plan().pattern_for(0) is None and spec.plan().pattern_for(2) == spec.pattern()
    assert ablate.parse_value("dense_layers", "0+3") == (0, 3) and ablate.parse_value("sinks", "off") == 0


def test_smollm2_finds_a_pass_key_that_a_short_window_misses():
    pytest.importorskip("transformers")
    from spattn.data import load_text

    model, tokenizer = smollm2()
    text = load_text("austen")
    samples = [tasks.passkey(tokenizer, text, 320, 0.2, seed=0), tasks.passkey(tokenizer, text, 320, 0.3, seed=1)]
    dense = retrieval.retrieval_accuracy(model, tokenizer, samples, batch_size=2)
    assert dense.correct == [True, True], dense.predictions
    # the needle sits > 150 tokens back: sinks + a 32-token window cannot see it
    assert all(tasks.needle_distance(s) > 150 for s in samples)
    short = retrieval.retrieval_accuracy(model, tokenizer, samples, spattn.Sinks(16) | spattn.Window(32),
                                         block_size=64, batch_size=2)
    assert short.correct == [False, False], short.predictions
