"""``spattn train``: learned-sparsity recipes with progress bars, safetensors checkpoints and JSON logs.

* ``spattn train distil``: SeerAttention-style gates for frozen SmolLM2 on Austen; then, on held-out Austen and
  KJV, block recall of the gates against the oracle top-k and the sliding window at the same block count, and
  perplexity dense / window / gates / pooled selector at that budget (share of the window -> dense gap closed).
* ``spattn train lm``: a small LM from scratch on Austen + KJV bytes with dense, window and learned attention at
  equal block budget, the learned one with and without the regularisers (loss curves, collapse metrics).
* ``spattn train task``: the MQAR / ListOps tasks of ``spattn.eval.tasks`` with dense, window and learned
  attention at equal budget.

The recipe functions (``distil_recipe``, ``lm_recipe``, ``task_recipe``) return the JSON they write;
``benchmarks/learned.py`` runs them on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

train_app = typer.Typer(
    help="Learned sparse attention: distil gates for a frozen model, train LMs and tasks with learned attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

VARIANTS = ("dense", "window", "learned", "learned-reg", "pooled", "distill", "hierarchical")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise typer.BadParameter(f"device must be auto, cpu or cuda, got {name!r}", param_hint="--device")
    return torch.device(name)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message)


# ------------------------------------------------------------------------------------------ (a) distil
def _perplexity(model, chunks: torch.Tensor, plan, block_size: int, backend: str) -> float:
    """Next-token perplexity of ``model`` on ``chunks [C, L]`` with ``plan`` (None = dense) at ``block_size``."""
    import torch.nn.functional as F

    from spattn.integrations import patched

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), patched(model, plan, backend=backend, block_size=block_size):
        for row in chunks:
            ids = row[None].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(total / count)


def _recall(model, chunks: torch.Tensor, gates_path: Path, layers: list[int], budget: int, block_size: int
            ) -> dict[str, Any]:
    """Mean true recall (kept share of the dense softmax mass) of gates / oracle top-k / window / pooled at
    ``budget`` key blocks per query block, per layer, on captured held-out queries and keys."""
    from spattn.coverage import measure, oracle_layout
    from spattn.integrations.capture import capture
    from spattn.learned import load
    from spattn.patterns import Window
    from spattn.selectors import TopK

    bs = block_size
    rows: dict[str, list[list[float]]] = {k: [] for k in ("gate", "oracle", "window", "pooled")}
    device = next(model.parameters()).device
    for chunk in chunks:
        cap = capture(model, chunk[None].to(device), layers=layers, mode="full", block_size=bs)
        per = {k: [] for k in rows}
        for layer in layers:
            q, k = cap.queries[layer].to(device), cap.keys[layer].to(device)
            candidates = {
                "gate": TopK(load(gates_path, layer), budget),
                "pooled": TopK("pooled", budget),
                "window": Window((budget - 1) * bs),
            }
            for name, pattern in candidates.items():
                per[name].append(float(measure(q, k, pattern, causal=True, topk=0, block_size=bs).recall.mean()))
            oracle = oracle_layout(q, k, budget=budget, block_size=bs, causal=True)
            per["oracle"].append(float(measure(q, k, oracle, causal=True, topk=0).recall.mean()))
            del q, k
        for name in rows:
            rows[name].append(per[name])
        del cap
    out: dict[str, Any] = {}
    for name, values in rows.items():
        per_layer = [sum(v[i] for v in values) / len(values) for i in range(len(layers))]
        out[name] = {"mean": sum(per_layer) / len(per_layer), "per_layer": per_layer}
    out["gate_over_oracle"] = out["gate"]["mean"] / max(out["oracle"]["mean"], 1e-12)
    return out


def distil_recipe(
    *,
    output: Path,
    corpus: str = "austen",
    eval_corpora: tuple[str, ...] = ("austen", "kjv"),
    length: int = 1024,
    train_chunks: int = 4,
    eval_chunks: int = 2,
    steps: int = 100,
    lr: float = 1e-3,
    block_size: int = 64,
    hidden: int = 64,
    budget: int = 4,
    layers: list[int] | None = None,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Recipe (a): distil gates for frozen SmolLM2 and evaluate them at ``budget`` blocks per query block."""
    from spattn.bench.env import machine_info
    from spattn.data import text_chunks
    from spattn.integrations import Plan
    from spattn.integrations.models import load_smollm2
    from spattn.learned import distill, load
    from spattn.patterns import Window
    from spattn.selectors import TopK

    start = time.perf_counter()
    dev = _device(device)
    model, tokenizer = load_smollm2(device=dev)
    train = text_chunks(corpus, tokenizer, length, split="calibration", max_chunks=train_chunks)
    gates_path = Path(output) / "gates.safetensors"

    def report(i: int, n: int, loss: float) -> None:
        if progress:
            _say(f"gate {i + 1}/{n}: final KL {loss:.4f}")

    gates = distill(model, train, block_size=block_size, hidden=hidden, steps=steps, lr=lr, layers=layers,
                    path=gates_path, progress=report, device=dev)
    wanted = sorted(gates)
    distil_seconds = time.perf_counter() - start
    plans = {
        "dense": None,
        "window": Plan.uniform(Window((budget - 1) * block_size)),
        "gate": Plan(layers={i: TopK(load(gates_path, i), budget) for i in wanted}),
        "pooled": Plan(layers={i: TopK("pooled", budget) for i in wanted}),
    }
    if layers is not None:  # layers without a gate stay dense in every plan, for a like-for-like comparison
        plans["window"] = Plan(layers={i: Window((budget - 1) * block_size) for i in wanted})
    results: dict[str, Any] = {}
    for name in eval_corpora:
        held = text_chunks(name, tokenizer, length, split="held_out", max_chunks=eval_chunks)
        entry: dict[str, Any] = {"chunks": int(held.shape[0]), "length": int(held.shape[1])}
        entry["recall"] = _recall(model, held, gates_path, wanted, budget, block_size)
        entry["perplexity"] = {k: _perplexity(model, held, p, block_size, backend) for k, p in plans.items()}
        ppl = entry["perplexity"]
        gap = ppl["window"] - ppl["dense"]
        entry["gap_closed"] = {k: (ppl["window"] - ppl[k]) / gap if gap > 0 else None for k in ("gate", "pooled")}
        results[name] = entry
        if progress:
            recall = {k: round(entry["recall"][k]["mean"], 3) for k in ("gate", "oracle", "window", "pooled")}
            _say(f"{name}: recall {recall}; perplexity {ppl}")
    data = {
        "recipe": "distil", "model": "SmolLM2-135M", "train_corpus": corpus,
        "config": {"length": length, "train_chunks": int(train.shape[0]), "eval_chunks": eval_chunks, "steps": steps,
                   "lr": lr, "block_size": block_size, "hidden": hidden, "budget_blocks": budget,
                   "layers": wanted, "backend": backend},
        "density_note": f"every sparse variant keeps {budget} key blocks of {block_size} per query block (causal)",
        "results": results, "gates": str(gates_path), "distil_seconds": distil_seconds,
        "seconds": time.perf_counter() - start, "machine": machine_info(),
    }
    _write(Path(output) / "results.json", data)
    return data


