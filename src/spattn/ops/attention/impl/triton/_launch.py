"""Host-side launchers: shapes, strides, grids and config choice for the kernels (flat tensors in/out)."""

from __future__ import annotations

import torch
import triton

from . import _tuning
from ._backward import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from ._decode import decode_combine_kernel, decode_split_kernel
from ._forward import attn_fwd_kernel

LOG2E = 1.4426950408889634


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _s2(t: torch.Tensor) -> tuple[int, int]:
    """(batch, head) strides of a table, 0 where broadcast."""
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1) if t.shape[1] > 1 else 0)


def _s3(t: torch.Tensor) -> tuple[int, int, int]:
    return (*_s2(t), t.stride(2))


def _masks(masks: torch.Tensor) -> torch.Tensor:
    if masks.numel() == 0:
        return torch.zeros(1, dtype=torch.uint8, device=masks.device)
    masks = masks.contiguous()
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks.to(torch.uint8)


def _dp(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def _tables(*tabs: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() if t.dtype == torch.int32 else t.to(torch.int32).contiguous() for t in tabs]


def forward(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, kind: str):
    """out [B, H, Lq, D] (q's dtype), lse fp32 [B, H, Lq] (natural log) through the tiled kernel."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    bs = masks.shape[-1]
    kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)
    m8 = _masks(masks)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)

    def launch(cfg: _tuning.Config) -> None:
        grid = (triton.cdiv(Lq, cfg.block_m), B * H)
        attn_fwd_kernel[grid](
            q, k, v, o, lse, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, m8,
            scale * LOG2E, Lq, Lk, H, H // Hkv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), H * Lq, Lq,
            *_s2(kv_num), *_s3(kv_idx), *_s3(fkv_idx),
            D=D, DP=_dp(D), BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_N=Lk % cfg.block_n == 0, MERGED=cfg.merged,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = _tuning.choose(
        "fwd", D, q.dtype, kind, q.device, bs, bench=lambda c: _bench(lambda: launch(c)), pairs=Lq * Lk,
        even=Lk % bs == 0)
    _tuning.run_with_fallback(launch, cfg)
    return o, lse


def decode(q, k, v, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, masks, scale: float, kind: str, num_sms: int = 132):
    """Split-K forward for Lq <= 16 (all queries in query block 0). Same outputs as :func:`forward`."""
    q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    bs = masks.shape[-1]
    kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)
    m8 = _masks(masks)
    pack = kv_num.shape[1] == 1 and G * Lq <= 128
    GP, HP = (G, Hkv) if pack else (1, H)
    BLOCK_M = max(16, triton.next_power_of_2(GP * Lq))
    total = fkv_idx.shape[-1] + kv_idx.shape[-1]
    progs = B * HP
    S = max(1, min(total, triton.cdiv(2 * num_sms, progs)))
    PER = triton.cdiv(total, S)
    S = triton.cdiv(total, PER)
    DP = _dp(D)
    op = torch.empty(B, H, S, Lq, DP, dtype=torch.float32, device=q.device)
    lp = torch.empty(B, H, S, Lq, dtype=torch.float32, device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)

    def launch(cfg: _tuning.Config) -> None:
        bn = cfg.block_n
        decode_split_kernel[(S, B * HP)](
            q, k, v, op, lp, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, m8,
            scale * LOG2E, Lq, Lk, H, HP, G, GP, S, PER,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            *_s2(kv_num), *_s2(kv_idx), *_s2(fkv_idx),
            D=D, DP=DP, BS=bs, BLOCK_M=BLOCK_M, BLOCK_N=bn,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        decode_combine_kernel[(B * H * Lq,)](
            op, lp, o, lse, Lq, H, S, o.stride(0), o.stride(1), o.stride(2),
            D=D, DP=DP, SP=max(2, triton.next_power_of_2(S)), num_warps=4,
        )

    cfg = _tuning.choose(
        "decode", D, q.dtype, kind, q.device, bs, bench=lambda c: _bench(lambda: launch(c)), pairs=Lq * Lk,
        even=Lk % bs == 0)
    _tuning.run_with_fallback(launch, cfg)
    return o, lse


def backward(do, q, k, v, o, lse, dlse, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx,
             q_num, q_idx, q_mid, fq_num, fq_idx, masks, scale: float, kind: str):
    """(dq, dk, dv) in the input dtypes; ``dlse`` (or None) is the gradient flowing into lse."""
    q, k, v, o, do = _lastdim(q), _lastdim(k), _lastdim(v), _lastdim(o), _lastdim(do)
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    bs = masks.shape[-1]
    kv_num, kv_idx, kv_mid, fkv_num, fkv_idx = _tables(kv_num, kv_idx, kv_mid, fkv_num, fkv_idx)
    q_num, q_idx, q_mid, fq_num, fq_idx = _tables(q_num, q_idx, q_mid, fq_num, fq_idx)
    m8 = _masks(masks)
    DP = _dp(D)
    lse = lse.contiguous()
    delta = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    PB = 64
    attn_bwd_preprocess_kernel[(triton.cdiv(Lq, PB), B * H)](
        o, do, lse, delta, lse2, Lq, H, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1),
        do.stride(2), D=D, DP=DP, BLOCK_M=PB,
    )
    if dlse is not None:
        delta = delta - dlse.to(torch.float32)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)

    def launch_dq(cfg: _tuning.Config) -> None:
        attn_bwd_dq_kernel[(triton.cdiv(Lq, cfg.block_m), B * H)](
            q, k, v, do, dq, lse2, delta, kv_num, kv_idx, kv_mid, fkv_num, fkv_idx, m8,
            scale * LOG2E, scale, Lq, Lk, H, G,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2),
            *_s2(kv_num), *_s3(kv_idx), *_s3(fkv_idx),
            D=D, DP=DP, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def launch_dkdv(cfg: _tuning.Config) -> None:
        attn_bwd_dkdv_kernel[(triton.cdiv(Lk, cfg.block_n), B * Hkv)](
            q, k, v, do, dk, dv, lse2, delta, q_num, q_idx, q_mid, fq_num, fq_idx, m8,
            scale * LOG2E, scale, Lq, Lk, H, Hkv, G,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2),
            *_s2(q_num), *_s3(q_idx), *_s3(fq_idx),
            D=D, DP=DP, BS=bs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg = _tuning.choose(
        "dq", D, q.dtype, kind, q.device, bs, bench=lambda c: _bench(lambda: launch_dq(c)), pairs=Lq * Lk,
        even=Lk % bs == 0 and Lq % bs == 0)
    _tuning.run_with_fallback(launch_dq, cfg)
    cfg = _tuning.choose(
        "dkdv", D, q.dtype, kind, q.device, bs, bench=lambda c: _bench(lambda: launch_dkdv(c)), pairs=Lq * Lk,
        even=Lk % bs == 0 and Lq % bs == 0)
    _tuning.run_with_fallback(launch_dkdv, cfg)
    return dq, dk, dv
