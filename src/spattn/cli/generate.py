"""``spattn generate``: generate text with a sparse plan (sparse decode inside Hugging Face ``generate``)."""

from __future__ import annotations

import json
import sys

import typer

from spattn.cli._runtime_options import build_runtime


def generate_command(
    prompt: str = typer.Option(..., help="The prompt text ('-' reads it from stdin)."),
    model: str = typer.Option("smollm2", help="'smollm2' or a Hugging Face model folder."),
    plan: str = typer.Option("dense", help="A plan JSON file (spattn.Plan.save) or 'dense'."),
    max_new_tokens: int = typer.Option(64, min=1, help="Tokens to generate."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass (temperature > 0)."),
    chat: bool = typer.Option(False, help="Wrap the prompt as a user message of the chat template."),
    device: str | None = typer.Option(None, help="torch device, e.g. cuda (default CPU)."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    min_sparse_tokens: int = typer.Option(1024, min=0, help="Sequences shorter than this run dense."),
    latency_target_ms: float | None = typer.Option(None, help="p95 latency target (ms), see --latency-scope."),
    latency_scope: str = typer.Option("step", help="What the target bounds: 'step' (p95 of decode steps) or "
                                      "'request' (p95 of per-request generation latency)."),
    budget: int | None = typer.Option(None, help="Initial page budget (default: the plan's TopK blocks)."),
    max_budget: int = typer.Option(64, min=0, help="Largest page budget."),
    recall_floor: float | None = typer.Option(None, help="Minimum sampled recall per layer."),
    recall_sample: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of steps whose recall is measured."),
    block_size: int = typer.Option(128, min=1, help="Block size of the layouts and page size of the cache."),
    cuda_graph: bool = typer.Option(False, help="Greedy decode with the static step recorded in a CUDA graph "
                                    "(Runtime(cuda_graph=True); eager static step where capture is impossible)."),
    stats: bool = typer.Option(False, help="Print the controller's counts as JSON on stderr."),
) -> None:
    """Generate text from a prompt with a sparse plan; prints the completion."""
    import torch

    text = sys.stdin.read() if prompt == "-" else prompt
    if not text:
        raise typer.BadParameter("the prompt is empty", param_hint="--prompt")
    runtime, tokenizer = build_runtime(
        model, plan, device=device, dtype=dtype, min_sparse_tokens=min_sparse_tokens,
        latency_target_ms=latency_target_ms, latency_scope=latency_scope, budget=budget, max_budget=max_budget,
        recall_floor=recall_floor, recall_sample=recall_sample, block_size=block_size, cuda_graph=cuda_graph)
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ids = ids.to(next(runtime.model.parameters()).device)
    sampling: dict = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = runtime.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           pad_token_id=pad, **sampling)
    typer.echo(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    if stats:
        summary = runtime.controller.summary()
        if runtime.decoder is not None:
            summary["cuda_graph"] = {"captures": runtime.decoder.captures, "replays": runtime.decoder.replays,
                                     "off_reason": runtime.decoder.reason}
        typer.echo(json.dumps(summary), err=True)
