"""Long-range tasks as procedural generators, deterministic by seed (pure Python / torch).

Synthetic tasks for models trained from scratch (:mod:`spattn.eval.train`):

* :func:`mqar`: Zoology's multi-query associative recall. Key-value pairs first (keys from the lower half of
  the vocabulary, values from the upper half), then the keys asked again at power-law distances; the label at
  a query position is the value to emit there, ``-100`` elsewhere.
* :func:`listops`: Long Range Arena's ListOps (``MIN``, ``MAX``, ``MED``, ``SM`` = sum modulo 10 over nested
  lists), token sequences with a length strictly inside the bounds, label 0-9.

Retrieval in real text for pretrained models (:mod:`spattn.eval.retrieval`), scored by exact match:

* :func:`passkey`: a 5-digit number hidden at a relative depth of a haystack, asked for at the end.
* :func:`multi_needle`: several numbers at several depths, all asked for, in order.
* :func:`variable_tracking`: RULER-style chains ``VAR A = 12345 ... VAR B = VAR A ...``; asked for the value
  of the last variable of a chain, which needs every hop.

Stress parameters of the retrieval tasks: ``depth``; ``distractors`` (needles that look like the answer but
name another key); ``noise`` (a fraction of haystack tokens replaced by random tokens); the haystack itself
(Austen, KJV, the user's text: domain shift); ``answer="rare"`` (answers made of rare tokens).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100  # label of positions without a target (PyTorch's cross-entropy default)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- MQAR
def mqar_gap_probabilities(space: int, power_a: float = 0.01) -> torch.Tensor:
    """float64 ``[space]``: the chance of each gap ``g = 0 .. space-1`` between the end of the key-value
    block and a query (in query slots of two tokens), ``p(g) ∝ (g + 1) ** (power_a - 1)`` (Zoology)."""
    _positive_int(space, "space")
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    return p / p.sum()


def _distinct(rows: int, choices: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """int64 ``[rows, count]``: per row, ``count`` distinct values drawn uniformly from ``0 .. choices-1``
    (every ordered draw without replacement equally likely)."""
    if count * 4 > choices:  # dense draws: the first entries of a random permutation
        return torch.rand(rows, choices, generator=gen).argsort(dim=1)[:, :count]
    out = torch.randint(0, choices, (rows, count), generator=gen)
    while True:  # sparse draws: redraw the rows holding a repeat (a few percent of them)
        ordered = out.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if not bool(repeated.any()):
            return out
        out[repeated] = torch.randint(0, choices, (int(repeated.sum()), count), generator=gen)


def mqar(
    num_examples: int,
    seq_len: int = 256,
    num_kv_pairs: int = 16,
    vocab_size: int = 8192,
    seed: int = 0,
    random_non_queries: bool = False,
    *,
    power_a: float = 0.01,
    prefix_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall (Zoology): ``(inputs, labels)``, both int64 ``[N, seq_len]``.

    Each example starts with ``num_kv_pairs`` pairs ``k_1 v_1 k_2 v_2 ...`` (distinct keys from
    ``1 .. vocab_size // 2 - 1``, distinct values from ``vocab_size // 2 .. vocab_size - 1``). The rest is a
    query region of two-token slots: key ``k_i`` is placed again at slot ``g_i`` (gaps drawn without
    replacement with ``p(g) ∝ (g + 1) ** (power_a - 1)``, so most queries come soon and a few far), at
    position ``2 * num_kv_pairs + 2 * g_i``. ``labels`` holds ``v_i`` at that position (the value the model
    must emit after reading the key) and ``-100`` everywhere else. Other query-region positions are 0, or
    random tokens of the whole vocabulary with ``random_non_queries=True``.

    ``prefix_length`` (default 0: Zoology's layout) puts that many filler tokens before the pairs, drawn
    uniformly from the value half (never a key, so no query has a second match); the pairs then start at
    ``prefix_length`` and the query region shrinks by as many tokens. With Zoology's layout the pairs are the
    first ``2 * num_kv_pairs`` tokens, so ``Sinks(2 * num_kv_pairs)`` sees every pair from every query and
    solves the task by position alone; a prefix at least that long removes this artefact.

    Args:
        num_examples: ``N``.
        seq_len: ``L``, even, ``>= 4 * num_kv_pairs``.
        num_kv_pairs: pairs per example.
        vocab_size: ``> seq_len``; keys and values come from its two halves.
        seed: the same seed gives the same data.
        random_non_queries: fill non-query positions with random tokens instead of 0.
        power_a: exponent of the gap distribution (Zoology's 0.01).
        prefix_length: filler tokens before the pairs (default 0), even, ``2 * num_kv_pairs + prefix_length
            + 2 * num_kv_pairs <= seq_len``.

    Example:
        >>> inputs, labels = mqar(8, seq_len=64, num_kv_pairs=4, vocab_size=128)
        >>> inputs.shape, int((labels != -100).sum())
        (torch.Size([8, 64]), 32)
    """
    _positive_int(num_examples, "num_examples")
    _positive_int(num_kv_pairs, "num_kv_pairs")
    _positive_int(seq_len, "seq_len", 2)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (two-token query slots), got {seq_len}")
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, int) or prefix_length < 0 or prefix_length % 2:
        raise ValueError(f"prefix_length must be an even int >= 0 (two-token query slots), got {prefix_length!r}")
    if num_kv_pairs * 4 + prefix_length > seq_len:
        raise ValueError(f"seq_len must be >= 4 * num_kv_pairs + prefix_length = {4 * num_kv_pairs + prefix_length}, "
                         f"got {seq_len}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= seq_len:
        raise ValueError(f"vocab_size must be an int > seq_len ({seq_len}), got {vocab_size!r}")
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} is too small for {num_kv_pairs} distinct keys")
    if not isinstance(power_a, (int, float)) or not 0 < power_a <= 1:
        raise ValueError(f"power_a must be in (0, 1], got {power_a!r}")
    gen = _generator(seed)
    half = vocab_size // 2
    start = prefix_length  # the first pair
    context = start + 2 * num_kv_pairs  # the first query slot
    space = (seq_len - context) // 2
    keys = _distinct(num_examples, half - 1, num_kv_pairs, gen) + 1
    values = _distinct(num_examples, vocab_size - half, num_kv_pairs, gen) + half
    gaps = torch.multinomial(
        mqar_gap_probabilities(space, power_a).expand(num_examples, space), num_kv_pairs, replacement=False,
        generator=gen,
    )
    inputs = torch.zeros(num_examples, seq_len, dtype=torch.long)
    inputs[:, start:context:2] = keys
    inputs[:, start + 1:context:2] = values
    positions = context + 2 * gaps
    inputs.scatter_(1, positions, keys)
    labels = torch.full((num_examples, seq_len), IGNORE_INDEX, dtype=torch.long)
    labels.scatter_(1, positions, values)
    if random_non_queries:
        fill = torch.randint(0, vocab_size, (num_examples, seq_len), generator=gen)
        free = torch.zeros_like(inputs, dtype=torch.bool)
        free[:, context:] = True
        free.scatter_(1, positions, False)
        inputs = torch.where(free, fill, inputs)
    if prefix_length:
        inputs[:, :start] = torch.randint(half, vocab_size, (num_examples, start), generator=gen)
    return inputs, labels


