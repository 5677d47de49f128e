"""Shared pieces of every selector: the ``Selector`` base, the registry, block visibility and pooling.

Notation: ``B`` batch, ``H`` query heads, ``Hkv`` key/value heads (``G = H // Hkv``), ``Lq``/``Lk`` lengths,
``bs`` block size, ``NQ = ceil(Lq / bs)``, ``NK = ceil(Lk / bs)``, ``off = Lk - Lq`` (query ``i`` sits at absolute
position ``i + off``). A selector maps (query, key) to *block scores* float ``[B, H, NQ, NK]``: an estimate of
the share of each query block's softmax mass that falls in each key block. Rows sum to 1 over the visible
key blocks; blocks entirely in the future (``causal``) score 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

_REGISTRY: dict[str, type[Selector]] = {}
_OPTIONS: dict[str, frozenset[str]] = {}  # option names per selector, read once (torch.compile cannot trace fields())


def register_selector(cls: type[Selector]) -> type[Selector]:
    """Make a selector class available by name (``get_selector("pooled")``)."""
    _REGISTRY[cls.name] = cls
    _OPTIONS[cls.name] = frozenset(f.name for f in dataclasses.fields(cls))
    return cls


def selector_names() -> list[str]:
    return sorted(_REGISTRY)


def get_selector(name: str | Selector, **options: Any) -> Selector:
    """A selector instance from its name and options, e.g. ``get_selector("antidiagonal", stride=16)``."""
    if isinstance(name, Selector):
        if options:
            return dataclasses.replace(name, **options)
        return name
    if not isinstance(name, str):
        raise TypeError(f"selector must be a name (str) or a Selector, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown selector {name!r}; known selectors: {selector_names()}")
    cls = _REGISTRY[name]
    fields = _OPTIONS[name]
    bad = set(options) - fields
    if bad:
        raise ValueError(f"selector {name!r} has no option(s) {sorted(bad)}; options: {sorted(fields)}")
    return cls(**options)


@dataclasses.dataclass(frozen=True)
class Selector:
    """Base class: ``scores`` (fast, on device, no host sync) and ``reference`` (float64, loops, small inputs)."""

    name: ClassVar[str] = "selector"

    def scores(self, query: torch.Tensor, key: torch.Tensor, *, block_size: int, causal: bool = False,
               scale: float | None = None, allowed: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[B, H, NQ, NK]`` estimated mass per block for query ``[B, H, Lq, D]``, key ``[B, Hkv, Lk, D]``.

        ``allowed`` (bool ``[Bs, Hs, NQ, NK]``, optional) restricts the blocks the scores are normalised over
        (e.g. the blocks of each document in a packed batch); the result is 0 outside it."""
        raise NotImplementedError

    def reference(self, query: torch.Tensor, key: torch.Tensor, *, block_size: int, causal: bool = False,
                  scale: float | None = None) -> torch.Tensor:
        """float64 ``[B, H, NQ, NK]``: the same quantity from its definition, with explicit loops."""
        raise NotImplementedError

    def options(self) -> tuple[tuple[str, Any], ...]:
        """Non-default options as sorted ``(name, value)`` pairs (JSON friendly)."""
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out.append((f.name, value))
        return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------- helpers
def check_qk(query: torch.Tensor, key: torch.Tensor, block_size: int) -> tuple[int, int, int, int, int, int]:
    """Validate and return ``B, H, Hkv, Lq, Lk, D``."""
    for name, t in (("query", query), ("key", key)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, L, D]")
    B, H, Lq, D = query.shape
    if key.shape[0] != B or key.shape[-1] != D:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query {tuple(query.shape)}")
    Hkv, Lk = key.shape[1], key.shape[2]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hkv})")
    if Lk < Lq:
        raise ValueError(f"key length ({Lk}) must be >= query length ({Lq})")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return B, H, Hkv, Lq, Lk, D