# ------------------------------------------------------------------------------------------ (b) lm / (c) task
def attention_factory(variant: str, *, heads: int, kv_heads: int, head_dim: int, budget: int, block_size: int,
                      temperature: float = 1.0, backend: str = "auto") -> Callable[[int], Any]:
    """``layer -> pattern`` for a variant at ``budget`` key blocks per query block: ``dense`` (None),
    ``window`` (``Window((budget - 1) * block_size)``: the ``budget`` latest blocks), ``pooled`` (the current
    block + the ``budget - 1`` blocks of MoBA's mean-pooled-key routing, parameter-free), ``learned`` /
    ``learned-reg`` (a :class:`LearnedTopK`, the current block + ``budget - 1`` routed blocks; the two differ
    only by the trainer's regularisers), ``distill`` (the same router with its gate trained by KL to the
    block-pooled dense attention, DeepSeek's indexer recipe) and ``hierarchical`` (a
    :class:`~spattn.hierarchical.HierarchicalAttention` with learned gates and pooling: ``select_count =
    budget - 1`` selected blocks and a ``block_size`` window, so at most ``budget`` blocks at full resolution,
    plus one compressed token per ``block_size // 4`` keys)."""
    from spattn.learned import LearnedTopK
    from spattn.patterns import Window

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if budget < 2:
        raise ValueError(f"budget must be >= 2 blocks (the current block + at least one more), got {budget}")
    if variant == "dense":
        return lambda _layer: None
    if variant == "window":
        return lambda _layer: Window((budget - 1) * block_size)
    if variant == "hierarchical":
        from spattn.hierarchical import HierarchicalAttention
        from spattn.patterns import Hierarchical

        config = Hierarchical(compress_block=block_size // 2, compress_stride=block_size // 4, select_block=block_size,
                              select_count=budget - 1, window=block_size, pooling="learned")
        return lambda _layer: HierarchicalAttention(config, heads, kv_heads, head_dim, backend=backend)
    if variant == "distill":
        return lambda _layer: LearnedTopK(heads, kv_heads, head_dim, blocks=budget - 1, block_size=block_size,
                                          local=1, training="distill", backend=backend)
    if variant == "pooled":  # MoBA's parameter-free routing: nothing learns through the selection
        return lambda _layer: LearnedTopK(heads, kv_heads, head_dim, blocks=budget - 1, block_size=block_size,
                                          local=1, scorer="pooled", detach_inputs=True, backend=backend)
    return lambda _layer: LearnedTopK(heads, kv_heads, head_dim, blocks=budget - 1, block_size=block_size, local=1,
                                      temperature=temperature, backend=backend)


