"""``measure``: how much of the dense attention a sparse layout keeps, computed blockwise.

One streaming pass over query chunks x key chunks (never an Lq x Lk tensor). For each query row it keeps,
with one running max ``m`` shared by both sums (online softmax):

* ``S = sum_j exp(s_j - m)`` over the keys the dense reference may see (all keys, or ``j <= i + offset``
  when ``causal``), and ``K`` the same sum restricted to the keys the layout keeps; ``recall = K / S``;
* with ``value``: the dense and the sparse output accumulators (``o = acc_dense / S``, ``o~ = acc_kept / K``);
* with ``topk``: a running top-k of dense scores with a flag "kept by the layout", merged chunk by chunk.

KL(p_sparse || p_dense), with p_sparse the renormalised restriction of p_dense to the kept keys, is exactly
``-log(recall)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from spattn._checks import check_int
from spattn.layout import tables
from spattn.layout.dense import expand
from spattn.layout.layout import Layout
from spattn.patterns.base import Pattern
from spattn.patterns.compile import compile as compile_pattern

_CPU_ELEMENTS = 1 << 24
_GPU_ELEMENTS = 1 << 28


@dataclasses.dataclass(eq=False)
class CoverageReport:
    """What a sparse layout keeps of the dense attention, per batch, head and query.

    Tensors are float64 for float64 inputs, else float32.

    Attributes:
        recall: [B, H, Lq] — fraction of the dense softmax mass on kept keys, in [0, 1]. Rows the
            dense reference itself leaves empty (causal with q_len > kv_len) read 1.
        kl: [B, H, Lq] — KL(p_sparse || p_dense) = -log(recall); ``inf`` where the layout keeps no key
            of a row (recall 0), 0 for rows the dense reference leaves empty. Never NaN.
        topk_overlap: [B, H, Lq] or None — fraction of the dense top-k keys (k = min(topk, keys the
            row may see)) that the layout keeps; 1 for empty dense rows.
        output_error: [B, H] or None (no ``value``) — ||o_sparse - o_dense||_F / ||o_dense||_F over
            [Lq, D] per head (sparse rows with nothing kept output 0, like ``spattn.attention``).
        output_abs_error: [B, H, Lq] or None — ||o_sparse - o_dense|| per query (bounded by
            2 (1 - recall) max_j ||v_j||).
        lse: [B, H, Lq] — dense log-sum-exp of the scaled scores (natural log, -inf for empty rows).
        density: the layout's :meth:`spattn.Layout.density` (kept pairs / the pairs dense attention computes,
            causal ones when causal, averaged over batch and heads).
        topk: the k asked for (0 when not measured).
        causal: whether the dense reference was causal.
        nonfinite_rows: how many (batch, head, query) rows met a non-finite input: a non-finite query, or a
            non-finite key / value entry among the keys the dense reference sees. Every per-query metric of
            such a row is NaN (and so is ``output_error`` of its head); summaries reduce over the other rows.
    """

    recall: torch.Tensor
    kl: torch.Tensor
    topk_overlap: torch.Tensor | None
    output_error: torch.Tensor | None
    output_abs_error: torch.Tensor | None
    lse: torch.Tensor
    density: float
    topk: int
    causal: bool
    nonfinite_rows: int = 0

    def metrics(self) -> dict[str, torch.Tensor]:
        """Per-query metrics by name: ``recall``, ``kl`` and (when measured) ``topk_overlap``."""
        out = {"recall": self.recall, "kl": self.kl}
        if self.topk_overlap is not None:
            out["topk_overlap"] = self.topk_overlap
        return out

    def per_head(self, metric: str = "recall", reduction: str = "mean") -> torch.Tensor:
        """float64 [H]: ``metric`` reduced over batch and queries (``mean``, ``p5`` or ``min``).

        ``metric="output_error"`` gives the mean over batch of the per-head relative output error.
        """
        if metric == "output_error":
            if self.output_error is None:
                raise ValueError("output_error was not measured: pass value= to measure()")
            return self.output_error.double().mean(0)
        values = self.metrics().get(metric)
        if values is None:
            raise ValueError(f"metric must be one of {sorted(self.metrics())} or 'output_error', got {metric!r}")
        flat = values.double().transpose(0, 1).flatten(1)
        return _reduce(flat, reduction)

    def summary(self) -> dict[str, Any]:
        """Plain-Python summary (JSON-ready): per head and overall mean, 5th percentile and minimum of each
        per-query metric, the per-head output error when measured, and the density."""
        out: dict[str, Any] = {"density": self.density, "topk": self.topk, "causal": self.causal,
                               "nonfinite_rows": self.nonfinite_rows, "overall": {}, "per_head": {}}
        for name, values in self.metrics().items():
            flat = values.double().flatten()[None]
            out["overall"][name] = {r: float(_reduce(flat, r)[0]) for r in ("mean", "p5", "min")}
            out["per_head"][name] = {r: self.per_head(name, r).tolist() for r in ("mean", "p5", "min")}
        if self.output_error is not None:
            err = self.output_error.double()
            finite = err[~torch.isnan(err)]
            out["overall"]["output_error"] = ({"mean": float(finite.mean()), "max": float(finite.max())}
                                              if finite.numel() else {"mean": math.nan, "max": math.nan})
            out["per_head"]["output_error"] = err.mean(0).tolist()
        return out

    def __repr__(self) -> str:
        B, H, Lq = self.recall.shape
        s = self.summary()["overall"]
        parts = [f"recall mean {s['recall']['mean']:.4f} p5 {s['recall']['p5']:.4f} min {s['recall']['min']:.4f}"]
        if "topk_overlap" in s:
            parts.append(f"top{self.topk} overlap {s['topk_overlap']['mean']:.4f}")
        if "output_error" in s:
            parts.append(f"output error {s['output_error']['mean']:.4g}")
        if self.nonfinite_rows:
            parts.append(f"{self.nonfinite_rows} non-finite rows (NaN metrics, left out of the summary)")
        return f"CoverageReport(B={B}, H={H}, Lq={Lq}, density={self.density:.4f}, " + ", ".join(parts) + ")"


def _reduce(flat: torch.Tensor, reduction: str) -> torch.Tensor:
    # flat: [N, n] float64 -> [N]; inf is allowed (kl); NaN marks a non-finite row: left out, NaN when all are
    valid = ~torch.isnan(flat)
    count = valid.sum(-1)
    nan = torch.full((), math.nan, dtype=flat.dtype, device=flat.device)
    if reduction == "mean":
        out = torch.where(valid, flat, 0.0).sum(-1) / count.clamp(min=1)
    elif reduction == "min":
        out = torch.where(valid, flat, math.inf).amin(-1)
    elif reduction == "p5":
        k = torch.clamp(torch.ceil(0.05 * count).long(), min=1)  # nearest-rank 5th percentile of the valid rows
        ordered = flat.sort(-1).values  # NaN sorts last
        out = ordered.gather(-1, (k - 1).clamp(max=flat.shape[-1] - 1)[:, None])[:, 0]
    else:
        raise ValueError(f"reduction must be 'mean', 'p5' or 'min', got {reduction!r}")
    return torch.where(count > 0, out, nan)


def check_qk(query: torch.Tensor, key: torch.Tensor,
              value: torch.Tensor | None = None) -> tuple[int, int, int, int, int]:
    if not isinstance(query, torch.Tensor) or query.dim() != 4:
        raise ValueError(f"query must be a [B, H, Lq, D] tensor, got {getattr(query, 'shape', type(query))}")
    if not isinstance(key, torch.Tensor) or key.dim() != 4:
        raise ValueError(f"key must be a [B, Hkv, Lk, D] tensor, got {getattr(key, 'shape', type(key))}")
    B, H, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    if Bk != B or Dk != D:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"key heads ({Hkv}) must divide query heads ({H})")
    if D == 0:
        raise ValueError(f"query/key head dim D must be >= 1, got query shape {tuple(query.shape)}")
    if key.device != query.device:
        raise ValueError(f"key is on {key.device}, query on {query.device}")
    if value is not None:
        if not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[:3] != key.shape[:3]:
            raise ValueError(
                f"value must be [B, Hkv, Lk, Dv] matching key {tuple(key.shape[:3])}, "
                f"got {getattr(value, 'shape', None)}"
            )
        if value.device != query.device:
            raise ValueError(f"value is on {value.device}, query on {query.device}")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"query and key lengths must be positive, got {Lq} and {Lk}")
    return B, H, Hkv, Lq, Lk


def chunk_tokens(chunk: int | None, batch_heads: int, block_size: int, device: torch.device) -> int:
    """Tokens per query/key chunk: ``chunk`` rounded down to ``block_size`` (at least one block), or by default
    so that one score tile holds about 2^24 (CPU) or 2^28 (GPU) elements."""
    if chunk is None:
        budget = _GPU_ELEMENTS if device.type == "cuda" else _CPU_ELEMENTS
        chunk = int(math.isqrt(max(1, budget // max(1, batch_heads))))
    else:
        check_int(chunk, "chunk", 1)
    return max(block_size, chunk // block_size * block_size)


def as_layout(layout_or_pattern: Any, q_len: int, kv_len: int, *, causal: bool, batch: int, heads: int,
              device: torch.device, query: torch.Tensor | None = None, key: torch.Tensor | None = None,
              block_size: int | None = None) -> Layout:
    """A Layout as is (validated against the lengths), or a pattern compiled with ``spattn.compile``."""
    if isinstance(layout_or_pattern, Layout):
        lay = layout_or_pattern
        if lay.q_len != q_len or lay.kv_len != kv_len:
            raise ValueError(
                f"layout is for q_len={lay.q_len}, kv_len={lay.kv_len} but the inputs have {q_len}, {kv_len}"
            )
        if lay.batch not in (1, batch) or lay.heads not in (1, heads):
            raise ValueError(
                f"layout tables have batch={lay.batch}, heads={lay.heads}; expected 1 or {batch} / 1 or {heads}"
            )
        return lay.to(device) if lay.device != device else lay
    if not isinstance(layout_or_pattern, Pattern):
        raise TypeError(
            f"layout_or_pattern must be a spattn.Layout or a pattern, got {type(layout_or_pattern).__name__}"
        )
    kwargs: dict[str, Any] = dict(causal=causal, batch=batch, heads=heads, device=device, query=query, key=key)
    if block_size is not None:
        kwargs["block_size"] = block_size
    return compile_pattern(layout_or_pattern, q_len, kv_len, **kwargs)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def measure(
    query: torch.Tensor,
    key: torch.Tensor,
    layout_or_pattern: Any,
    *,
    value: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    topk: int = 16,
    chunk: int | None = None,
    block_size: int | None = None,
    backend: str = "auto",
) -> CoverageReport:
    """Measure how much of the dense attention a sparse layout keeps, blockwise (never an Lq x Lk tensor).

    Args:
        query: [B, H, Lq, D].
        key: [B, Hkv, Lk, D], Hkv divides H (GQA: query head h reads key head h // (H // Hkv)).
        layout_or_pattern: a :class:`spattn.Layout` for (Lq, Lk) (batch/heads 1 or B/H; dynamic layouts
            welcome), or a pattern, compiled with ``spattn.compile(..., query=query, key=key)``.
        value: optional [B, Hkv, Lk, Dv]; adds ``output_error`` and ``output_abs_error``.
        causal: compare against causal dense attention (queries aligned bottom-right: query i sits at
            position i + Lk - Lq); the layout's kept keys are also restricted to the causal ones.
        scale: score scale, default 1/sqrt(D).
        topk: k of the top-k overlap (0 to skip it). Default 16.
        chunk: tokens per query and key chunk (rounded to the layout block size); default: about 2^24
            score elements per tile on CPU, 2^28 on GPU.
        block_size: block size when compiling a pattern (default: spattn.compile's).
        backend: ``"auto"`` (default: the Triton pass on CUDA when ``topk == 0`` and the kernel takes the inputs,
            else torch), ``"torch"`` (the chunked torch pass, the reference) or ``"triton"``
            (``spattn.coverage.kernel``: recall, KL, lse and the output errors in one fused pass; no top-k;
            CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``). A named backend never falls back.

    Returns:
        :class:`CoverageReport`.

    Example:
        >>> import torch, spattn
        >>> q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
        >>> report = spattn.coverage.measure(q, k, spattn.Sinks(4) | spattn.Window(64), causal=True)
        >>> report.recall.shape
        torch.Size([1, 2, 256])
    """
    B, H, Hkv, Lq, Lk = check_qk(query, key, value)
    check_int(topk, "topk", 0)
    dev = query.device
    layout = as_layout(layout_or_pattern, Lq, Lk, causal=causal, batch=B, heads=H, device=dev,
                       query=query, key=key, block_size=block_size)
    bs = layout.block_size
    chunk = chunk_tokens(chunk, B * H, bs, dev)
    G = H // Hkv
    D = query.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    cdt = compute_dtype(query)
    offset = Lk - Lq
    tiles = tables.tiles(layout.masks)
    query, key, value, bad_rows = _split_nonfinite(query, key, value, causal, G)
    if _use_kernel(backend, query, topk, bs):
        from spattn.coverage.kernel import coverage_sums

        _, slot = tables.unpack(layout)
        (m, S, K), outs = coverage_sums(query, key, value, slot, tiles, block_size=bs, causal=causal, scale=scale)
        o_d, o_s = (outs[0].to(cdt), outs[1].to(cdt)) if outs is not None else (None, None)
        recall, kl, lse, abs_err, sq_err, sq_ref = _row_metrics(m.to(cdt), S.to(cdt), K.to(cdt), o_d, o_s)
        return _report(recall, kl, lse, None, abs_err, sq_err, sq_ref, bad_rows, layout, 0, causal)
    k_all = key.to(cdt)
    v_all = value.to(cdt) if value is not None else None
    Dv = value.shape[-1] if value is not None else 0

    recall = torch.empty(B, H, Lq, dtype=cdt, device=dev)
    kl = torch.empty_like(recall)
    lse = torch.empty_like(recall)
    overlap = torch.empty_like(recall) if topk else None
    abs_err = torch.empty_like(recall) if value is not None else None
    sq_err = torch.zeros(B, H, dtype=torch.float64, device=dev) if value is not None else None
    sq_ref = torch.zeros_like(sq_err) if value is not None else None
    for i0 in range(0, Lq, chunk):
        i1 = min(Lq, i0 + chunk)
        cq = i1 - i0
        status, slot = tables.unpack(layout, i0 // bs, (i1 - 1) // bs + 1)  # [Bl, Hl, n, NK]
        q = (query[:, :, i0:i1].to(cdt) * scale).view(B, Hkv, G, cq, D)
        m = torch.full((B, H, cq), -math.inf, dtype=cdt, device=dev)
        S = torch.zeros_like(m)
        K = torch.zeros_like(m)
        acc_d = torch.zeros(B, H, cq, Dv, dtype=cdt, device=dev) if value is not None else None
        acc_s = torch.zeros_like(acc_d) if value is not None else None
        top_v = torch.full((B, H, cq, topk), -math.inf, dtype=cdt, device=dev) if topk else None
        top_f = torch.zeros(B, H, cq, topk, dtype=torch.bool, device=dev) if topk else None
        last_pos = i1 - 1 + offset
        for j0 in range(0, Lk, chunk):
            if causal and j0 > last_pos:
                break  # every later key is in the future of every query of this chunk
            j1 = min(Lk, j0 + chunk)
            ck = j1 - j0
            s = torch.matmul(q, k_all[:, :, None, j0:j1].transpose(-1, -2)).view(B, H, cq, ck)
            cols = slice(j0 // bs, (j1 - 1) // bs + 1)
            kept: torch.Tensor | bool  # True / False: the layout keeps every / no key of the tile
            if bool((status[..., cols] == tables.EMPTY).all()):
                kept = False
            elif bool((status[..., cols] == tables.FULL).all()):
                kept = True
            else:
                kept = expand(slot[..., cols], tiles)[:, :, :cq, :ck]
            if causal and j1 - 1 > i0 + offset:  # the chunk crosses the diagonal
                qi = torch.arange(i0, i1, device=dev)[:, None] + offset
                kj = torch.arange(j0, j1, device=dev)[None, :]
                allowed = kj <= qi
                s = s.masked_fill(~allowed, -math.inf)
                if isinstance(kept, torch.Tensor):
                    kept = kept & allowed  # (kept=True needs nothing: disallowed keys get p = 0)
            if topk:  # running top-k of dense scores with a "kept" flag: chunk top-k, then merge
                cv, ci = s.topk(min(topk, ck), dim=-1)
                if isinstance(kept, torch.Tensor):
                    cf = kept.expand(B, H, cq, ck).gather(-1, ci)
                else:
                    cf = torch.full(ci.shape, kept, dtype=torch.bool, device=dev)
                top_v, idx = torch.cat([top_v, cv], -1).topk(topk, dim=-1)
                top_f = torch.cat([top_f, cf], -1).gather(-1, idx)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            alpha = torch.exp(m - m_safe)
            p = s.sub_(m_safe[..., None]).exp_()  # in place: s is not needed any more
            p_sum = p.sum(-1)
            S = S * alpha + p_sum
            if kept is True:
                K = K * alpha + p_sum  # the same numbers as S: recall is exactly 1 where everything is kept
            elif kept is False:
                K = K * alpha
            else:
                pk = torch.where(kept, p, torch.zeros((), dtype=cdt, device=dev))
                K = K * alpha + pk.sum(-1)
            if value is not None:
                v = v_all[:, :, None, j0:j1]
                pv = torch.matmul(p.view(B, Hkv, G, cq, ck), v).view(B, H, cq, Dv)
                acc_d = acc_d * alpha[..., None] + pv
                acc_s = acc_s * alpha[..., None]
                if kept is True:
                    acc_s = acc_s + pv
                elif kept is not False:
                    acc_s = acc_s + torch.matmul(pk.view(B, Hkv, G, cq, ck), v).view(B, H, cq, Dv)
            m = m_new
        one = torch.ones_like(S)
        o_d = acc_d / torch.where(S > 0, S, one)[..., None] if value is not None else None
        o_s = acc_s / torch.where(K > 0, K, one)[..., None] if value is not None else None
        r, k_l, ls, ae, se, sr = _row_metrics(m, S, K, o_d, o_s)
        recall[:, :, i0:i1], kl[:, :, i0:i1], lse[:, :, i0:i1] = r, k_l, ls
        if topk:
            finite = torch.isfinite(top_v)
            n = finite.sum(-1)
            hit = (top_f & finite).sum(-1)
            overlap[:, :, i0:i1] = torch.where(n > 0, hit / n.clamp(min=1), torch.ones_like(S))
        if value is not None:
            abs_err[:, :, i0:i1] = ae
            sq_err += se
            sq_ref += sr
    return _report(recall, kl, lse, overlap, abs_err, sq_err, sq_ref, bad_rows, layout, topk, causal)


def _use_kernel(backend: str, query: torch.Tensor, topk: int, block_size: int) -> bool:
    """Whether ``measure`` takes the Triton pass (see its ``backend`` argument)."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return False
    import importlib.util
    import os

    reason = None
    if importlib.util.find_spec("triton") is None:
        reason = "triton is not installed (pip install 'spattn[gpu]')"
    elif query.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        reason = f"the Triton pass needs CUDA tensors (query is on {query.device.type})"
    elif topk:
        reason = f"the Triton pass does not compute the top-k overlap: pass topk=0 (got topk={topk})"
    else:
        from spattn.coverage.kernel import supports

        reason = supports(query, block_size)
    if reason is not None and backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    return reason is None


def _row_metrics(m, S, K, o_d, o_s):
    """(recall, kl, lse ``[B, H, n]``; abs error ``[B, H, n]``, squared error and squared reference sums
    float64 ``[B, H]``, or None without values) from the running max and the dense / kept sums of ``n`` rows and,
    with values, the dense and sparse outputs ``[B, H, n, Dv]``."""
    nonempty = S > 0
    one = torch.ones_like(S)
    r = torch.where(nonempty, K / torch.where(nonempty, S, one), one).clamp(max=1.0)
    kl = torch.where(r > 0, -torch.log(torch.where(r > 0, r, one)), torch.full_like(r, math.inf))
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, S, one)), torch.full_like(S, -math.inf))
    if o_d is None:
        return r, kl, lse, None, None, None
    diff = (o_s - o_d).double()
    return (r, kl, lse, diff.norm(dim=-1).to(S.dtype), diff.square().sum((-1, -2)),
            o_d.double().square().sum((-1, -2)))


