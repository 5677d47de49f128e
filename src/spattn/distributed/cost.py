"""The communication cost model: bytes each rank sends per attention layer, per mode and pattern, and a
simulation of 8-1024 ranks at 128k-1M tokens.

The model counts exactly what :mod:`spattn.distributed.comm` sends (the tests check that the two agree).
Notation: ``W`` ranks, rank ``r`` holds ``L_r`` of ``L`` tokens, ``B`` batch, ``H`` / ``Hkv`` query /
key-value heads, ``D`` / ``Dv`` head dims, ``e`` bytes per element, ``bs`` block size, ``NK`` key blocks.

Head-parallel (per rank ``r``, ``hq = H / W``, ``hk`` key/value heads per rank, replicated when
``Hkv < W``)::

    forward   (W-1) L_r B (hq D + hk (D + Dv)) e       query, key/value to the head owners
            + (L - L_r) B hq Dv e                     output back to the row owners
    backward  (W-1) L_r B hq Dv e + (L - L_r) B (hq D + hk (D + Dv)) e      the reverse all-to-alls

Context-parallel (``need_t``: key blocks rank ``t``'s rows visit; ``own_r``: rank ``r``'s blocks)::

    forward   sum_{t != r} |need_t & own_r|_tokens B Hkv (D + Dv) e     key/value blocks to the ranks that visit them
            + (W-1) NK                                                   the need vectors (one byte per block)
            + (W-1) max_t |own_t| B Hkv S D e_s                          dynamic only: key summaries (S=1 sums in
                                                                         float32 for pooled, S=2 min/max for bounds)
    backward  |need_r & ~own_r|_tokens B Hkv (D + Dv) e                 key/value gradients back to their owners

With a window ``w`` and contiguous shards, ``need_t`` is ``t``'s blocks plus ``w / bs`` blocks before them;
dense causal attention needs every earlier block (an all-gather). For a dynamic pattern the selection is only
known at run time: :func:`layer_bytes` takes the compiled Layout of a run (exact), and :func:`simulate` uses
an expectation in which each query block picks ``k`` of its available blocks uniformly at random, once per
key/value head (independent selections are the worst case: real selections overlap between neighbouring
query blocks, so they move less).
"""

from __future__ import annotations

import math
import platform
import time

import torch

from spattn.distributed.head_parallel import kv_heads_for
from spattn.distributed.sharding import Sharding, balance
from spattn.layout import Layout
from spattn.patterns.base import Pattern
from spattn.patterns.compile import make_context

