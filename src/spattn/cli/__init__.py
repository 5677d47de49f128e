"""The ``spattn`` command line (typer)."""
