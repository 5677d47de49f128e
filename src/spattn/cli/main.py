"""``spattn`` command: ``demo``, ``bench``, ``data``, ``report``, ``train``."""

from __future__ import annotations

import typer

from spattn.cli.data import data_app
from spattn.cli.eval import eval_app
from spattn.cli.generate import generate_command
from spattn.cli.report import report_command
from spattn.cli.serve import serve_command
from spattn.cli.train import train_app

app = typer.Typer(
    name="spattn",
    help="Sparse attention that balances efficiency against contextual coverage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def demo(
    length: int = typer.Option(1024, min=1, help="Sequence length of the toy attention."),
    block_size: int = typer.Option(64, min=1, help="Block size of the compiled layouts."),
    seed: int = typer.Option(0, help="Random seed of the toy inputs."),
) -> None:
    """Compile a few patterns, show their density and block picture, and check attention against dense."""
    from spattn.cli.demo import run_demo

    run_demo(length=length, block_size=block_size, seed=seed)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    suite: str = typer.Option("reference", help="Benchmark suite: kernels, selectors, coverage or reference."),
    lengths: str = typer.Option("", help="reference suite: comma-separated sequence lengths (default 4096,16384)."),
    repeats: int = typer.Option(5, help="reference suite: timed repetitions per row (median reported)."),
    output: str = typer.Option("", help="Where to write the JSON record (default ./spattn-bench/SUITE.json)."),
    overwrite: bool = typer.Option(False, help="Allow replacing committed files under benchmarks/results/."),
) -> None:
    """Run a benchmark suite and write its JSON record (machine, versions, commit, rows); extra arguments
    after the options go to the suite (e.g. ``spattn bench --suite kernels -- --quick``)."""
    from spattn.bench import SUITES, run_suite
    from spattn.bench.record import write

    if suite not in SUITES:
        raise typer.BadParameter(f"unknown suite {suite!r}; available: {', '.join(sorted(SUITES))}")
    argv = list(ctx.args)
    if suite == "reference":
        if lengths:
            argv += ["--lengths", *[x for x in lengths.split(",") if x]]
        argv += ["--repeats", str(repeats)]
    record = run_suite(suite, argv)
    try:
        path = write(record, output or f"spattn-bench/{suite}.json", overwrite=overwrite)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {path}")


app.add_typer(data_app, name="data", help="Prepare offline corpora (Austen, KJV).")
app.command(name="report")(report_command)
app.add_typer(eval_app, name="eval")
app.add_typer(train_app, name="train", help="Learned sparsity: distil gates, train LMs and tasks.")
app.command(name="generate")(generate_command)  # the runtime (issue 17); extras load lazily inside
app.command(name="serve")(serve_command)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
