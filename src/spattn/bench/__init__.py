"""Benchmarks: a registry of suites plus one driver; every suite returns the same JSON record.

Suites (``SUITES``): ``kernels`` (triton vs FlexAttention vs dense SDPA, GPU), ``selectors`` (dynamic
selection cost, speed and recall), ``coverage`` (the cost of ``coverage.measure``), ``reference`` (the CPU
reference backend). Each is a module with ``run(argv: list[str] | None) -> dict`` returning
``spattn.bench.record.make(...)``; drivers: ``python benchmarks/run.py SUITE`` and ``spattn bench``.
Shared parts: ``env.machine_info`` (machine, versions, commit, command), ``timing.median_ms`` (the one timer),
``record`` (the JSON record and its writer).
"""

from __future__ import annotations

import importlib

SUITES: dict[str, str] = {
    "kernels": "spattn.bench.kernels",
    "selectors": "spattn.bench.selection",
    "coverage": "spattn.bench.coverage_cost",
    "reference": "spattn.bench.reference",
}


def run_suite(name: str, argv: list[str] | None = None) -> dict:
    """Run suite ``name`` with its own command-line arguments ``argv``; returns its record."""
    if name not in SUITES:
        raise ValueError(f"unknown benchmark suite {name!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(SUITES[name]).run(argv)


__all__ = ["SUITES", "run_suite"]