def _report(recall, kl, lse, overlap, abs_err, sq_err, sq_ref, bad_rows, layout, topk, causal) -> CoverageReport:
    output_error = None
    if sq_err is not None:
        ratio = (sq_err / torch.where(sq_ref > 0, sq_ref, torch.ones_like(sq_ref))).sqrt()
        no_ref = torch.where(sq_err > 0, torch.full_like(sq_err, math.inf), torch.zeros_like(sq_err))
        output_error = torch.where(sq_ref > 0, ratio, no_ref).to(recall.dtype)
    nonfinite = 0
    if bad_rows is not None:  # Note [non-finite coverage]: NaN for those rows, never "perfect"
        nonfinite = int(bad_rows.sum())
        for t in (recall, kl, lse, overlap, abs_err):
            if t is not None:
                t.masked_fill_(bad_rows, math.nan)
        if output_error is not None:
            output_error = output_error.masked_fill(bad_rows.any(-1), math.nan)
    return CoverageReport(
        recall=recall, kl=kl, topk_overlap=overlap, output_error=output_error, output_abs_error=abs_err,
        lse=lse, density=layout.density(), topk=topk, causal=causal, nonfinite_rows=nonfinite,
    )


def _split_nonfinite(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, causal: bool, groups: int):
    """Note [non-finite coverage]: ``(query, key, value, None)`` when all are finite; else copies with the
    non-finite entries set to 0 and bool ``[B, H, Lq]``: the rows that meet a non-finite input (their own
    query, or a non-finite key / value entry among the keys the dense reference sees)."""
    bad_q = ~torch.isfinite(query).all(-1)  # [B, H, Lq]
    bad_k = ~torch.isfinite(key).all(-1)  # [B, Hkv, Lk]
    if value is not None:
        bad_k = bad_k | ~torch.isfinite(value).all(-1)
    if not bool(bad_q.any() | bad_k.any()):
        return query, key, value, None
    Lq, Lk = query.shape[2], key.shape[2]
    if causal:  # row i sees keys j <= i + Lk - Lq: it is bad when the first bad key is among them
        first = torch.where(bad_k, torch.arange(Lk, device=key.device), Lk).amin(-1)  # [B, Hkv]
        seen = first[..., None] <= torch.arange(Lq, device=key.device) + (Lk - Lq)  # [B, Hkv, Lq]
    else:
        seen = bad_k.any(-1, keepdim=True).expand(-1, -1, Lq)
    bad = bad_q | seen.repeat_interleave(groups, dim=1)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    query = torch.where(torch.isfinite(query), query, zero)
    key = torch.where(torch.isfinite(key), key, zero)
    if value is not None:
        value = torch.where(torch.isfinite(value), value, zero)
    return query, key, value, bad
