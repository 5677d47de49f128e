"""Options shared by ``spattn generate`` and ``spattn serve``: model, plan and controller settings."""

from __future__ import annotations

from typing import Any


def build_runtime(model: str, plan: str, *, device: str | None, dtype: str, min_sparse_tokens: int,
                  latency_target_ms: float | None, budget: int | None, max_budget: int, recall_floor: float | None,
                  recall_sample: float, block_size: int, latency_scope: str = "step",
                  cuda_graph: bool = False) -> tuple[Any, Any]:
    """``(Runtime, tokenizer)`` from the command-line options."""
    from spattn.runtime import ControllerConfig, Runtime
    from spattn.runtime.loading import load_model, load_plan

    lm, tokenizer = load_model(model, dtype=dtype, device=device)
    import typer

    from spattn.runtime.controller import SCOPES

    if latency_scope not in SCOPES:
        raise typer.BadParameter(f"must be one of {', '.join(SCOPES)}, got {latency_scope!r}",
                                 param_hint="--latency-scope")
    controller = ControllerConfig(latency_target_ms=latency_target_ms, latency_scope=latency_scope, budget=budget,
                                  max_budget=max_budget, recall_floor=recall_floor)
    runtime = Runtime(lm, load_plan(plan), min_sparse_tokens=min_sparse_tokens, controller=controller,
                      recall_sample=recall_sample, block_size=block_size, cuda_graph=cuda_graph)
    return runtime, tokenizer
