"""The one benchmark driver: ``python benchmarks/run.py SUITE [--out PATH] [--overwrite] [-- SUITE ARGS]``.

Suites are registered in ``spattn.bench.SUITES`` (kernels, selectors, coverage, reference); each returns the
same JSON record (suite, machine with versions and commit, config, rows). Without ``--out`` the record goes to
``./spattn-bench/SUITE.json``; committed files under ``benchmarks/results/`` are only replaced with
``--overwrite``. Run from the repository root with ``PYTHONPATH=src`` (or an installed spattn); ``python -P``
keeps this folder off ``sys.path``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from spattn.bench import SUITES, run_suite  # noqa: E402
from spattn.bench.record import write  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", choices=sorted(SUITES))
    ap.add_argument("--out", default=None, help="JSON path (default ./spattn-bench/SUITE.json)")
    ap.add_argument("--overwrite", action="store_true", help="allow replacing committed benchmarks/results files")
    args, unknown = ap.parse_known_args(own)
    path = args.out or os.path.join("spattn-bench", f"{args.suite}.json")
    record = run_suite(args.suite, unknown + rest)
    written = write(record, path, overwrite=args.overwrite)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
