import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# keep CI deterministic and bounded on 2 cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests never write into the user's cache: they use a temporary one (``SPATTN_CACHE``), removed at the end, unless
# told otherwise with ``SPATTN_TEST_CACHE=<folder>`` (kept). The temporary cache is seeded read-only from the
# user's cache so that prepared corpora and the converted model are not rebuilt: small files are copied, large
# ones (model weights) linked; every writer in spattn replaces files (os.replace), so a link is never written
# through.
_LINK_BYTES = 1 << 24


def _seed(source: Path, target: Path) -> None:
    if not source.is_dir():
        return
    for path in source.rglob("*"):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        elif path.is_file() and not path.name.endswith((".lock", ".tmp")):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if path.stat().st_size >= _LINK_BYTES:
                dest.symlink_to(path.resolve())
            else:
                shutil.copy2(path, dest)


def pytest_configure(config):
    # under pytest-xdist each worker gets one thread, so two workers share the two cores
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    chosen = os.environ.get("SPATTN_TEST_CACHE")
    if not chosen:  # the controller (or a plain run) makes it; xdist workers inherit the variable
        user = Path(os.environ.get("SPATTN_CACHE") or Path.home() / ".cache" / "spattn").expanduser()
        chosen = tempfile.mkdtemp(prefix="spattn-test-cache-")
        _seed(user, Path(chosen))
        os.environ["SPATTN_TEST_CACHE"] = chosen
        config._spattn_temporary_cache = chosen
    os.environ["SPATTN_CACHE"] = chosen


def pytest_unconfigure(config):
    temporary = getattr(config, "_spattn_temporary_cache", None)
    if temporary:
        shutil.rmtree(temporary, ignore_errors=True)
        os.environ.pop("SPATTN_TEST_CACHE", None)


@pytest.fixture(autouse=True)
def _seed_rng():
    torch.manual_seed(0)
