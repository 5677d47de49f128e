"""Token chunks of a text for evaluation, with a deterministic held-out split.

The text is cut into paragraphs (blank-line separated), each paragraph is tokenised on its own (fast and
parallel) and the paragraphs are joined by the token ids of ``"\\n\\n"``. The stream is then cut into
non-overlapping chunks of ``chunk_length`` tokens; the last ``held_out`` fraction of the chunks (at least
one) is the held-out split, the rest is the calibration split.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from spattn.data.cache import cache_dir as _cache_dir

SPLITS = ("held_out", "calibration", "all")
_BATCH = 2048  # paragraphs per tokenizer call


def _tokenizer_key(tokenizer: Any) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else 0
    return hashlib.sha256(f"{name}|{vocab}|{type(tokenizer).__name__}".encode()).hexdigest()[:16]


def tokenize(text: str, tokenizer: Any, *, cache: bool | str | os.PathLike = False) -> torch.Tensor:
    """Token ids int64 ``[N]`` of ``text`` (no special tokens). ``cache=True`` (or a cache folder) keeps the
    ids under ``<cache>/tokens/`` keyed by the text and the tokenizer."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: there is nothing to tokenize")
    path = None
    if cache:
        root = _cache_dir(None if cache is True else cache) / "tokens"
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
        path = root / f"{digest}-{_tokenizer_key(tokenizer)}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for start in range(0, len(paragraphs), _BATCH):
        batch = paragraphs[start : start + _BATCH]
        encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        for k, piece in enumerate(encoded):
            if ids or k:
                ids.extend(sep)
            ids.extend(piece)
    out = torch.tensor(ids, dtype=torch.long)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(out, tmp)
        os.replace(tmp, path)
    return out


def chunk(
    ids: torch.Tensor,
    chunk_length: int,
    *,
    split: str = "held_out",
    held_out: float = 0.1,
    max_chunks: int | None = None,
) -> torch.Tensor:
    """Cut token ids ``[N]`` into non-overlapping chunks int64 ``[C, chunk_length]`` and return one split.

    Args:
        ids: int ``[N]`` token stream.
        chunk_length: tokens per chunk (>= 2: a next-token loss needs a target).
        split: ``"held_out"`` (the last ``held_out`` fraction of the chunks, at least one), ``"calibration"``
            (the others) or ``"all"``.
        held_out: fraction of chunks held out, in ``(0, 1)``.
        max_chunks: keep at most this many chunks of the split (the first ones).
    """
    if isinstance(chunk_length, bool) or not isinstance(chunk_length, int):
        raise TypeError(f"chunk_length must be an int, got {type(chunk_length).__name__}")
    if chunk_length < 2:
        raise ValueError(f"chunk_length must be >= 2, got {chunk_length}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
    ids = torch.as_tensor(ids).reshape(-1).long()
    total = ids.numel() // chunk_length
    if total == 0:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than one chunk of chunk_length={chunk_length}: "
            "use a longer text or a shorter chunk"
        )
    chunks = ids[: total * chunk_length].view(total, chunk_length)
    n_held = max(1, round(total * held_out))
    if split == "held_out":
        chunks = chunks[total - n_held :]
    elif split == "calibration":
        if total - n_held < 1:
            raise ValueError(
                f"the text makes only {total} chunk(s) of {chunk_length} tokens, all held out: no calibration chunks"
            )
        chunks = chunks[: total - n_held]
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    return chunks.clone()


def text_chunks(
    source: str | os.PathLike,
    tokenizer: Any,
    chunk_length: int,
    *,
    split: str = "held_out",
    held_out: float = 0.1,
    max_chunks: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Chunks int64 ``[C, chunk_length]`` of a corpus name (``"austen"``, ``"kjv"``) or a text file.

    Example:
        >>> chunks = text_chunks("austen", tokenizer, 1024, max_chunks=8)  # doctest: +SKIP
    """
    from spattn.data.corpora import CORPORA, load_text

    text = load_text(source, cache_dir=cache_dir)
    cache: bool | str | os.PathLike = False
    if isinstance(source, str) and source in CORPORA:
        cache = cache_dir if cache_dir is not None else True
    ids = tokenize(text, tokenizer, cache=cache)
    return chunk(ids, chunk_length, split=split, held_out=held_out, max_chunks=max_chunks)
