"""spattn.eval.tasks and spattn.eval.stats against their definitions (no model involved)."""

import random

import pytest
import torch

from spattn.eval import stats, tasks


class _CharTokenizer:
    """One token per character (ids 3..258), specials 0-2: enough to check the prompt assembly exactly."""

    all_special_ids = [0, 1, 2]

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 256) for c in text]}

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)

    def __len__(self):
        return 259


TEXT = "\n\n".join(f"Paragraph {i}: it is a truth universally acknowledged, number {i}." for i in range(400))


# ---------------------------------------------------------------------------------------------- MQAR
def test_mqar_layout_vocabulary_halves_and_labels():
    N, L, K, V = 50, 128, 8, 512
    inputs, labels = tasks.mqar(N, seq_len=L, num_kv_pairs=K, vocab_size=V, seed=3)
    assert inputs.shape == labels.shape == (N, L) and inputs.dtype == labels.dtype == torch.int64
    keys, values = inputs[:, 0 : 2 * K : 2], inputs[:, 1 : 2 * K : 2]
    assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool(((values >= V // 2) & (values < V)).all())
    assert all(len(set(row.tolist())) == K for row in keys) and all(len(set(row.tolist())) == K for row in values)
    assert bool((labels[:, : 2 * K] == -100).all())
    for n in range(N):
        asked = (labels[n] != -100).nonzero().flatten()
        assert len(asked) == K
        assert bool(((asked - 2 * K) % 2 == 0).all())  # queries sit at even offsets of the query region
        pairs = dict(zip(keys[n].tolist(), values[n].tolist(), strict=True))
        for p in asked.tolist():
            assert labels[n, p].item() == pairs[inputs[n, p].item()]  # the label is the queried key's value
        others = torch.ones(L, dtype=torch.bool)
        others[: 2 * K] = False
        others[asked] = False
        assert bool((inputs[n, others] == 0).all())


def test_mqar_random_non_queries_and_determinism():
    a = tasks.mqar(20, seq_len=64, num_kv_pairs=4, vocab_size=128, seed=1, random_non_queries=True)
    b = tasks.mqar(20, seq_len=64, num_kv_pairs=4, vocab_size=128, seed=1, random_non_queries=True)
    c = tasks.mqar(20, seq_len=64, num_kv_pairs=4, vocab_size=128, seed=2, random_non_queries=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert float((a[0][:, 8:] == 0).float().mean()) < 0.05  # the zeros were replaced
    plain = tasks.mqar(20, seq_len=64, num_kv_pairs=4, vocab_size=128, seed=1)
    assert torch.equal(plain[1], a[1])  # the same queries and labels either way


def test_mqar_filler_prefix_moves_the_pairs_out_of_the_first_tokens():
    """Zoology's layout puts the pairs first, so sinks over the first 2K tokens see every pair: the prefix of
    value-half filler moves them, and the task is otherwise the same (labels = the queried key's value)."""
    N, L, K, V, P = 40, 96, 4, 256, 8
    plain, _ = tasks.mqar(N, seq_len=L, num_kv_pairs=K, vocab_size=V, seed=5)
    inputs, labels = tasks.mqar(N, seq_len=L, num_kv_pairs=K, vocab_size=V, seed=5, prefix_length=P)
    assert bool((plain[:, 0 : 2 * K : 2] < V // 2).all())  # the default: keys are the first tokens
    assert bool((inputs[:, :P] >= V // 2).all())  # filler from the value half: never a key
    keys, values = inputs[:, P : P + 2 * K : 2], inputs[:, P + 1 : P + 2 * K : 2]
    assert bool(((keys >= 1) & (keys < V // 2)).all()) and bool((values >= V // 2).all())
    assert bool((labels[:, : P + 2 * K] == -100).all())
    for n in range(N):
        asked = (labels[n] != -100).nonzero().flatten()
        assert len(asked) == K and bool(((asked - P - 2 * K) % 2 == 0).all())
        pairs = dict(zip(keys[n].tolist(), values[n].tolist(), strict=True))
        assert all(labels[n, p].item() == pairs[inputs[n, p].item()] for p in asked.tolist())
        assert not set(inputs[n, : 2 * K].tolist()) & set(pairs)  # Sinks(2K) sees no key of a pair
    again = tasks.mqar(N, seq_len=L, num_kv_pairs=K, vocab_size=V, seed=5, prefix_length=P)
    assert torch.equal(inputs, again[0]) and torch.equal(labels, again[1])
    for bad in (3, -2, L):
        with pytest.raises(ValueError, match="prefix_length"):
            tasks.mqar(2, seq_len=L, num_kv_pairs=K, vocab_size=V, prefix_length=bad)


def test_mqar_gap_distribution_follows_the_power_law():
    N, L, K = 4000, 64, 1
    inputs, labels = tasks.mqar(N, seq_len=L, num_kv_pairs=K, vocab_size=128, seed=0)
    gaps = ((labels != -100).nonzero()[:, 1] - 2 * K) // 2
    space = (L - 2 * K) // 2
    counts = torch.bincount(gaps, minlength=space).double()
    expected = tasks.mqar_gap_probabilities(space) * N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 80  # dof 30: the 99.99th percentile is about 67; a wrong law is in the thousands
    assert counts[0] > counts[space // 2] > 0  # short gaps most likely, far ones still drawn


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 63}, "even"), ({"seq_len": 16, "num_kv_pairs": 5}, "4 \\* num_kv_pairs"),
    ({"vocab_size": 100, "seq_len": 128}, "vocab_size"), ({"num_kv_pairs": 0}, "num_kv_pairs"),
])
def test_mqar_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tasks.mqar(2, **kwargs)


# ---------------------------------------------------------------------------------------------- ListOps
def test_listops_lengths_labels_and_evaluation():
    inputs, labels = tasks.listops(30, min_length=20, max_length=120, max_depth=5, max_args=5, seed=4)
    assert inputs.shape == (30, 120) and labels.shape == (30,)
    lengths = (inputs != 0).sum(1)
    assert bool(((lengths > 20) & (lengths < 120)).all())
    assert bool(((labels >= 0) & (labels <= 9)).all())
    for row, label in zip(inputs, labels, strict=True):
        n = int((row != 0).sum())
        assert bool((row[n:] == 0).all())  # right padding only
        assert _evaluate(tasks.listops_text(row).split()) == int(label)
    again = tasks.listops(30, min_length=20, max_length=120, max_depth=5, max_args=5, seed=4)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


def _evaluate(tokens):
    """An independent stack evaluator of the ListOps text (the definition, not the generator's tree)."""
    stack = []
    for t in tokens:
        if t.startswith("["):
            stack.append([t])
        elif t == "]":
            op, *args = stack.pop()
            value = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                     "[MED": int(sorted(args)[len(args) // 2] if len(args) % 2 else
                                 (sorted(args)[len(args) // 2 - 1] + sorted(args)[len(args) // 2]) / 2)}[op]
            if not stack:
                return value
            stack[-1].append(value)
        else:
            stack[-1].append(int(t))
    raise AssertionError("unbalanced expression")


def test_listops_depth_and_arity_bounds():
    inputs, _ = tasks.listops(20, min_length=10, max_length=200, max_depth=3, max_args=3, seed=0)
    for row in inputs:
        depth = deepest = 0
        for t in tasks.listops_text(row).split():
            depth += t.startswith("[")
            depth -= t == "]"
            deepest = max(deepest, depth)
        assert 1 <= deepest <= 3
    with pytest.raises(ValueError, match="max_length"):
        tasks.listops(1, min_length=10, max_length=11)


# ---------------------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_prompt_length_needle_and_answer(depth):
    tok = _CharTokenizer()
    s = tasks.passkey(tok, TEXT, 400, depth, seed=5)
    assert s.input_ids.shape == (1, 400) and s.input_ids.dtype == torch.int64
    text = tok.decode(s.input_ids[0].tolist())
    assert text.endswith("The pass key is")
    assert s.answer.startswith(" ") and len(s.answer.strip()) == 5 and s.answer.strip().isdigit()
    assert tok.decode(s.answer_ids.tolist()) == s.answer
    needle = "\nThe pass key is" + s.answer + ". Remember it."
    assert text[s.needle_position : s.needle_position + len(needle)] == needle
    # the relative depth places the needle between the instruction and the question
    head = len("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the pass key.\n\n")
    question = len("\n\nWhat is the pass key? The pass key is")
    room = 400 - head - question - (len(needle) + len(s.answer + " is the pass key.\n"))
    assert s.needle_position == head + round(depth * room)
    assert tasks.passkey(tok, TEXT, 400, depth, seed=5).answer == s.answer  # deterministic
    assert tasks.needle_distance(s) == 400 - s.needle_position


def test_passkey_stress_parameters():
    tok = _CharTokenizer()
    clean = tasks.passkey(tok, TEXT, 600, 0.5, seed=1)
    noisy = tasks.passkey(tok, TEXT, 600, 0.5, seed=1, noise=0.5)
    changed = float((clean.input_ids != noisy.input_ids).float().mean())
    assert 0.2 < changed < 0.6 and noisy.answer == clean.answer
    assert not set(noisy.input_ids[0].tolist()) & set(tok.all_special_ids)
    fooled = tasks.passkey(tok, TEXT, 600, 0.5, seed=1, distractors=3)
    text = tok.decode(fooled.input_ids[0].tolist())
    assert text.count(" key is ") == 3 + 1  # three look-alikes and the needle
    assert len(fooled.meta["distractor_positions"]) == 3
    ids = torch.tensor(tok("abc " * 400)["input_ids"])
    from_ids = tasks.passkey(tok, ids, 300, 0.2, seed=0)  # a haystack given as token ids
    assert from_ids.input_ids.shape == (1, 300)
    with pytest.raises(ValueError, match="depth"):
        tasks.passkey(tok, TEXT, 400, 1.5)
    with pytest.raises(ValueError, match="too short"):
        tasks.passkey(tok, TEXT, 50, 0.5)
    with pytest.raises(ValueError, match="answer"):
        tasks.passkey(tok, TEXT, 400, 0.5, answer="words")


def test_multi_needle_and_variable_tracking():
    tok = _CharTokenizer()
    m = tasks.multi_needle(tok, TEXT, 800, [0.2, 0.5, 0.8], seed=2)
    text = tok.decode(m.input_ids[0].tolist())
    parts = m.answer.split(",")
    assert len(parts) == 3 and all(p.strip().isdigit() for p in parts)
    for i, (p, pos) in enumerate(zip(parts, m.needle_positions, strict=True)):
        assert text[pos:].startswith(f"\nPart {i + 1} of the pass key is{p}.")
    assert m.needle_positions == sorted(m.needle_positions)

    v = tasks.variable_tracking(tok, TEXT, 900, 0.1, seed=3, hops=3, chains=2)
    text = tok.decode(v.input_ids[0].tolist())
    statements = [text[p:].split("\n")[1] for p in v.needle_positions]
    assert len(statements) == 4
    first = statements[0].split()
    assert first[0] == "VAR" and first[3] == v.answer.strip() + "."
    for before, after in zip(statements, statements[1:], strict=False):  # each hop names the previous variable
        assert after.endswith(f"= VAR {before.split()[1]}.")
    last = statements[-1].split()[1]
    assert text.endswith(f"what is the value of VAR {last}? Answer: VAR {last} =")
    assert len(v.meta["distractor_positions"]) == 4  # the other chain's statements


# ---------------------------------------------------------------------------------------------- stats
def test_bootstrap_interval_covers_the_mean_and_is_deterministic():
    rng = random.Random(0)
    values = [float(rng.random() < 0.7) for _ in range(200)]
    low, high = stats.bootstrap_interval(values, seed=1)
    assert low < sum(values) / 200 < high and high - low < 0.2
    assert stats.bootstrap_interval(values, seed=1) == (low, high)
    # the normal approximation of a proportion gives about the same width
    p = sum(values) / 200
    assert abs((high - low) - 2 * 1.96 * (p * (1 - p) / 200) ** 0.5) < 0.03
    assert stats.bootstrap_interval([1.0, 1.0, 1.0]) == (1.0, 1.0)
    assert stats.bootstrap_interval([0.25]) == (0.25, 0.25)
    with pytest.raises(ValueError, match="confidence"):
        stats.bootstrap_interval(values, confidence=1.5)
    with pytest.raises(ValueError, match="at least one"):
        stats.bootstrap_interval([])


def test_compare_calls_ties_and_winners():
    a = [1.0] * 40 + [0.0] * 10
    b = [0.0] * 40 + [1.0] * 10
    assert stats.compare(a, b).winner == "a" and stats.compare(b, a).winner == "b"
    assert stats.compare(a, b, higher_is_better=False).winner == "b"
    same = stats.compare(a, a)
    assert same.winner == "tie" and same.difference == 0
    near = stats.compare([1.0, 0.0] * 10, [0.0, 1.0] * 10)  # equal means, disagreeing examples
    assert near.winner == "tie" and near.low < 0 < near.high
    with pytest.raises(ValueError, match="same examples"):
        stats.compare([1.0, 0.0], [1.0])


def test_seed_interval_is_wider_than_one_seed():
    seeds = [[1.0] * 45 + [0.0] * 5, [1.0] * 25 + [0.0] * 25, [1.0] * 35 + [0.0] * 15]
    both = stats.seed_interval(seeds)
    pooled = stats.estimate([x for g in seeds for x in g])
    assert both.value == pytest.approx(0.7) and both.n == 3
    assert both.low <= 0.7 <= both.high
    assert both.high - both.low > pooled.high - pooled.low  # the seed-to-seed spread is counted
