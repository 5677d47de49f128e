"""The untuned kernel configs (Note [defaults] in ``_tuning.py``) and one compile per length (Note [one compile
per length] in ``_primitives.py``), checked without a GPU.

Compiles are not observable under the interpreter, so the second half records the arguments each launcher
passes to its kernel (the launch itself is replaced by a recorder) and applies Triton's own specialisation
rule to them: every integer argument the kernel specialises on must have the same specialisation at every
length, and every name in a kernel's ``do_not_specialize`` must be one of its arguments (Triton ignores unknown
names silently). ``benchmarks/kernels_jit.py`` counts real sm_90 compiles on a CPU machine.
"""

from __future__ import annotations

import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import spattn  # noqa: E402
from spattn.ops.attention.impl.triton import _backward, _forward, _launch, _tuning  # noqa: E402

DO_NOT_SPECIALIZE = {**_forward.DO_NOT_SPECIALIZE, **_backward.DO_NOT_SPECIALIZE}
KERNELS = {
    "attn_fwd_kernel": _forward.attn_fwd_kernel,
    "decode_kernel": _forward.decode_kernel,
    "attn_bwd_preprocess_kernel": _backward.attn_bwd_preprocess_kernel,
    "attn_bwd_dq_kernel": _backward.attn_bwd_dq_kernel,
    "attn_bwd_dkdv_kernel": _backward.attn_bwd_dkdv_kernel,
    "attn_bwd_fused_kernel": _backward.attn_bwd_fused_kernel,
}
LAUNCHED = {  # the kernels each backward method launches (with the forward and decode ones)
    "split": ("attn_bwd_preprocess_kernel", "attn_bwd_dq_kernel", "attn_bwd_dkdv_kernel"),
    "atomic": ("attn_bwd_preprocess_kernel", "attn_bwd_fused_kernel"),
}


def test_defaults_per_kernel_head_dim_dtype_and_band():
    bf16 = torch.bfloat16
    # banded forward with even lengths takes the 128x128 tile; D128 tails keep 128x64 (shared memory)
    assert _tuning.default("fwd", 64, bf16, banded=True) == _tuning.Config(128, 128, 8, 3)
    assert _tuning.default("fwd", 64, bf16, banded=True, even=False) == _tuning.Config(128, 128, 8, 3)
    assert _tuning.default("fwd", 128, bf16, banded=True) == _tuning.Config(128, 128, 8, 3)
    assert _tuning.default("fwd", 128, bf16, banded=True, even=False) == _tuning.Config(128, 64, 8, 3)
    assert _tuning.default("fwd", 64, bf16) == _tuning.Config(128, 64, 8, 3)
    assert _tuning.default("fwd", 64, torch.float16) == _tuning.default("fwd", 64, bf16)
    # the backward and decode ignore the band
    for kernel in ("dq", "dkdv", "bwd", "decode"):
        for D in (64, 128):
            assert _tuning.default(kernel, D, bf16, banded=True) == _tuning.default(kernel, D, bf16)
    assert _tuning.default("dkdv", 128, bf16) == _tuning.Config(64, 128, 8, 3)
    assert _tuning.default("decode", 128, bf16) == _tuning.Config(16, 128, 4, 3)
    # fp32 tiles are twice the bytes: 64x64, two stages above D 64
    for kernel in ("fwd", "dq", "dkdv", "bwd"):
        cfg = _tuning.default(kernel, 128, torch.float32, banded=True)
        assert (cfg.block_m, cfg.block_n, cfg.num_stages) == (64, 64, 2)
    # a block size below the tile shrinks it
    assert _tuning.default("fwd", 64, bf16, banded=True).fit(64) == _tuning.Config(64, 64, 8, 3)