MODES = ("head", "context")
_EXACT_MAX_BLOCKS = 1 << 22  # below this many block pairs a static pattern is compiled (exact partial blocks)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def visited_matrix(pattern_or_layout: Pattern | Layout, seq_len: int, *, causal: bool, block_size: int) -> torch.Tensor:
    """bool ``[NQ, NK]``: blocks visited by any batch / head. A Layout gives its own; a static Pattern is
    compiled when small, else its analytic block status is used (partial blocks may be conservative)."""
    if isinstance(pattern_or_layout, Layout):
        return (pattern_or_layout.block_status() > 0).flatten(0, 1).any(0).cpu()
    if pattern_or_layout.contains_dynamic():
        raise ValueError("visited_matrix: a dynamic pattern's blocks are known only at run time: pass its Layout")
    NB = -(-seq_len // block_size)
    if NB * NB <= _EXACT_MAX_BLOCKS:
        from spattn.patterns.compile import compile as compile_pattern

        layout = compile_pattern(pattern_or_layout, seq_len, seq_len, causal=causal, block_size=block_size)
        return (layout.block_status() > 0).flatten(0, 1).any(0)
    full, ctx = make_context(pattern_or_layout, seq_len, seq_len, causal=causal, block_size=block_size, batch=None,
                             heads=None, device="cpu", query=None, key=None)
    return (full.status(ctx) > 0).flatten(0, 1).any(0)


def _block_lengths(sharding: Sharding) -> torch.Tensor:
    return torch.tensor([sharding.block_length(b) for b in range(sharding.num_blocks)], dtype=torch.float64)


def _need_tokens(visited: torch.Tensor, sharding: Sharding) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``[W]`` tokens each rank sends and receives for the key/value exchange."""
    W = sharding.world_size
    lengths = _block_lengths(sharding)
    owner = sharding.owner()
    send = torch.zeros(W, dtype=torch.float64)
    recv = torch.zeros(W, dtype=torch.float64)
    for t, rows in enumerate(sharding.blocks):
        need = visited[list(rows)].any(0).clone()
        need[list(rows)] = False
        send.index_add_(0, owner[need], lengths[need])
        recv[t] = lengths[need].sum()
    return send, recv


def _expected_need_tokens(static: torch.Tensor, sharding: Sharding, *, causal: bool, blocks: int,
                          selections: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`_need_tokens` for ``static | TopK(blocks)``, in expectation over uniform random selections."""
    W, NB = sharding.world_size, sharding.num_blocks
    lengths = _block_lengths(sharding)
    owner = sharding.owner()
    send = torch.zeros(W, dtype=torch.float64)
    recv = torch.zeros(W, dtype=torch.float64)
    cols = torch.arange(NB)
    for t, rows in enumerate(sharding.blocks):
        rows_t = torch.tensor(rows)
        visible = (cols[None, :] <= rows_t[:, None]) if causal else torch.ones(len(rows), NB, dtype=torch.bool)
        avail = visible & ~static[rows_t]
        n = avail.sum(1).double()
        p = torch.where(n > 0, torch.clamp(blocks / n.clamp_min(1), max=1.0), torch.zeros_like(n))
        log_miss = torch.where(p < 1, torch.log1p(-p), torch.full_like(p, -math.inf))
        miss = (avail.double() * log_miss[:, None]).nan_to_num(0.0, neginf=-math.inf).sum(0) * selections
        prob = torch.where(static[rows_t].any(0), torch.ones(NB, dtype=torch.float64), 1 - torch.exp(miss))
        prob[rows_t] = 0.0  # own blocks do not move
        send.index_add_(0, owner, prob * lengths)
        recv[t] = (prob * lengths).sum()
    return send, recv


def layer_bytes(
    pattern_or_layout: Pattern | Layout | None,
    seq_len: int,
    *,
    world_size: int,
    mode: str,
    heads: int,
    kv_heads: int,
    head_dim: int,
    value_dim: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 128,
    causal: bool = True,
    sharding: Sharding | None = None,
    summary: str | None = None,
    return_lse: bool = False,
    expected_blocks: int | None = None,
) -> dict:
    """Bytes each rank sends in one attention layer: ``{"forward": [W], "backward": [W], "parts": {...}}``.

    Args:
        pattern_or_layout: a static Pattern, the whole-sequence Layout of a run (exact for dynamic patterns), or
            (``mode="context"`` with ``expected_blocks``) the static safeguards of ``static | TopK(expected_blocks)``.
        seq_len: ``L`` tokens; ``world_size``: ``W`` ranks; ``mode``: ``"head"`` or ``"context"``.
        heads, kv_heads, head_dim, value_dim (default head_dim), batch, dtype: the layer's shape.
        sharding: the rows of each rank (default: :meth:`Sharding.balanced` on the pattern for context,
            :meth:`Sharding.contiguous` for head). Calls made without ``sharding=`` also all-gather the local
            lengths, ``8 (W - 1)`` bytes per rank, which this model does not count.
        summary: ``"pooled"`` or ``"bounds"`` when the pattern's selection runs from key summaries (context).
        return_lse: the head-parallel call also returns the log-sum-exp.
        expected_blocks: model a dynamic ``TopK``/``TopP`` choosing this many blocks per query block.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    Dv = head_dim if value_dim is None else value_dim
    W = world_size
    if sharding is None:
        if mode == "context" and pattern_or_layout is not None and expected_blocks is None:
            if isinstance(pattern_or_layout, Layout):
                sharding = Sharding.balanced(pattern_or_layout, world_size=W)
            else:
                sharding = Sharding.balanced(pattern_or_layout, seq_len, world_size=W, causal=causal,
                                             block_size=block_size)
        else:
            sharding = Sharding.contiguous(seq_len, W, block_size=block_size)
    visited = None
    if mode == "context":
        if pattern_or_layout is None:  # dense
            from spattn.patterns.builtin import Full

            pattern_or_layout = Full()
        visited = visited_matrix(pattern_or_layout, seq_len, causal=causal, block_size=sharding.block_size)
    return _bytes(mode, visited, sharding, heads=heads, kv_heads=kv_heads, head_dim=head_dim, value_dim=Dv,
                  batch=batch, dtype=dtype, causal=causal, summary=summary, return_lse=return_lse,
                  expected_blocks=expected_blocks)


def _bytes(mode, visited, sharding, *, heads, kv_heads, head_dim, value_dim, batch, dtype, causal, summary,
           return_lse, expected_blocks) -> dict:
    Dv, e = value_dim, _dtype_bytes(dtype)
    B, H, Hkv, D, W = batch, heads, kv_heads, head_dim, sharding.world_size
    lengths = torch.tensor(sharding.lengths(), dtype=torch.float64)
    L = float(sharding.seq_len)
    parts: dict[str, dict[str, list[float]]] = {}
    if mode == "head":
        hq, hk = H // W, len(kv_heads_for(0, W, H, Hkv))
        parts["query"] = {"forward": (W - 1) * lengths * B * hq * D * e, "backward": (L - lengths) * B * hq * D * e}
        parts["key_value"] = {"forward": (W - 1) * lengths * B * hk * (D + Dv) * e,
                              "backward": (L - lengths) * B * hk * (D + Dv) * e}
        parts["output"] = {"forward": (L - lengths) * B * hq * Dv * e, "backward": (W - 1) * lengths * B * hq * Dv * e}
        if return_lse:
            parts["lse"] = {"forward": (L - lengths) * B * hq * 4, "backward": (W - 1) * lengths * B * hq * 4}
    else:
        NB = sharding.num_blocks
        if expected_blocks is None:
            send, recv = _need_tokens(visited, sharding)
        else:
            send, recv = _expected_need_tokens(visited, sharding, causal=causal, blocks=expected_blocks,
                                               selections=B * Hkv)
        row = B * Hkv * (D + Dv) * e
        parts["key_value"] = {"forward": send * row, "backward": recv * row}
        parts["needed_blocks"] = {"forward": torch.full((W,), float((W - 1) * NB)), "backward": torch.zeros(W)}
        if summary is not None:
            S, es = (1, 8 if dtype == torch.float64 else 4) if summary == "pooled" else (2, e)
            most = max(len(b) for b in sharding.blocks)
            parts["key_summaries"] = {"forward": torch.full((W,), float((W - 1) * most * B * Hkv * S * D * es)),
                                      "backward": torch.zeros(W)}
    out = {"forward": torch.zeros(W, dtype=torch.float64), "backward": torch.zeros(W, dtype=torch.float64)}
    for p in parts.values():
        for phase in out:
            out[phase] = out[phase] + torch.as_tensor(p[phase], dtype=torch.float64)
    return {
        "forward": out["forward"].tolist(),
        "backward": out["backward"].tolist(),
        "parts": {n: {ph: torch.as_tensor(v, dtype=torch.float64).tolist() for ph, v in p.items()}
                  for n, p in parts.items()},
    }


def simulate(
    seq_lens=(131072, 262144, 524288, 1048576),
    world_sizes=(8, 16, 32, 64, 128, 256, 512, 1024),
    *,
    heads: int = 32,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    block_size: int = 128,
    sinks: int = 64,
    window: int = 4096,
    dynamic_blocks: int = 16,
) -> dict:
    """Bytes per rank per layer (forward, and forward + backward) for causal ``Sinks | Window``, dynamic
    ``Sinks | Window | TopK(dynamic_blocks)`` (uniform-random expectation) and dense causal attention, in both
    modes, for every ``(L, W)``. Head-parallel needs ``W <= heads`` (rows past it say so). Returns JSON-ready
    ``{"config", "rows", "seconds"}``; each row has the max and mean over ranks."""
    from spattn.patterns.builtin import Causal, Sinks, Window

    start = time.perf_counter()
    shape = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, value_dim=head_dim, batch=1, dtype=dtype,
                 causal=True, return_lse=False)
    static = Sinks(sinks) | Window(window)
    rows = []
    for L in seq_lens:
        windowed = visited_matrix(static, L, causal=True, block_size=block_size)
        dense = visited_matrix(Causal(), L, causal=True, block_size=block_size)
        costs_window = windowed.sum(1).double()
        for W in world_sizes:
            for name in ("window", "dynamic", "dense"):
                for mode in MODES:
                    row = {"seq_len": L, "world_size": W, "pattern": name, "mode": mode}
                    if mode == "head" and (heads % W or (kv_heads % W and (heads // kv_heads) % (heads // W))):
                        row["note"] = f"head-parallel needs the ranks to divide the {heads} heads"
                        rows.append(row)
                        continue
                    if mode == "head":
                        sharding = Sharding.contiguous(L, W, block_size=block_size)
                        got = _bytes("head", None, sharding, summary=None, expected_blocks=None, **shape)
                    elif name == "window":
                        sharding = Sharding(L, block_size, balance(costs_window, W))
                        got = _bytes("context", windowed, sharding, summary=None, expected_blocks=None, **shape)
                    elif name == "dense":
                        sharding = Sharding(L, block_size, balance(dense.sum(1).double(), W))
                        got = _bytes("context", dense, sharding, summary=None, expected_blocks=None, **shape)
                    else:
                        costs = costs_window + torch.minimum(dense.sum(1).double() - costs_window,
                                                             torch.tensor(float(dynamic_blocks)))
                        sharding = Sharding(L, block_size, balance(costs, W))
                        got = _bytes("context", windowed, sharding, summary="pooled",
                                     expected_blocks=dynamic_blocks, **shape)
                    fwd = torch.tensor(got["forward"])
                    both = fwd + torch.tensor(got["backward"])
                    row.update({"forward_max_bytes": float(fwd.max()), "forward_mean_bytes": float(fwd.mean()),
                                "fwd_bwd_max_bytes": float(both.max()), "fwd_bwd_mean_bytes": float(both.mean())})
                    rows.append(row)
    return {
        "config": {**{k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in shape.items()},
                   "block_size": block_size,
                   "window_pattern": repr(static), "dynamic_pattern": f"{static!r} | TopK(pooled, {dynamic_blocks})",
                   "dense_pattern": "Causal()", "causal": True, "load_balance": "spattn.distributed.balance",
                   "machine": platform.node(), "torch": torch.__version__},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