# ---------------------------------------------------------------------------------------------- ListOps
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
LISTOPS_PAD = "<pad>"
#: token id of each ListOps symbol: 0 is padding, then the digits 0-9, the operators, the closing bracket
LISTOPS_VOCAB: dict[str, int] = {
    LISTOPS_PAD: 0, **{str(d): d + 1 for d in range(10)},
    **{op: 11 + i for i, op in enumerate(LISTOPS_OPERATORS)}, LISTOPS_END: 15,
}
_LISTOPS_VALUE_P = 0.25  # LRA: a node below the maximum depth is an operator with this probability


def _listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int,
                  limit: int) -> tuple[Any, int] | None:
    """A random ListOps tree and its length in tokens (LRA's generator semantics), or ``None`` as soon as it
    grows past ``limit`` tokens (the draw would be rejected anyway: stopping early leaves the distribution of
    kept trees unchanged). Uniform choices are ``int(rng.random() * n)`` (``randint``'s rejection loop is most
    of the generator's time in pure Python)."""
    draw = rng.random
    if depth < max_depth and draw() <= _LISTOPS_VALUE_P:
        children, length = [], 2  # the operator and the closing bracket
        for _ in range(2 + int(draw() * (max_args - 1))):
            drawn = _listops_tree(rng, depth + 1, max_depth, max_args, limit - length)
            if drawn is None:
                return None
            children.append(drawn[0])
            length += drawn[1]
        if length > limit:
            return None
        return (LISTOPS_OPERATORS[int(draw() * len(LISTOPS_OPERATORS))], children), length
    return (int(draw() * 10), 1) if limit >= 1 else None