def test_choose_returns_the_default_when_tuning_is_off(monkeypatch, tmp_path):
    monkeypatch.setenv("SPATTN_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("SPATTN_TRITON_CACHE", str(tmp_path / "configs.json"))
    monkeypatch.setattr(_tuning, "_gpu_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(_tuning, "_memory", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda", 0)

    def bench(cfg):
        raise AssertionError("tuning ran although SPATTN_TRITON_AUTOTUNE=0")

    got = _tuning.choose("fwd", 128, torch.bfloat16, "facts", cuda, 128, bench=bench, pairs=1 << 24, banded=True)
    assert got == _tuning.Config(128, 128, 8, 3)
    got = _tuning.choose("fwd", 128, torch.bfloat16, "facts", cuda, 128, bench=bench, even=False, banded=True)
    assert got == _tuning.Config(128, 64, 8, 3)
    got = _tuning.choose("dq", 64, torch.bfloat16, "facts", cuda, 32, bench=bench)
    assert got == _tuning.Config(32, 32, 4, 3)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_do_not_specialize_names_are_arguments(name):
    kernel = KERNELS[name]
    args = list(inspect.signature(kernel.fn).parameters)
    names = DO_NOT_SPECIALIZE[name]
    if hasattr(kernel, "do_not_specialize"):  # compiled (not interpreted) kernels carry the list
        assert list(kernel.do_not_specialize) == names
    assert names, f"{name} specialises on every integer"
    assert set(names) <= set(args), f"{name}: {sorted(set(names) - set(args))} are not arguments"


class _Recorder:
    """Stands in for a kernel: records the launch arguments instead of running."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _specialisations(name, kernel, args) -> list:
    """Triton's specialisation of each non-tensor argument (tuples element by element), leaving out the
    length arguments a kernel keeps specialised on purpose (``_backward.SPECIALISED_LENGTHS``)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = list(inspect.signature(kernel.fn).parameters)
    dns = set(DO_NOT_SPECIALIZE[name])
    out = []
    kept = _backward.SPECIALISED_LENGTHS.get(name, ())
    for arg_name, arg in zip(names, args, strict=False):
        if isinstance(arg, torch.Tensor) or arg_name in kept:
            continue
        out.append((arg_name, str(native_specialize_impl(BaseBackend, arg, False, arg_name not in dns, True))))
    return out


@pytest.mark.parametrize("method", sorted(LAUNCHED))
def test_one_specialisation_for_every_length(monkeypatch, method):
    pytest.importorskip("triton.runtime.jit").__dict__.get("native_specialize_impl") or pytest.skip(
        "this triton has no native_specialize_impl")
    monkeypatch.setenv("SPATTN_TRITON_BACKWARD", method)
    recorders = {}
    for name in ("attn_fwd_kernel", "decode_kernel", *LAUNCHED[method]):
        recorders[name] = _Recorder(KERNELS[name])
        monkeypatch.setattr(_launch, name, recorders[name])
    H, Hkv, D = 3, 1, 32
    patterns = {"causal": spattn.Causal(), "sinks|window": spattn.Sinks(4) | spattn.Window(60),
                "sinks16|window": spattn.Sinks(16) | spattn.Window(48)}
    seen: dict[str, set] = {}
    for pattern in patterns.values():
        for L in (95, 128, 160, 257, 320):
            layout = spattn.compile(pattern, L, causal=True, block_size=32)
            fwd = [getattr(layout, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                                "full_kv_indices")]
            bwd = [getattr(layout, n) for n in ("q_num_blocks", "q_indices", "q_mask_ids", "full_q_num_blocks",
                                                "full_q_indices")]
            q = torch.zeros(1, H, L, D)
            k = torch.zeros(1, Hkv, L, D)
            band = [int(x) for x in (_launch._plan.band(layout) or ())]
            _launch.forward(q, k, k, *fwd, layout.masks, 0.1, band)
            _launch.backward(q, q, k, k, q, torch.zeros(1, H, L), None, *fwd, *bwd, layout.masks, 0.1)
            dec = spattn.compile(pattern, 1, L, causal=True, block_size=32)
            tabs = [getattr(dec, n) for n in ("kv_num_blocks", "kv_indices", "kv_mask_ids", "full_kv_num_blocks",
                                              "full_kv_indices")]
            _launch.decode(q[:, :, :1].contiguous(), k, k, *tabs, dec.masks, 0.1)
    for name, rec in recorders.items():
        assert rec.calls, f"{name} was never launched"
        for kept in _backward.SPECIALISED_LENGTHS.get(name, ()):  # at most two classes: % 16 or not, never 1
            at = list(inspect.signature(rec.kernel.fn).parameters).index(kept)
            assert all(args[at] > 1 for args, _ in rec.calls)
        for args, _ in rec.calls:
            seen.setdefault(name, set()).add(tuple(_specialisations(name, rec.kernel, args)))
        assert len(seen[name]) == 1, f"{name}: {len(seen[name])} specialisations across lengths and patterns: " + \
            str([sorted(set(s) - set.intersection(*map(set, seen[name]))) for s in seen[name]])
