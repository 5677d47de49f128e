"""What a plan does to a real model: language-model damage and sentence-embedding drift, dense vs sparse.

* :func:`compare_lm`: on held-out token chunks ``[C, L]``, the dense and the sparse perplexity, the next-token
  top-1 agreement (argmax of the sparse logits == argmax of the dense logits) and the mean
  KL(p_dense || p_sparse) per predicted token.
* :func:`perplexity`: perplexity of one configuration (dense, or a plan).
* :func:`compare_embeddings`: cosine similarity of sentence embeddings (masked mean pooling, L2-normalised,
  the all-MiniLM-L6-v2 recipe) dense vs sparse.
* :func:`evaluate` / ``python -m spattn.eval.lm``: model + corpus + plan -> one JSON record.

"Dense" is the model's own attention (SDPA) when it is not patched, else spattn with full attention.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from spattn.bench.env import machine_info
from spattn.integrations.hf import patched
from spattn.integrations.plan import Plan, as_plan
from spattn.patterns import Pattern


def _progress(items: Iterable, total: int, description: str, enabled: bool) -> Iterator:
    if not enabled:
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the hf extra; without it, no bar
        yield from items
        return
    yield from tqdm(items, total=total, desc=description, leave=False, file=sys.stderr)


def _check_chunks(chunks: torch.Tensor) -> torch.Tensor:
    if not isinstance(chunks, torch.Tensor):
        raise TypeError(f"chunks must be a tensor of token ids [C, L], got {type(chunks).__name__}")
    if chunks.dim() == 1:
        chunks = chunks[None]
    if chunks.dim() != 2 or chunks.dtype.is_floating_point or chunks.dtype == torch.bool:
        raise ValueError(f"chunks must be integer token ids [C, L], got {chunks.dtype} {tuple(chunks.shape)}")
    if chunks.shape[0] < 1 or chunks.shape[1] < 2:
        raise ValueError(f"chunks must hold at least one chunk of >= 2 tokens, got shape {tuple(chunks.shape)}")
    return chunks.long()


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _dense(model: torch.nn.Module, backend: str) -> Iterator[None]:
    if hasattr(model, "_spattn_original_attn"):  # patched: run spattn with full attention
        with patched(model, None, backend=backend):
            yield
    else:
        yield


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@dataclass
class LMComparison:
    """Dense vs sparse on the same token chunks (``tokens`` = predicted positions, ``C * (L - 1)``)."""

    chunks: int
    chunk_length: int
    tokens: int
    dense_perplexity: float
    sparse_perplexity: float
    top1_agreement: float
    mean_kl: float
    dense_nll: float
    sparse_nll: float
    seconds: float
    per_chunk: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.chunks} chunks x {self.chunk_length} tokens: perplexity dense {self.dense_perplexity:.3f}, "
            f"sparse {self.sparse_perplexity:.3f}; top-1 agreement {self.top1_agreement:.4f}; "
            f"mean KL {self.mean_kl:.5f} nats"
        )


def perplexity(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    plan: Plan | Pattern | None = None,
    *,
    batch_size: int = 1,
    backend: str = "auto",
    progress: bool = True,
) -> float:
    """Perplexity of a causal LM on token chunks ``[C, L]`` (next-token loss on positions 1..L-1), with
    ``plan`` (``None``: dense)."""
    chunks = _check_chunks(chunks)
    _check_batch_size(batch_size)
    device = _device(model)
    total, count = 0.0, 0
    context = _dense(model, backend) if plan is None else patched(model, as_plan(plan), backend=backend)
    starts = range(0, chunks.shape[0], batch_size)
    with context:
        for start in _progress(starts, len(starts), "perplexity", progress):
            ids = chunks[start : start + batch_size].to(device)
            logits = _logits(model, ids)[:, :-1]
            nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += float(nll)
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def dense_reference(dense_logits: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a sparse run is scored against: float64 dense next-token log-probabilities, targets and top tokens.

    Args:
        dense_logits: ``[L, V]`` or ``[B, L, V]`` logits of the dense model on ``ids``.
        ids: int ``[L]`` or ``[B, L]`` token ids; positions ``1..L-1`` are the predicted targets.

    Returns:
        ``{"logp": [N, V] float64, "target": [N], "top": [N]}`` with ``N = B * (L - 1)``.
    """
    logits = dense_logits[..., :-1, :].reshape(-1, dense_logits.shape[-1])
    logp = torch.log_softmax(logits.double(), dim=-1)
    target = ids[..., 1:].reshape(-1).to(logp.device)
    return {"logp": logp, "target": target, "top": logp.argmax(-1)}


