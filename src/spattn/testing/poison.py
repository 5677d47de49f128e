"""NaN poisoning: fresh uninitialised tensors are filled with NaN, so an output row a fast path forgets to
write fails the test instead of passing on leftover memory (as FLA's ``tests/conftest.py`` does)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_NAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fill(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in _NAN_DTYPES:
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poison_empty() -> Iterator[None]:
    """Within the block, floating ``torch.empty``, ``torch.empty_like`` and ``Tensor.new_empty`` return NaN-filled
    tensors (integer tensors are left alone)."""
    empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def p_empty(*args, **kwargs):
        return _fill(empty(*args, **kwargs))

    def p_empty_like(*args, **kwargs):
        return _fill(empty_like(*args, **kwargs))

    def p_new_empty(self, *args, **kwargs):
        return _fill(new_empty(self, *args, **kwargs))

    torch.empty, torch.empty_like, torch.Tensor.new_empty = p_empty, p_empty_like, p_new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = empty, empty_like, new_empty