def reference_setup(query: torch.Tensor, key: torch.Tensor, block_size: int, scale: float | None):
    """What every selector's float64 ``reference()`` starts from: the checked shapes ``B, H, Hkv, Lq, Lk, D``, the
    scale, float64 copies ``q, k``, the GQA group ``G``, the bottom-right query offset ``off``, ``bs``, the block
    counts ``NQ, NK`` and a zero float64 output ``[B, H, NQ, NK]``, in that order."""
    B, H, Hkv, Lq, Lk, D = check_qk(query, key, block_size)
    NQ, NK = -(-Lq // block_size), -(-Lk // block_size)
    out = torch.zeros(B, H, NQ, NK, dtype=torch.float64)
    return (B, H, Hkv, Lq, Lk, D, default_scale(scale, D), query.double(), key.double(), H // Hkv, Lk - Lq,
            block_size, NQ, NK, out)


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def visible_blocks(q_len: int, kv_len: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """bool ``[NQ, NK]``: key blocks holding at least one key some query of the block may see."""
    NQ, NK = -(-q_len // block_size), -(-kv_len // block_size)
    if not causal:
        return torch.ones(NQ, NK, dtype=torch.bool, device=device)
    qhi = torch.clamp((torch.arange(NQ, device=device) + 1) * block_size, max=q_len) - 1 + (kv_len - q_len)
    klo = torch.arange(NK, device=device) * block_size
    return klo[None, :] <= qhi[:, None]


def block_sizes(length: int, block_size: int, device) -> torch.Tensor:
    """int64 ``[N]``: tokens in each block."""
    n = -(-length // block_size)
    return torch.clamp(length - torch.arange(n, device=device) * block_size, max=block_size)


def pool(x: torch.Tensor, block_size: int, reduce: str = "mean") -> torch.Tensor:
    """``[..., L, D]`` -> ``[..., N, D]`` mean / amax / amin over each block (partial last block handled)."""
    L = x.shape[-2]
    n = -(-L // block_size)
    pad = n * block_size - L
    if reduce == "mean":
        xp = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        xs = xp.unflatten(-2, (n, block_size)).sum(-2, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
        return xs / block_sizes(L, block_size, x.device).to(xs.dtype)[:, None]
    fill = -math.inf if reduce == "amax" else math.inf
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad), value=fill).unflatten(-2, (n, block_size))
    return xp.amax(-2) if reduce == "amax" else xp.amin(-2)


def kv_head_index(H: int, Hkv: int, device) -> torch.Tensor:
    """int64 ``[H]``: the key/value head each query head reads (GQA)."""
    return torch.arange(H, device=device) // (H // Hkv)


def group_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [B, H, M, D] @ b[B, Hkv, N, D]^T`` -> ``[B, H, M, N]`` without repeating ``b`` (GQA)."""
    B, H, M, D = a.shape
    Hkv = b.shape[1]
    G = H // Hkv
    out = a.reshape(B, Hkv, G * M, D) @ b.transpose(-1, -2)
    return out.view(B, H, M, b.shape[2])


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to ``visible`` (rows with nothing visible give 0, not NaN)."""
    logits = logits.masked_fill(~visible, -math.inf)
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)
    return e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def normalise(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Zero invisible cells and scale each row to sum to 1 (rows with nothing left stay 0)."""
    s = torch.where(visible, scores.clamp_min(0), torch.zeros_like(scores))
    return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)


def restrict(visible: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """``visible [NQ, NK]`` and an optional ``allowed`` bool ``[Bs, Hs, NQ, NK]`` (e.g. document blocks)."""
    return visible if allowed is None else visible & allowed


def matmul_dtype(query: torch.Tensor) -> torch.dtype:
    """Tensor-core dtype for score matmuls: the input's half type on CUDA, else float32."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    return torch.float32


def cell_pairs(q_len: int, kv_len: int, block_size: int, causal: bool, device) -> torch.Tensor:
    """float32 ``[NQ, NK]``: (query, key) pairs of each block a query may see (causal: ``j <= i + off``),
    so ``pairs / q_len`` summed over chosen blocks is the keys per query they add."""
    qn = block_sizes(q_len, block_size, device).float()
    kn = block_sizes(kv_len, block_size, device).float()
    pairs = qn[:, None] * kn[None, :]
    if not causal:
        return pairs
    off = kv_len - q_len
    i = torch.arange(q_len, device=device) + off  # absolute query positions
    klo = torch.arange(kn.shape[0], device=device) * block_size
    seen = (i[:, None] + 1 - klo[None, :]).clamp(min=0).float().clamp(max=kn[None, :])  # [Lq, NK] keys seen
    NQ = qn.shape[0]
    seen = torch.nn.functional.pad(seen, (0, 0, 0, NQ * block_size - q_len)).view(NQ, block_size, -1).sum(1)
    return seen
