"""The communication layer: torch.distributed functional collectives, with the bytes each rank sends counted.

Every byte spattn's distributed attention moves goes through :func:`all_to_all` (autograd-aware, uneven
splits along dim 0) or :func:`all_gather` (``funcol.all_gather_single``, no gradient: small metadata and key
summaries). Inside ``with count_bytes() as traffic:`` each call adds what *this rank sends to other ranks*
(what it keeps for itself is not traffic) to ``traffic``, tagged by a name and by phase: ``"forward"`` when
the call runs, ``"backward"`` when autograd runs the reverse all-to-all (counted from the gradient the
output receives). The cost model (:mod:`spattn.distributed.cost`) predicts the same numbers; the tests check
that the two agree.

Byte accounting (``W`` ranks, ``e`` bytes per element):

* all-to-all: ``sum(input_split_sizes[t] for t != rank) * row_elements * e`` forward, and the rows this rank
  received from others, ``sum(output_split_sizes[s] for s != rank) * row_elements * e``, backward;
* all-gather of a local tensor of ``n`` elements: ``(W - 1) * n * e`` (a ring or a flat all-gather sends the
  same amount per rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Traffic:
    """Bytes sent by this rank, per ``(phase, name)``: ``traffic.bytes[("forward", "kv")]``."""

    bytes: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def add(self, phase: str, name: str, count: int) -> None:
        key = (phase, name)
        self.bytes[key] = self.bytes.get(key, 0) + int(count)

    def total(self, phase: str | None = None) -> int:
        """Bytes sent in ``phase`` (``"forward"``, ``"backward"``) or in both (``None``)."""
        return sum(v for (p, _), v in self.bytes.items() if phase is None or p == phase)

    def by_name(self, phase: str) -> dict[str, int]:
        return {n: v for (p, n), v in self.bytes.items() if p == phase}


_ACTIVE: list[Traffic] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[Traffic]:
    """Count the bytes this rank sends through spattn's collectives inside the block (forward and backward).

    Example:
        >>> with count_bytes() as traffic:  # doctest: +SKIP
        ...     out = context_parallel_attention(q, k, v, pattern, sharding=sharding)
        ...     out.sum().backward()
        >>> traffic.total("forward"), traffic.total("backward")  # doctest: +SKIP
    """
    traffic = Traffic()
    _ACTIVE.append(traffic)
    try:
        yield traffic
    finally:
        _ACTIVE.remove(traffic)


def _record(phase: str, name: str, count: int) -> None:
    for traffic in _ACTIVE:
        traffic.add(phase, name, count)


def resolve_group(mesh_or_group=None) -> dist.ProcessGroup:
    """The process group of a 1-D ``DeviceMesh``, a ``ProcessGroup`` itself, or the default group (``None``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    if mesh_or_group is None:
        return dist.group.WORLD
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    get_group = getattr(mesh_or_group, "get_group", None)
    if get_group is None:
        raise TypeError(f"mesh must be a DeviceMesh, a ProcessGroup or None, got {type(mesh_or_group).__name__}")
    if mesh_or_group.ndim != 1:
        raise ValueError(f"mesh must be 1-D (the sequence-parallel dimension), got {mesh_or_group.ndim} dimensions")
    return get_group()


def all_to_all(
    tensor: torch.Tensor, output_split_sizes: Sequence[int], input_split_sizes: Sequence[int],
    group: dist.ProcessGroup, *, name: str,
) -> torch.Tensor:
    """Autograd-aware all-to-all along dim 0 with uneven splits (``funcol.all_to_all_single_autograd``).

    ``tensor [sum(input_split_sizes), ...]`` -> ``[sum(output_split_sizes), ...]``; rows
    ``input_split_sizes[t]`` go to rank ``t``, in rank order. The backward pass is the reverse all-to-all."""
    from torch.distributed import _functional_collectives as funcol

    rank = dist.get_rank(group)
    row = int(torch.Size(tensor.shape[1:]).numel()) * tensor.element_size()
    sent = sum(n for t, n in enumerate(input_split_sizes) if t != rank) * row
    received = sum(n for s, n in enumerate(output_split_sizes) if s != rank) * row
    _record("forward", name, sent)
    out = funcol.all_to_all_single_autograd(
        tensor.contiguous(), list(map(int, output_split_sizes)), list(map(int, input_split_sizes)), group
    )
    out = funcol.wait_tensor(out)
    if out.requires_grad and _ACTIVE:
        active = list(_ACTIVE)

        def _count_backward(grad: torch.Tensor) -> None:
            for traffic in active:
                traffic.add("backward", name, received)

        out.register_hook(_count_backward)
    return out


def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, *, name: str) -> torch.Tensor:
    """``[n, ...]`` on every rank -> ``[W * n, ...]`` in rank order (no gradient: metadata and summaries)."""
    from torch.distributed import _functional_collectives as funcol

    world = dist.get_world_size(group)
    _record("forward", name, (world - 1) * tensor.numel() * tensor.element_size())
    out = funcol.all_gather_single(tensor.detach().contiguous(), 0, group)
    return funcol.wait_tensor(out)
