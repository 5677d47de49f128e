"""``spattn`` command: ``demo``, ``bench``, ``data``, ``report``."""

from __future__ import annotations

import typer

from spattn.cli.data import data_app
from spattn.cli.generate import generate_command
from spattn.cli.report import report_command
from spattn.cli.serve import serve_command

app = typer.Typer(
    name="spattn",
    help="Sparse attention that balances efficiency against contextual coverage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def demo(
    length: int = typer.Option(1024, help="Sequence length of the toy attention."),
    block_size: int = typer.Option(64, help="Block size of the compiled layouts."),
    seed: int = typer.Option(0, help="Random seed of the toy inputs."),
) -> None:
    """Compile a few patterns, show their density and block picture, and check attention against dense."""
    from spattn.cli.demo import run_demo

    run_demo(length=length, block_size=block_size, seed=seed)


@app.command()
def bench(
    suite: str = typer.Option("reference", help="Which benchmark suite: 'reference' (CPU, issue 2)."),
    lengths: str = typer.Option("4096,16384", help="Comma-separated sequence lengths."),
    repeats: int = typer.Option(5, help="Timed repetitions per row (median reported)."),
    output: str = typer.Option("benchmarks/results/cpu/reference.json", help="Where to write the JSON rows."),
) -> None:
    """Time the reference backend against dense SDPA and write JSON rows (machine, versions, commit)."""
    from spattn.bench.reference import run_reference_bench

    if suite != "reference":
        raise typer.BadParameter(f"unknown suite {suite!r}; available: reference (GPU suites live in benchmarks/)")
    run_reference_bench([int(x) for x in lengths.split(",") if x], repeats=repeats, output=output)


app.add_typer(data_app, name="data", help="Prepare offline corpora (Austen, KJV).")
app.command(name="report")(report_command)
app.command(name="generate")(generate_command)  # the runtime (issue 17); extras load lazily inside
app.command(name="serve")(serve_command)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
