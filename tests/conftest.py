import os

import pytest
import torch

# keep CI deterministic and bounded on 2 cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # under pytest-xdist each worker gets one thread, so two workers share the two cores
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