def dense_nll(reference: dict[str, torch.Tensor]) -> float:
    """Summed negative log-likelihood of the dense model over the reference's targets."""
    return float(-reference["logp"].gather(-1, reference["target"][:, None]).sum())


def token_scores(reference: dict[str, torch.Tensor], sparse_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per predicted token, in float64: sparse negative log-likelihood (``nll``), agreement with the dense argmax
    (``agree``, 0/1) and KL(p_dense || p_sparse) (``kl``), each ``[N]`` as in :func:`dense_reference`.

    ``sparse_logits`` has the shape of the dense logits given to :func:`dense_reference`.
    """
    logq = torch.log_softmax(sparse_logits[..., :-1, :].reshape(-1, sparse_logits.shape[-1]).double(), dim=-1)
    nll = -logq.gather(-1, reference["target"][:, None])[:, 0]
    agree = (logq.argmax(-1) == reference["top"]).double()
    logp = reference["logp"]
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
    return {"nll": nll, "agree": agree, "kl": kl}


def compare_logits(reference: dict[str, torch.Tensor], sparse_logits: torch.Tensor) -> dict[str, float]:
    """Sums of :func:`token_scores` over the predicted tokens (``nll``, ``agree``, ``kl``) and their count
    (``tokens``)."""
    scores = token_scores(reference, sparse_logits)
    return {name: float(v.sum()) for name, v in scores.items()} | {"tokens": int(reference["target"].numel())}


def compare_lm(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    plan: Plan | Pattern | None,
    *,
    batch_size: int = 1,
    backend: str = "auto",
    progress: bool = True,
) -> LMComparison:
    """Dense vs ``plan`` on token chunks ``[C, L]``: perplexities, top-1 agreement, mean KL(dense || sparse).

    Args:
        model: a causal LM from transformers (e.g. :func:`spattn.integrations.load_smollm2`).
        chunks: int ``[C, L]`` token ids (e.g. :func:`spattn.data.text_chunks`).
        plan: a :class:`Plan` or one pattern for every layer.
        batch_size: chunks per forward pass.
        backend: spattn backend for the sparse (and patched-dense) runs.
        progress: show a progress bar.
    """
    chunks = _check_chunks(chunks)
    _check_batch_size(batch_size)
    plan = as_plan(plan)
    device = _device(model)
    started = time.perf_counter()
    dense_sum = sparse_sum = kl_sum = 0.0
    agree = count = 0
    per_chunk: list[dict[str, float]] = []
    starts = range(0, chunks.shape[0], batch_size)
    for start in _progress(starts, len(starts), "dense vs sparse", progress):
        ids = chunks[start : start + batch_size].to(device)
        with _dense(model, backend):
            dense = _logits(model, ids)
        with patched(model, plan, backend=backend):
            sparse = _logits(model, ids)
        if not bool(torch.isfinite(sparse).all()):
            raise FloatingPointError("the sparse model produced non-finite logits")
        reference = dense_reference(dense, ids)
        scored = compare_logits(reference, sparse)
        nd, ns, kl, same, n = dense_nll(reference), scored["nll"], scored["kl"], int(scored["agree"]), scored["tokens"]
        dense_sum, sparse_sum, kl_sum = dense_sum + nd, sparse_sum + ns, kl_sum + kl
        agree, count = agree + same, count + n
        per_chunk.append(
            {"dense_nll": nd / n, "sparse_nll": ns / n, "top1_agreement": same / n, "mean_kl": kl / n}
        )
    return LMComparison(
        chunks=chunks.shape[0],
        chunk_length=chunks.shape[1],
        tokens=count,
        dense_perplexity=math.exp(dense_sum / count),
        sparse_perplexity=math.exp(sparse_sum / count),
        top1_agreement=agree / count,
        mean_kl=kl_sum / count,
        dense_nll=dense_sum / count,
        sparse_nll=sparse_sum / count,
        seconds=time.perf_counter() - started,
        per_chunk=per_chunk,
    )


# ---------------------------------------------------------------------------------------------- encoders
def sentence_embeddings(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, hidden]`` L2-normalised masked-mean sentence embeddings of a tokenizer batch (MiniLM recipe)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch.get("attention_mask")
    mask = torch.ones(hidden.shape[:2], device=hidden.device) if mask is None else mask.to(hidden.device).float()
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


@dataclass
class EmbeddingComparison:
    """Cosine similarity of dense and sparse sentence embeddings, per sentence and summarised."""

    sentences: int
    mean_cosine: float
    min_cosine: float
    cosines: list[float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.sentences} sentences: cosine dense vs sparse mean {self.mean_cosine:.5f}, "
            f"min {self.min_cosine:.5f}"
        )


def compare_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    plan: Plan | Pattern | None,
    *,
    batch_size: int = 16,
    max_length: int = 512,
    backend: str = "auto",
    progress: bool = True,
) -> EmbeddingComparison:
    """Cosine similarity of the encoder's sentence embeddings, dense vs ``plan``, for each sentence."""
    if isinstance(sentences, str) or not isinstance(sentences, Sequence) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    if not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ValueError("sentences must all be non-empty strings")
    _check_batch_size(batch_size)
    plan = as_plan(plan)
    device = _device(model)
    started = time.perf_counter()
    cosines: list[float] = []
    starts = range(0, len(sentences), batch_size)
    for start in _progress(starts, len(starts), "embeddings", progress):
        batch = tokenizer(
            list(sentences[start : start + batch_size]), padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with _dense(model, backend):
            dense = sentence_embeddings(model, batch)
        with patched(model, plan, backend=backend):
            sparse = sentence_embeddings(model, batch)
        cosines.extend((dense * sparse).sum(-1).tolist())
    return EmbeddingComparison(
        sentences=len(cosines),
        mean_cosine=sum(cosines) / len(cosines),
        min_cosine=min(cosines),
        cosines=cosines,
        seconds=time.perf_counter() - started,
    )


def paragraphs(text: str, *, min_words: int = 8, max_items: int | None = None) -> list[str]:
    """Blank-line separated paragraphs of ``text`` with at least ``min_words`` words (encoder inputs)."""
    out = [p.strip() for p in text.split("\n\n") if len(p.split()) >= min_words]
    return out[:max_items] if max_items is not None else out


# ---------------------------------------------------------------------------------------------- one command
def parse_plan(spec: str | None) -> Plan:
    """A plan from the command line: ``None``/``"dense"``, a plan JSON file, a pattern/plan JSON string, or a
    short form ``"sinks=64,window=256"`` (the union of the named patterns, ``window=L`` or ``window=L:R``)."""
    import json

    import spattn

    if spec is None or spec.strip().lower() in ("", "dense", "full", "none"):
        return Plan()
    spec = spec.strip()
    if spec.startswith("{"):
        data = json.loads(spec)
        return Plan.from_dict(data) if "format" in data or "layers" in data else Plan.uniform(
            spattn.pattern_from_dict(data)
        )
    path = Path(spec).expanduser()
    if path.suffix == ".json" or path.is_file():
        return Plan.load(path)
    makers = {
        "sinks": lambda a: spattn.Sinks(int(a[0])),
        "window": lambda a: spattn.Window(int(a[0]), int(a[1]) if len(a) > 1 else 0),
        "dilated": lambda a: spattn.Dilated(int(a[0]), int(a[1])),
        "strided": lambda a: spattn.Strided(int(a[0]), int(a[1]) if len(a) > 1 else 1),
        "random": lambda a: spattn.RandomBlocks(int(a[0])),
    }
    parts = []
    for item in spec.split(","):
        name, _, arg = item.partition("=")
        name = name.strip().lower()
        if name not in makers or not arg:
            raise ValueError(f"cannot read plan {spec!r}: use e.g. 'sinks=64,window=256', a JSON file or JSON text")
        parts.append(makers[name](arg.split(":")))
    pattern = parts[0]
    for p in parts[1:]:
        pattern = pattern | p
    return Plan.uniform(pattern)


def evaluate(
    model_name: str = "smollm2",
    source: str = "austen",
    plan: Plan | Pattern | str | None = None,
    *,
    chunk_length: int = 1024,
    max_chunks: int | None = 4,
    batch_size: int = 1,
    backend: str = "auto",
    sentences: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Load an offline model, take held-out text from ``source`` and compare dense with ``plan``.

    ``model_name="smollm2"`` measures perplexity / agreement / KL on chunks of ``chunk_length`` tokens;
    ``model_name="minilm"`` measures embedding cosine on up to ``sentences`` paragraphs of the held-out text.
    Returns one JSON-ready record (inputs, results, versions).
    """
    from spattn.data.chunks import text_chunks
    from spattn.data.corpora import load_text
    from spattn.integrations.models import load_minilm, load_smollm2

    plan = parse_plan(plan) if isinstance(plan, str) or plan is None else as_plan(plan)
    record: dict[str, Any] = {
        "model": model_name, "source": str(source), "plan": plan.to_dict(), "backend": backend,
        "environment": machine_info(),
    }
    if model_name == "smollm2":
        model, tokenizer = load_smollm2()
        chunks = text_chunks(source, tokenizer, chunk_length, split="held_out", max_chunks=max_chunks)
        result = compare_lm(model, chunks, plan, batch_size=batch_size, backend=backend, progress=progress)
        record.update(chunk_length=chunk_length, split="held_out", result=result.to_dict(), summary=str(result))
    elif model_name == "minilm":
        model, tokenizer = load_minilm()
        text = load_text(source)
        items = paragraphs(text[int(len(text) * 0.9) :], max_items=sentences)
        if not items:
            raise ValueError(f"no paragraphs of >= 8 words in the held-out part of {source!r}")
        result = compare_embeddings(model, tokenizer, items, plan, batch_size=batch_size * 16, backend=backend,
                                    progress=progress)
        record.update(split="held_out", result=result.to_dict(), summary=str(result))
    else:
        raise ValueError(f"model_name must be 'smollm2' or 'minilm', got {model_name!r}")
    return record


def main(argv: list[str] | None = None) -> None:
    """``python -m spattn.eval.lm --model smollm2 --text austen --plan sinks=64,window=256``"""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m spattn.eval.lm", description=main.__doc__)
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm"])
    parser.add_argument("--text", default="austen", help="corpus name (austen, kjv) or a text file")
    parser.add_argument("--plan", default=None, help="'sinks=64,window=256', a plan JSON file, or JSON text")
    parser.add_argument("--length", type=int, default=1024, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=4, help="held-out chunks to evaluate")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--sentences", type=int, default=64, help="paragraphs for the encoder")
    parser.add_argument("--output", default=None, help="write the JSON record here")
    args = parser.parse_args(argv)
    record = evaluate(args.model, args.text, args.plan, chunk_length=args.length, max_chunks=args.chunks,
                      batch_size=args.batch_size, backend=args.backend, sentences=args.sentences)
    record["command"] = "python -m spattn.eval.lm " + " ".join(sys.argv[1:] if argv is None else argv)
    text = json.dumps({k: v for k, v in record.items()}, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(record["summary"])
    if not args.output:
        print(text)


if __name__ == "__main__":
    main()