def parse_regularisers(text: str | None):
    """``"entropy=0.05,balance=0.05,drop=0.1"`` -> :class:`~spattn.learned.train.Regularisers` (None: the
    recipes' anti-collapse set)."""
    from spattn.learned.train import Regularisers

    if text is None:
        return Regularisers.anti_collapse()
    names = {f for f in Regularisers.__dataclass_fields__}
    values = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, _, value = item.partition("=")
        if name not in names:
            raise typer.BadParameter(f"unknown regulariser {name!r}; choose from {sorted(names)}",
                                     param_hint="--regularisers")
        try:
            values[name] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{name} needs a number, got {value!r}", param_hint="--regularisers") from None
    try:
        return Regularisers(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--regularisers") from None


def _train_variants(make_model: Callable[[str], torch.nn.Module], batches: Callable[[], Any], eval_batches: list,
                    variants: list[str], *, steps: int, lr: float, output: Path, temperature_end: float,
                    regularisers: Any, progress: bool, meta: dict[str, Any]) -> dict[str, Any]:
    from spattn.learned import Schedule
    from spattn.learned.train import Regularisers, fit

    runs = {}
    for variant in variants:
        torch.manual_seed(0)
        model = make_model(variant)
        temperature = Schedule(1.0, temperature_end, steps, shape="exponential") if variant.startswith("learned") \
            else None
        weights = regularisers if variant == "learned-reg" else Regularisers()
        result = fit(model, batches(), steps=steps, lr=lr, regularisers=weights,
                     temperature=temperature, eval_batches=eval_batches, log_every=max(1, steps // 8),
                     log_path=output / f"{variant}.jsonl", checkpoint=output / f"{variant}.safetensors",
                     meta={**meta, "variant": variant}, progress=progress, description=variant)
        runs[variant] = result
        if progress:
            final = result["final"]
            _say(f"{variant}: eval loss {final.get('eval_loss', float('nan')):.4f}, accuracy "
                 f"{final.get('eval_accuracy', float('nan')):.4f}" +
                 (f", gate entropy {final['gate_entropy']:.3f}, distinct blocks {final['distinct_blocks']:.3f}"
                  if "gate_entropy" in final else ""))
    return runs


def _bytes(corpora: tuple[str, ...]) -> torch.Tensor:
    from spattn.data import load_text

    text = "\n\n".join(load_text(c) for c in corpora)
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def lm_recipe(
    *,
    output: Path,
    corpora: tuple[str, ...] = ("austen", "kjv"),
    length: int = 2048,
    steps: int = 200,
    batch_size: int = 4,
    dim: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    budget: int = 4,
    block_size: int = 64,
    lr: float = 3e-3,
    temperature_end: float = 0.1,
    variants: tuple[str, ...] = ("dense", "window", "learned", "learned-reg"),
    regularisers: Any = None,
    eval_batches: int = 4,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Recipe (b): byte-level LMs from scratch on Austen + KJV at ``length`` tokens, one per attention variant
    at equal budget; the learned ones anneal the routing temperature from 1 to ``temperature_end``."""
    from spattn.bench.env import machine_info
    from spattn.learned.train import lm_batches
    from spattn.nn import TransformerLM

    start = time.perf_counter()
    regularisers = parse_regularisers(None) if regularisers is None else regularisers
    dev = _device(device)
    ids = _bytes(corpora)
    split = int(ids.numel() * 0.95)
    train_ids, held_ids = ids[:split], ids[split:]

    def to(batch):
        return batch[0].to(dev), batch[1].to(dev)

    stream = lm_batches(held_ids, length, batch_size, seed=1234)
    held = [to(next(stream)) for _ in range(eval_batches)]

    def batches():
        return (to(b) for b in lm_batches(train_ids, length, batch_size, seed=0))

    def make(variant: str) -> torch.nn.Module:
        factory = attention_factory(variant, heads=heads, kv_heads=kv_heads, head_dim=dim // heads, budget=budget,
                                    block_size=block_size, backend=backend)
        return TransformerLM(256, dim=dim, layers=layers, num_heads=heads, num_kv_heads=kv_heads, pattern=factory,
                             block_size=block_size, backend=backend).to(dev)

    config = {"corpora": list(corpora), "tokens": "utf-8 bytes (vocabulary 256)", "length": length, "steps": steps,
              "batch_size": batch_size, "dim": dim, "layers": layers, "heads": heads, "kv_heads": kv_heads,
              "budget_blocks": budget, "block_size": block_size, "lr": lr, "temperature_end": temperature_end,
              "regularisers_learned_reg": dataclasses.asdict(regularisers), "train_tokens": int(split)}
    output = Path(output)
    runs = _train_variants(make, batches, held, list(variants), steps=steps, lr=lr, output=output,
                           temperature_end=temperature_end, regularisers=regularisers, progress=progress,
                           meta={"recipe": "lm", **config})
    data = {"recipe": "lm", "config": config,
            "density_note": f"sparse variants keep {budget} key blocks of {block_size} per query block",
            "runs": _runs(runs), "seconds": time.perf_counter() - start, "machine": machine_info()}
    _write(output / "results.json", data)
    return data


def _runs(runs: dict[str, Any]) -> dict[str, Any]:
    return {k: {"final": v["final"], "history": v["history"], "seconds": v["seconds"]} for k, v in runs.items()}


def task_recipe(
    *,
    output: Path,
    task: str = "mqar",
    examples: int = 2000,
    length: int = 256,
    steps: int = 300,
    batch_size: int = 32,
    dim: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    budget: int = 2,
    block_size: int = 32,
    lr: float = 3e-3,
    temperature_end: float = 0.1,
    variants: tuple[str, ...] = ("dense", "window", "pooled", "learned", "learned-reg"),
    regularisers: Any = None,
    device: str = "auto",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Recipe (c): ``spattn.eval.tasks`` MQAR (or ListOps) trained with each attention variant at equal budget."""
    from spattn.bench.env import machine_info
    from spattn.learned.train import task_batches
    from spattn.nn import TransformerLM

    try:
        from spattn.eval import tasks
    except ImportError as exc:  # the evaluation suite's task generators (a separate issue)
        raise RuntimeError(f"spattn train task needs spattn.eval.tasks (mqar / listops): {exc}") from exc
    start = time.perf_counter()
    regularisers = parse_regularisers(None) if regularisers is None else regularisers
    dev = _device(device)
    if task == "mqar":
        vocab = 8192 if length >= 1024 else 512
        inputs, labels = tasks.mqar(examples, seq_len=length, num_kv_pairs=max(4, length // 16), vocab_size=vocab,
                                    seed=0)
        held_inputs, held_labels = tasks.mqar(256, seq_len=length, num_kv_pairs=max(4, length // 16),
                                              vocab_size=vocab, seed=1)
    else:
        raise typer.BadParameter(f"task must be 'mqar' (ListOps classifies whole sequences; use spattn.eval.train), "
                                 f"got {task!r}", param_hint="--task")
    held = [(held_inputs[i:i + 64].to(dev), held_labels[i:i + 64].to(dev)) for i in range(0, 256, 64)]

    def batches():
        return ((a.to(dev), b.to(dev)) for a, b in task_batches(inputs, labels, batch_size, seed=0))

    def make(variant: str) -> torch.nn.Module:
        factory = attention_factory(variant, heads=heads, kv_heads=kv_heads, head_dim=dim // heads, budget=budget,
                                    block_size=block_size, backend=backend)
        return TransformerLM(vocab, dim=dim, layers=layers, num_heads=heads, num_kv_heads=kv_heads, pattern=factory,
                             block_size=block_size, backend=backend).to(dev)

    config = {"task": task, "examples": examples, "length": length, "steps": steps, "batch_size": batch_size,
              "dim": dim, "layers": layers, "heads": heads, "kv_heads": kv_heads, "budget_blocks": budget,
              "block_size": block_size, "lr": lr, "vocab": vocab,
              "regularisers_learned_reg": dataclasses.asdict(regularisers)}
    output = Path(output)
    runs = _train_variants(make, batches, held, list(variants), steps=steps, lr=lr, output=output,
                           temperature_end=temperature_end, regularisers=regularisers, progress=progress,
                           meta={"recipe": "task", **config})
    data = {"recipe": "task", "config": config,
            "runs": _runs(runs), "seconds": time.perf_counter() - start, "machine": machine_info()}
    _write(output / "results.json", data)
    return data


# ------------------------------------------------------------------------------------------ commands
def _variants(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        raise typer.BadParameter(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}",
                                 param_hint="--variants")
    return names


RegularisersOption = Annotated[str | None, typer.Option(help="Weights of the learned-reg variant, e.g. "
                                                     "'entropy=0.05,balance=0.05,drop=0.1,noise=0.5' (the default).")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]

@train_app.command("distil")
def distil_command(
    output: str = typer.Option("runs/distil", "--output", "-o", help="Folder for gates, results.json."),
    corpus: str = typer.Option("austen", help="Training text (corpus name or file); held-out split is never used."),
    length: int = typer.Option(1024, help="Tokens per chunk (4096-8192 on a GPU)."),
    train_chunks: int = typer.Option(4, help="Calibration chunks the gates train on."),
    eval_chunks: int = typer.Option(2, help="Held-out chunks per evaluation corpus (austen, kjv)."),
    steps: int = typer.Option(100, help="Training steps per layer gate."),
    block_size: int = typer.Option(64, help="Gate block size (SeerAttention: 64)."),
    budget: int = typer.Option(4, help="Key blocks per query block in the comparison (every variant)."),
    layers: str | None = typer.Option(None, help="Comma-separated layers to distil (default all 30)."),
    device: DeviceOption = "auto",
) -> None:
    """(a) Distil SeerAttention-style gates for frozen SmolLM2 on Austen; recall and perplexity vs window/oracle."""
    chosen = None if layers is None else [int(x) for x in layers.split(",") if x.strip()]
    data = distil_recipe(output=Path(output), corpus=corpus, length=length, train_chunks=train_chunks,
                         eval_chunks=eval_chunks, steps=steps, block_size=block_size, budget=budget, layers=chosen,
                         device=device)
    _say(f"wrote {Path(output) / 'results.json'} and {data['gates']}")


@train_app.command("lm")
def lm_command(
    output: str = typer.Option("runs/lm", "--output", "-o", help="Folder for logs, checkpoints, results."),
    length: int = typer.Option(2048, help="Training context in tokens (bytes)."),
    steps: int = typer.Option(200, help="Training steps per variant."),
    batch_size: int = typer.Option(4, help="Sequences per step."),
    dim: int = typer.Option(128, help="Model width."),
    layers: int = typer.Option(2, help="Transformer blocks."),
    budget: int = typer.Option(4, help="Key blocks per query block for every sparse variant."),
    block_size: int = typer.Option(64, help="Block size."),
    variants: str = typer.Option("dense,window,learned,learned-reg", help=f"From {', '.join(VARIANTS)}."),
    regularisers: RegularisersOption = None,
    device: DeviceOption = "auto",
) -> None:
    """(b) Train small byte-level LMs from scratch on Austen + KJV: dense, window, learned at equal budget."""
    lm_recipe(output=Path(output), length=length, steps=steps, batch_size=batch_size, dim=dim, layers=layers,
              budget=budget, block_size=block_size, variants=_variants(variants),
              regularisers=parse_regularisers(regularisers), device=device)
    _say(f"wrote {Path(output) / 'results.json'}")


@train_app.command("task")
def task_command(
    output: str = typer.Option("runs/task", "--output", "-o", help="Folder for logs, checkpoints, results."),
    task: str = typer.Option("mqar", help="mqar (spattn.eval.tasks)."),
    length: int = typer.Option(256, help="Sequence length."),
    examples: int = typer.Option(2000, help="Training examples."),
    steps: int = typer.Option(300, help="Training steps per variant."),
    budget: int = typer.Option(2, help="Key blocks per query block for every sparse variant."),
    block_size: int = typer.Option(32, help="Block size."),
    variants: str = typer.Option("dense,window,pooled,learned,learned-reg", help=f"From {', '.join(VARIANTS)}."),
    regularisers: RegularisersOption = None,
    device: DeviceOption = "auto",
) -> None:
    """(c) Train the evaluation suite's MQAR task with learned attention against fixed patterns at equal budget."""
    task_recipe(output=Path(output), task=task, length=length, examples=examples, steps=steps, budget=budget,
                block_size=block_size, variants=_variants(variants), regularisers=parse_regularisers(regularisers),
                device=device)
    _say(f"wrote {Path(output) / 'results.json'}")
