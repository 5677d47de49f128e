"""``CapturedAttention``: :func:`spattn.attention` recorded once in a CUDA graph, replayed per call.

A decode step's kernel is shorter than the host work of launching it from Python (Note [decode host cost] in
``impl/triton/_launch.py``); replaying a graph removes that host work. A graph reads and writes fixed
addresses, so the inputs are *buffers*: write the next query into ``captured.query`` (or pass it to the call,
which copies it there) and update the KV cache in place; the output tensor is the same one every replay.
"""

from __future__ import annotations

import torch

from spattn.layout.layout import Layout
from spattn.ops.attention.api import attention
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern


class CapturedAttention:
    """``spattn.attention(query, key, value, layout)`` captured in a ``torch.cuda.CUDAGraph`` (inference).

    Args:
        query: ``[B, H, Lq, D]`` CUDA buffer the graph reads (overwrite it in place, or pass new values to the
            call).
        key, value: ``[B, Hkv, Lk, D]`` / ``[B, Hkv, Lk, Dv]`` buffers the graph reads (a KV cache updated in
            place).
        layout_or_pattern: a :class:`Layout` for these shapes, or a Pattern: a static one is compiled here
            (before capture); a dynamic one (``static | TopK/TopP``) is built inside the graph by the cached
            ``LayoutBuilder`` of :func:`spattn.attention` (no host synchronisation), so each replay selects again
            from the buffers' current values.
        causal, scale, block_size, return_lse: as in :func:`spattn.attention`. backend: default ``"triton"``.
        warmup: eager calls before capture (default 2): they tune the kernels, check the banded path and cache the
            launch plan, none of which may run during capture.

    Calling it (optionally with a new query ``[B, H, Lq, D]``, copied into the buffer) replays the graph and
    returns the output buffer ``[B, H, Lq, Dv]`` (or ``(out, lse)``), overwritten by the next call: clone it to
    keep it.

    Example:
        >>> layout = spattn.compile(Sinks(64) | Window(4096), 1, cache_len, causal=True, device="cuda")
        >>> step = CapturedAttention(q_buf, k_cache, v_cache, layout, causal=True)
        >>> out = step(q_new)          # k_cache / v_cache written in place between steps
    """

    def __init__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 layout_or_pattern: Layout | Pattern, *, causal: bool = False, scale: float | None = None,
                 backend: str = "triton", return_lse: bool = False, block_size: int = 128, warmup: int = 2):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or not t.is_cuda:
                where = t.device if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"CapturedAttention needs CUDA tensors (CUDA graphs): {name} is on {where}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (eager calls before capture), got {warmup!r}")
        pattern = layout_or_pattern
        if isinstance(pattern, Pattern) and not pattern.contains_dynamic():
            B, H, Lq, _ = query.shape
            pattern = compile_pattern(pattern, Lq, key.shape[2], causal=causal, block_size=block_size, batch=B,
                                      heads=H, device=query.device)
        self.query, self.key, self.value, self.layout = query, key, value, pattern
        kwargs = dict(causal=causal, scale=scale, backend=backend, return_lse=return_lse, block_size=block_size)

        def step():
            return attention(self.query, self.key, self.value, self.layout, **kwargs)

        with torch.no_grad():
            side = torch.cuda.Stream(device=query.device)
            side.wait_stream(torch.cuda.current_stream(query.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    step()
            torch.cuda.current_stream(query.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph):
                    self.output = step()
            except RuntimeError as exc:
                raise RuntimeError(f"CapturedAttention: the attention call could not be captured in a CUDA graph "
                                   f"(a host synchronisation or an allocation it cannot record): {exc}") from exc

    def __call__(self, query: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if query is not None:
            if query.shape != self.query.shape:
                raise ValueError(f"query must have the captured shape {tuple(self.query.shape)}, "
                                 f"got {tuple(query.shape)}")
            self.query.copy_(query)
        self.graph.replay()
        return self.output
