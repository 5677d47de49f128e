"""``spattn serve``: the OpenAI-compatible HTTP server with Prometheus metrics (FastAPI + uvicorn)."""

from __future__ import annotations

import logging

import typer

from spattn.cli._runtime_options import build_runtime


def serve_command(
    model: str = typer.Option("smollm2", help="'smollm2' or a Hugging Face model folder."),
    plan: str = typer.Option("dense", help="A plan JSON file (spattn.Plan.save) or 'dense'."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to bind."),
    device: str | None = typer.Option(None, help="torch device, e.g. cuda (default CPU)."),
    dtype: str = typer.Option("auto", help="auto, float32, float16 or bfloat16."),
    min_sparse_tokens: int = typer.Option(1024, min=0, help="Sequences shorter than this run dense."),
    latency_target_ms: float | None = typer.Option(None, help="p95 latency target (ms), see --latency-scope."),
    latency_scope: str = typer.Option("step", help="What the target bounds: 'step' (p95 of decode steps) or "
                                      "'request' (p95 of per-request generation latency)."),
    budget: int | None = typer.Option(None, help="Initial page budget (default: the plan's TopK blocks)."),
    max_budget: int = typer.Option(64, min=0, help="Largest page budget."),
    recall_floor: float | None = typer.Option(None, help="Minimum sampled recall per layer."),
    recall_sample: float = typer.Option(0.05, min=0.0, max=1.0, help="Fraction of steps whose recall is measured."),
    block_size: int = typer.Option(128, min=1, help="Block size of the layouts and page size of the cache."),
    cuda_graph: bool = typer.Option(False, help="Greedy requests decode with the static step recorded in a CUDA "
                                    "graph (Runtime(cuda_graph=True)); sampled requests use model.generate."),
    max_batch: int = typer.Option(8, min=1, help="Largest batch of requests per generate call."),
    batch_wait_ms: float = typer.Option(5.0, min=0.0, help="How long to wait to fill a batch."),
    max_queue: int = typer.Option(256, min=1, help="Queued requests beyond which new ones get 429."),
    drain_timeout: float = typer.Option(60.0, min=0.0, help="Seconds to finish in-flight requests on shutdown."),
) -> None:
    """Serve a model with a sparse plan: /v1/completions, /v1/chat/completions (SSE), /healthz, /metrics."""
    from spattn._optional import require
    from spattn.runtime.monitor import configure_json_logging
    from spattn.serve import Engine, create_app

    uvicorn = require("uvicorn", extra="serve")
    configure_json_logging(logging.INFO)
    runtime, tokenizer = build_runtime(
        model, plan, device=device, dtype=dtype, min_sparse_tokens=min_sparse_tokens,
        latency_target_ms=latency_target_ms, latency_scope=latency_scope, budget=budget, max_budget=max_budget,
        recall_floor=recall_floor, recall_sample=recall_sample, block_size=block_size, cuda_graph=cuda_graph)
    engine = Engine(runtime, tokenizer, max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue,
                    model_name=model)
    app = create_app(engine)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(drain_timeout))