def listops_value(tree: Any) -> int:
    """The value 0-9 of a ListOps tree: an int, or ``(operator, [children])``."""
    if isinstance(tree, int):
        return tree
    op, children = tree
    values = [listops_value(c) for c in children]
    if op == "[MIN":
        return min(values)
    if op == "[MAX":
        return max(values)
    if op == "[MED":  # LRA: int(numpy.median(values)), the mean of the two middle values when even
        ordered, middle = sorted(values), len(values) // 2
        return ordered[middle] if len(values) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def _listops_tokens(tree: Any) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    out = [op]
    for c in children:
        out.extend(_listops_tokens(c))
    out.append(LISTOPS_END)
    return out


def listops_text(ids: torch.Tensor) -> str:
    """The ListOps expression of one row of token ids ``[L]`` (padding dropped): ``"[MAX 2 9 [MIN 4 7 ] 0 ]"``."""
    names = {i: s for s, i in LISTOPS_VOCAB.items()}
    return " ".join(names[int(i)] for i in ids if int(i) != LISTOPS_VOCAB[LISTOPS_PAD])


def listops(
    num_examples: int,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Long Range Arena's ListOps: ``(inputs, labels)``, int64 ``[N, max_length]`` (0-padded on the right) and
    int64 ``[N]`` in 0-9.

    Trees follow LRA's generator: below ``max_depth`` a node is an operator (``MIN``, ``MAX``, ``MED`` =
    median rounded down, ``SM`` = sum modulo 10) with 2 to ``max_args`` children with probability 0.25, else a
    digit; trees whose token count is not strictly between ``min_length`` and ``max_length`` are drawn again.
    Token ids are :data:`LISTOPS_VOCAB` (0 = padding); :func:`listops_text` reads a row back.

    Example:
        >>> inputs, labels = listops(4, min_length=10, max_length=40, max_depth=4, max_args=4)
        >>> inputs.shape, bool(((labels >= 0) & (labels <= 9)).all())
        (torch.Size([4, 40]), True)
    """
    _positive_int(num_examples, "num_examples")
    _positive_int(max_depth, "max_depth")
    _positive_int(max_args, "max_args", 2)
    _positive_int(min_length, "min_length", 0)
    _positive_int(max_length, "max_length")
    if max_length - min_length < 2:
        raise ValueError(f"max_length must exceed min_length + 1 (lengths are strictly inside), got "
                         f"{min_length}, {max_length}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    rng = random.Random(seed)
    inputs = torch.zeros(num_examples, max_length, dtype=torch.long)
    labels = torch.zeros(num_examples, dtype=torch.long)
    attempts, made = 0, 0
    limit = 1000 * num_examples + 100_000
    while made < num_examples:
        attempts += 1
        if attempts > limit:
            raise ValueError(f"could not draw ListOps trees of {min_length} < length < {max_length} tokens with "
                             f"max_depth={max_depth}, max_args={max_args}: widen the bounds")
        drawn = _listops_tree(rng, 1, max_depth, max_args, max_length - 1)
        if drawn is None or not min_length < drawn[1] < max_length:
            continue
        tree = drawn[0]
        tokens = _listops_tokens(tree)
        inputs[made, : len(tokens)] = torch.tensor([LISTOPS_VOCAB[t] for t in tokens])
        labels[made] = listops_value(tree)
        made += 1
    return inputs, labels


# ---------------------------------------------------------------------------------------------- retrieval in text
@dataclass
class RetrievalSample:
    """One retrieval prompt in real text.

    Attributes:
        input_ids: int64 ``[1, L]``, the whole prompt (``L == context_length``), ending where the answer starts.
        answer: the expected continuation as text (e.g. ``" 71432"``).
        answer_ids: int64 ``[A]``, its token ids; exact match = greedy decoding emits exactly these.
        needle_position: token index where the (first) needle starts.
        needle_positions: token index of every needle (multi-needle, variable chains), in prompt order.
        task, context_length, depth: what was asked, at which length and relative depth.
        meta: the stress parameters (distractors, noise, answer kind, seed...).
    """

    input_ids: torch.Tensor
    answer: str
    answer_ids: torch.Tensor
    needle_position: int
    needle_positions: list[int]
    task: str
    context_length: int
    depth: float
    meta: dict[str, Any] = field(default_factory=dict)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_tokenizer(tokenizer: Any) -> None:
    if not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise TypeError(f"tokenizer must be a Hugging Face tokenizer (callable with decode), got "
                        f"{type(tokenizer).__name__}")


def _filler(tokenizer: Any, haystack: Any, length: int, rng: random.Random) -> list[int]:
    """``length`` haystack token ids starting at a seeded place (paragraph start for text)."""
    if length <= 0:
        return []
    if isinstance(haystack, torch.Tensor):
        ids = haystack.flatten().tolist()
        if not ids:
            raise ValueError("haystack holds no tokens")
    elif isinstance(haystack, str):
        if not haystack.strip():
            raise ValueError("haystack is empty text")
        span = 8 * length + 64  # characters: enough for `length` tokens of English prose
        start = rng.randrange(max(1, len(haystack) - span))
        paragraph = haystack.find("\n\n", start)
        start = paragraph + 2 if 0 <= paragraph < start + span // 4 else start
        ids = _encode(tokenizer, haystack[start : start + span])
        if len(ids) < length:  # a short text: use it all, repeated
            ids = _encode(tokenizer, haystack)
    else:
        raise TypeError(f"haystack must be text (str) or token ids (tensor), got {type(haystack).__name__}")
    if len(ids) < length:
        ids = (ids * (length // len(ids) + 1))
        return ids[:length]
    offset = rng.randrange(len(ids) - length + 1) if isinstance(haystack, torch.Tensor) else 0
    return ids[offset : offset + length]


def _add_noise(tokenizer: Any, ids: list[int], noise: float, rng: random.Random) -> list[int]:
    if not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise!r}")
    if noise == 0 or not ids:
        return ids
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = len(tokenizer)
    out = list(ids)
    for index in rng.sample(range(len(out)), round(noise * len(out))):
        token = rng.randrange(vocab)
        while token in special:
            token = rng.randrange(vocab)
        out[index] = token
    return out


@functools.lru_cache(maxsize=4)
def _rare_tokens(tokenizer: Any) -> tuple[int, ...]:
    """Word-like tokens from the last third of the vocabulary (BPE merges learnt last: the rarest)."""
    vocab = len(tokenizer)
    out = []
    for token in range(vocab - vocab // 3, vocab):
        text = tokenizer.decode([token])
        if text.startswith(" ") and text[1:].isalpha() and text[1:].islower() and len(text) >= 5:
            out.append(token)
    if len(out) < 100:
        raise ValueError("the tokenizer has too few rare word tokens for answer='rare'")
    return tuple(out)


def _answer(tokenizer: Any, kind: str, rng: random.Random, digits: int) -> tuple[str, list[int]]:
    if kind == "digits":
        text = " " + str(rng.randrange(10 ** (digits - 1), 10**digits))
        return text, _encode(tokenizer, text)
    if kind == "rare":
        ids = rng.sample(_rare_tokens(tokenizer), 2)
        return tokenizer.decode(ids), ids
    raise ValueError(f"answer must be 'digits' or 'rare', got {kind!r}")


def _check_depth(depth: Any, name: str = "depth") -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1:
        raise ValueError(f"{name} must be a relative depth in [0, 1], got {depth!r}")
    return float(depth)


_KEY_NAMES = ("door", "safe", "locker", "vault", "gate", "box", "chest", "cellar", "study", "garden")


def _assemble(
    tokenizer: Any,
    haystack: Any,
    context_length: int,
    prefix: str,
    needles: Sequence[tuple[float, list[int]]],
    question: str,
    rng: random.Random,
    noise: float,
) -> tuple[list[int], list[int]]:
    """Prefix + filler with needles at relative depths + question, exactly ``context_length`` tokens.
    Returns (ids, start of each needle in the order given)."""
    head = _encode(tokenizer, prefix)
    tail = _encode(tokenizer, question)
    fixed = len(head) + len(tail) + sum(len(n) for _, n in needles)
    room = context_length - fixed
    if room < 0:
        raise ValueError(f"context_length {context_length} is too short for the prompt ({fixed} tokens without "
                         f"haystack)")
    filler = _add_noise(tokenizer, _filler(tokenizer, haystack, room, rng), noise, rng)
    cuts = [round(depth * room) for depth, _ in needles]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids, starts, previous = list(head), [0] * len(needles), 0
    for i in order:
        ids.extend(filler[previous : cuts[i]])
        previous = cuts[i]
        starts[i] = len(ids)
        ids.extend(needles[i][1])
    ids.extend(filler[previous:])
    ids.extend(tail)
    assert len(ids) == context_length
    return ids, starts


def _check_common(tokenizer: Any, context_length: int, distractors: int, digits: int) -> None:
    _check_tokenizer(tokenizer)
    _positive_int(context_length, "context_length")
    _positive_int(distractors, "distractors", 0)
    _positive_int(digits, "digits", 1)


def passkey(
    tokenizer: Any,
    haystack: str | torch.Tensor,
    context_length: int,
    depth: float,
    seed: int = 0,
    *,
    distractors: int = 0,
    noise: float = 0.0,
    answer: str = "digits",
    digits: int = 5,
) -> RetrievalSample:
    """A pass key hidden at relative ``depth`` of real text, asked for at the end.

    Prompt: an instruction, then haystack text with ``"The pass key is 71432. Remember it. 71432 is the pass
    key."`` inserted at ``depth`` (0 = just after the instruction, 1 = just before the question), then
    ``"What is the pass key? The pass key is"``; the answer is ``" 71432"``.

    Args:
        tokenizer: a Hugging Face tokenizer (e.g. SmolLM2's).
        haystack: text (a corpus from :func:`spattn.data.load_text`, the user's file) or token ids ``[N]``;
            the filler starts at a seeded place.
        context_length: ``L``, the exact prompt length in tokens.
        depth: relative needle depth in ``[0, 1]``.
        seed: the same arguments and seed give the same sample.
        distractors: needles for other keys (``"The door key is 58213."``) at random depths that look
            like the answer.
        noise: fraction of haystack tokens replaced by random (non-special) tokens.
        answer: ``"digits"`` (a ``digits``-digit number) or ``"rare"`` (two rare word tokens).
        digits: length of a numeric pass key (default 5).

    Returns a :class:`RetrievalSample` (``input_ids`` ``[1, L]``).
    """
    _check_common(tokenizer, context_length, distractors, digits)
    depth = _check_depth(depth)
    rng = random.Random(f"passkey|{seed}|{context_length}|{depth}")
    text, ids = _answer(tokenizer, answer, rng, digits)
    needle = _encode(tokenizer, "\nThe pass key is") + ids + _encode(tokenizer, ". Remember it.") + ids + \
        _encode(tokenizer, " is the pass key.\n")
    needles = [(depth, needle)]
    for name in rng.sample(_KEY_NAMES, min(distractors, len(_KEY_NAMES))) + ["other"] * (distractors - len(_KEY_NAMES)):
        _, fake = _answer(tokenizer, answer, rng, digits)
        needles.append((rng.random(), _encode(tokenizer, f"\nThe {name} key is") + fake + _encode(tokenizer, ".\n")))
    prefix = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
              "I will quiz you about the pass key.\n\n")
    question = "\n\nWhat is the pass key? The pass key is"
    prompt, starts = _assemble(tokenizer, haystack, context_length, prefix, needles, question, rng, noise)
    return RetrievalSample(
        input_ids=torch.tensor([prompt], dtype=torch.long), answer=text,
        answer_ids=torch.tensor(ids, dtype=torch.long), needle_position=starts[0], needle_positions=sorted(starts),
        task="passkey", context_length=context_length, depth=depth,
        meta={"seed": seed, "distractors": distractors, "noise": noise, "answer": answer,
              "distractor_positions": sorted(starts[1:])},
    )


def multi_needle(
    tokenizer: Any,
    haystack: str | torch.Tensor,
    context_length: int,
    depths: Sequence[float],
    seed: int = 0,
    *,
    noise: float = 0.0,
    answer: str = "digits",
    digits: int = 5,
) -> RetrievalSample:
    """Several parts of one pass key at several relative ``depths``, all asked for in order.

    Needle ``i``: ``"Part i of the pass key is 71432."``; question ``"What are the N parts of the pass key,
    in order? They are"``, answer ``" 71432, 22018, ..."``. Exact match needs every part. ``depth`` of the
    sample is the mean depth; ``needle_positions`` lists each part's start.
    """
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or not depths:
        raise ValueError("depths must be a non-empty sequence of relative depths in [0, 1]")
    depths = [_check_depth(d, "depths[i]") for d in depths]
    _check_common(tokenizer, context_length, 0, digits)
    rng = random.Random(f"multi_needle|{seed}|{context_length}|{depths}")
    parts = [_answer(tokenizer, answer, rng, digits) for _ in depths]
    needles = [
        (d, _encode(tokenizer, f"\nPart {i + 1} of the pass key is") + ids + _encode(tokenizer, ".\n"))
        for i, (d, (_, ids)) in enumerate(zip(depths, parts, strict=True))
    ]
    text = ",".join(t for t, _ in parts)
    answer_ids = _encode(tokenizer, text) if answer == "digits" else [t for _, ids in parts for t in ids]
    if answer != "digits":
        text = tokenizer.decode(answer_ids)
    prefix = (f"There is a pass key of {len(depths)} parts hidden inside a lot of irrelevant text. Find every "
              "part and memorize it. I will quiz you about the pass key.\n\n")
    question = f"\n\nWhat are the {len(depths)} parts of the pass key, in order? They are"
    prompt, starts = _assemble(tokenizer, haystack, context_length, prefix, needles, question, rng, noise)
    return RetrievalSample(
        input_ids=torch.tensor([prompt], dtype=torch.long), answer=text,
        answer_ids=torch.tensor(answer_ids, dtype=torch.long), needle_position=min(starts),
        needle_positions=starts, task="multi_needle", context_length=context_length,
        depth=sum(depths) / len(depths),
        meta={"seed": seed, "noise": noise, "answer": answer, "depths": depths},
    )


def _variable_name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in used:
            used.add(name)
            return name


def variable_tracking(
    tokenizer: Any,
    haystack: str | torch.Tensor,
    context_length: int,
    depth: float,
    seed: int = 0,
    *,
    hops: int = 2,
    chains: int = 1,
    noise: float = 0.0,
    spread: float = 0.3,
    digits: int = 5,
) -> RetrievalSample:
    """RULER-style variable tracking: ``VAR QWERT = 12345`` then ``VAR ASDFG = VAR QWERT`` ... in real text;
    asked for the value of the chain's last variable, which needs every hop.

    Args:
        tokenizer, haystack, context_length, seed, noise, digits: as :func:`passkey`.
        depth: relative depth of the chain's first statement; the ``hops`` statements follow at equal steps
            over the next ``spread`` of the haystack (clipped to 1).
        hops: assignments after the first (1 = one reference to follow).
        chains: chains in the prompt; the others (different names and values) are distractors placed at
            random depths.

    ``needle_positions`` are the target chain's statements in order; ``answer`` is its value (``" 12345"``).
    """
    _check_common(tokenizer, context_length, 0, digits)
    depth = _check_depth(depth)
    _positive_int(hops, "hops", 0)
    _positive_int(chains, "chains")
    if not isinstance(spread, (int, float)) or not 0 <= spread <= 1:
        raise ValueError(f"spread must be a fraction in [0, 1], got {spread!r}")
    rng = random.Random(f"variable_tracking|{seed}|{context_length}|{depth}|{hops}")
    used: set[str] = set()
    needles: list[tuple[float, list[int]]] = []
    target: tuple[str, list[int]] | None = None
    last = ""
    for chain in range(chains):
        value_text, value_ids = _answer(tokenizer, "digits", rng, digits)
        names = [_variable_name(rng, used) for _ in range(hops + 1)]
        start = depth if chain == 0 else rng.random() * (1 - spread)
        step = spread / max(hops, 1)
        statements = [_encode(tokenizer, f"\nVAR {names[0]} =") + value_ids + _encode(tokenizer, ".\n")]
        statements += [_encode(tokenizer, f"\nVAR {names[i]} = VAR {names[i - 1]}.\n") for i in range(1, hops + 1)]
        needles += [(min(1.0, start + i * step), s) for i, s in enumerate(statements)]
        if chain == 0:
            target, last = (value_text, value_ids), names[-1]
    assert target is not None
    prefix = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
    question = f"\n\nQuestion: what is the value of VAR {last}? Answer: VAR {last} ="
    prompt, starts = _assemble(tokenizer, haystack, context_length, prefix, needles, question, rng, noise)
    return RetrievalSample(
        input_ids=torch.tensor([prompt], dtype=torch.long), answer=target[0],
        answer_ids=torch.tensor(target[1], dtype=torch.long), needle_position=starts[0],
        needle_positions=starts[: hops + 1], task="variable_tracking", context_length=context_length,
        depth=depth,
        meta={"seed": seed, "hops": hops, "chains": chains, "noise": noise, "spread": spread,
              "distractor_positions": sorted(starts[hops + 1 :])},
    )


def needle_distance(sample: RetrievalSample) -> int:
    """Tokens from the (first) needle to the end of the prompt: how far back the answer sits."""
    return int(sample.input_ids.shape[1]) - int(sample.needle_position)


__all__ = [
    "IGNORE_INDEX", "LISTOPS_VOCAB", "RetrievalSample", "listops", "listops_text", "listops_value", "mqar",
    "mqar_gap_probabilities", "multi_needle", "needle_distance", "passkey", "variable_tracking",
]
