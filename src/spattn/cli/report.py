"""``spattn report``: which sparse pattern saves the most compute for a model on a text, with the evidence."""

from __future__ import annotations

import shlex
import sys

import typer

from spattn.report.config import DEFAULT_SELECTORS, FAMILIES, SELECTORS


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated numbers, got {text!r}") from None


def _names(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(x.strip() for x in text.split(",") if x.strip())


def _show_help(ctx: typer.Context, value: bool) -> None:
    """``--help`` declared here so that it carries no ``<bool>`` (typer shows a type for every flag it makes)."""
    if value and not ctx.resilient_parsing:
        typer.echo(ctx.get_help(), color=ctx.color)
        raise typer.Exit()


def report_command(
    model: str = typer.Option("smollm2", help="'smollm2' (SmolLM2-135M, offline) or a Hugging Face model folder."),
    text: str = typer.Option("austen", "--text", help="Corpus name ('austen', 'kjv') or a text file."),
    output: str = typer.Option("spattn-report", "--output", "-o", help="Output directory."),
    budgets: str | None = typer.Option(
        None, help="Comma-separated fractions of the dense keys, each in (0, 1] "
                   "(default 0.1,0.25; --quick 0.25; the issue's 0.05,0.1,0.25 takes about half as long again)."),
    lengths: str | None = typer.Option(
        None, help="Comma-separated lengths in tokens: candidates are fitted and picked at the first, and the picks "
                   "are checked again at the others (default 1024,2048; --quick 256; 1024,4096 takes about twice "
                   "as long on a 2-core CPU)."),
    chunk_length: int | None = typer.Option(None, help="Only one length: tokens per chunk (same as --lengths N)."),
    calibration_chunks: int | None = typer.Option(None, help="Chunks captured to measure recall and fit (default 1)."),
    selection_chunks: int | None = typer.Option(None, help="Held-out chunks the pick is made on (default 1)."),
    eval_chunks: int | None = typer.Option(None, help="Further held-out chunks every reported number comes from "
                                                      "(default 1)."),
    block_size: int = typer.Option(64, help="Block size of the compiled layouts and of dynamic selection."),
    families: str | None = typer.Option(None, help=f"Candidate families, comma-separated, from {','.join(FAMILIES)}."),
    selectors: str | None = typer.Option(
        None, help=f"Selectors of the dynamic (Adaptive) family, from {','.join(SELECTORS)} "
                   f"(default {','.join(DEFAULT_SELECTORS)})."),
    device: str = typer.Option("auto", help="'auto' (CUDA when present), 'cpu' or 'cuda'."),
    seed: int = typer.Option(0, help="Seed of random patterns and timing inputs."),
    repeats: int | None = typer.Option(None, help="Timed repetitions for latency (median; default 3, --quick 2)."),
    retrieval_samples: int | None = typer.Option(
        None, help="Pass-key retrieval samples scored for each pick, its runner-up and dense (default 3, one per "
                   "depth; --quick 2; 0: none)."),
    gates: str | None = typer.Option(
        None, help="A saved gate checkpoint for this model (spattn.learned.save_gates): measures the learned family."),
    kernel_references: bool | None = typer.Option(
        None, "--kernel-references/--no-kernel-references", show_default=False, metavar="",
        help="Time spattn's kernel against FlexAttention and SDPA for dense causal and each pick at every length "
             "(default: on with CUDA, off on the CPU)."),
    retrieval_at_every_length: bool | None = typer.Option(
        None, "--retrieval-at-every-length/--no-retrieval-at-every-length", show_default=False, metavar="",
        help="Also score the pass keys at each further length, for dense and each pick and runner-up fitted there "
             "(default: on with CUDA, off on the CPU, where it would take the default run past 10 minutes)."),
    latency_dtype: str | None = typer.Option(
        None, help="Dtype the latency column and the kernel references time the attention inputs in: float32, "
                   "bfloat16 or float16 (default bfloat16 with CUDA, the serving dtype; float32 on the CPU)."),
    quick: bool = typer.Option(False, "--quick", metavar="",
                               help="A smoke answer aimed at under a minute: 256 tokens, one budget (0.25), one "
                                    "candidate per family, 2 pass keys, no threads view (the report says what it "
                                    "omits)."),
    overwrite: bool = typer.Option(False, "--overwrite", metavar="",
                                   help="Replace a report already in the output directory."),
    fresh: bool = typer.Option(False, "--fresh", metavar="", help="With --overwrite: recompute cached stages too."),
    time_budget: float | None = typer.Option(
        None, help="Seconds: once spent, skip the candidates not yet measured, further lengths, retrieval and the "
                   "threads view, and say so in results.json (timings.skipped_for_time); default no limit."),
    retime: bool = typer.Option(False, "--retime", metavar="",
                                help="Measure every latency again and reuse everything else (implies --overwrite)."),
    _help: bool = typer.Option(False, "--help", metavar="", is_eager=True, expose_value=False, callback=_show_help,
                               help="Show this message and exit."),
) -> None:
    """Find the sparse attention pattern that saves the most compute for a model while keeping what it needs.

    Captures the model's real attention on calibration chunks, fits candidate patterns (windows, sinks,
    strided and random reach, Budgeted, dynamic Adaptive per selector, the planner's per-head plan, a saved learned
    gate) to each budget, measures their cost,
    latency (interleaved with dense, noisy rows flagged), peak memory, recall per layer and head, reachability
    and held-out perplexity with bootstrap intervals; picks per budget on a selection split and reports on a
    separate held-out split; checks each pick again at the longer --lengths; and writes report.html,
    results.json and figures. Re-running after an interruption resumes from cached stages.
    """
    import torch

    from spattn._optional import MissingExtraError
    from spattn.report import OutputExistsError, ReportConfig, run_report

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    all_lengths: tuple[int, ...] | None = None
    if lengths is not None:
        try:
            all_lengths = tuple(int(x) for x in lengths.split(",") if x.strip())
        except ValueError:
            raise typer.BadParameter(f"--lengths must be comma-separated token counts, got {lengths!r}") from None
        if not all_lengths:
            raise typer.BadParameter("--lengths must name at least one length, e.g. --lengths 1024,4096")
        if chunk_length is not None:
            raise typer.BadParameter("give either --lengths or --chunk-length, not both")
    elif chunk_length is not None:
        all_lengths = (chunk_length,)
    options = dict(
        model=model, text=text, budgets=None if budgets is None else _floats(budgets, "--budgets"), gates=gates,
        chunk_length=None if all_lengths is None else all_lengths[0],
        lengths=None if all_lengths is None else tuple(all_lengths[1:]),
        calibration_chunks=calibration_chunks, selection_chunks=selection_chunks, eval_chunks=eval_chunks,
        block_size=block_size,
        families=_names(families), selectors=_names(selectors), device=device, seed=seed, latency_repeats=repeats,
        retrieval_samples=retrieval_samples, kernel_references=kernel_references, latency_dtype=latency_dtype,
        retrieval_at_every_length=retrieval_at_every_length,
    )
    try:
        if quick:
            config = ReportConfig.quick_defaults(**options)
        else:
            config = ReportConfig(**{k: v for k, v in options.items() if v is not None})
        command = " ".join(shlex.quote(a) for a in ["spattn", *sys.argv[1:]])
        run_report(config, output, overwrite=overwrite or retime, fresh=fresh, retime=retime, command=command,
                   time_budget=time_budget)
    except (OutputExistsError, OSError, MissingExtraError, ValueError, TypeError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
