"""Bad input gets a clear error naming the argument."""

import pytest
import torch

import spattn


def qkv(B=1, H=2, Hk=2, Lq=32, Lk=32, D=16, dtype=torch.float32):
    return torch.randn(B, H, Lq, D, dtype=dtype), torch.randn(B, Hk, Lk, D, dtype=dtype), torch.randn(B, Hk, Lk, D, dtype=dtype)


def test_shape_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="query must have shape"):
        spattn.attention(q[0], k, v, spattn.Full())
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        spattn.attention(*qkv(H=3, Hk=2), spattn.Full())
    with pytest.raises(ValueError, match="batch sizes differ"):
        spattn.attention(q, torch.randn(2, 2, 32, 16), torch.randn(2, 2, 32, 16), spattn.Full())
    with pytest.raises(ValueError, match="head dim"):
        spattn.attention(q, torch.randn(1, 2, 32, 8), v, spattn.Full())
    with pytest.raises(ValueError, match="value must have shape"):
        spattn.attention(q, k, torch.randn(1, 2, 31, 16), spattn.Full())
    with pytest.raises(ValueError, match="key length"):
        spattn.attention(*qkv(Lq=40, Lk=32), spattn.Full())


def test_dtype_and_device_errors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="floating"):
        spattn.attention(q.long(), k.long(), v.long(), spattn.Full())
    with pytest.raises(TypeError, match="share a dtype"):
        spattn.attention(q, k.double(), v, spattn.Full())
    with pytest.raises(TypeError, match="layout_or_pattern"):
        spattn.attention(q, k, v, "window")
    with pytest.raises(ValueError, match="backend must be one of"):
        spattn.attention(q, k, v, spattn.Full(), backend="cuda")


def test_layout_mismatch_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="compiled for q_len=64"):
        spattn.attention(q, k, v, spattn.compile(spattn.Window(4), 64))
    with pytest.raises(ValueError, match="heads"):
        spattn.attention(q, k, v, spattn.compile(spattn.PerHead((spattn.Full(),) * 3), 32))
    with pytest.raises(ValueError, match="batch"):
        ids = torch.zeros(3, 32, dtype=torch.long)
        spattn.attention(q, k, v, spattn.compile(spattn.Document(ids), 32))
    with pytest.raises(ValueError, match="causal=True"):
        spattn.attention(q, k, v, spattn.compile(spattn.Window(4), 32), causal=True)


def test_named_backend_never_falls_back():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="triton"):
        spattn.attention(q, k, v, spattn.Full(), backend="triton")


def test_pattern_argument_errors():
    with pytest.raises(ValueError, match="Window.left"):
        spattn.Window(-1)
    with pytest.raises(TypeError, match="Sinks.n"):
        spattn.Sinks(2.5)
    with pytest.raises(ValueError, match="Strided.stride"):
        spattn.Strided(0)
    with pytest.raises(TypeError, match="right operand"):
        spattn.Window(3) | 4
    with pytest.raises(ValueError, match="PerHead has 2 patterns but heads=3"):
        spattn.compile(spattn.PerHead((spattn.Full(), spattn.Full())), 16, heads=3)
    with pytest.raises(ValueError, match="kv_len"):
        spattn.compile(spattn.Full(), 32, 16)
    with pytest.raises(ValueError, match="BlockLayout"):
        spattn.compile(spattn.BlockLayout(torch.ones(2, 2, dtype=torch.bool), block=16), 64)
    with pytest.raises(ValueError, match="segment_ids has length"):
        spattn.compile(spattn.Document(torch.zeros(1, 10, dtype=torch.long)), 16)


def test_malformed_pattern_dicts():
    with pytest.raises(ValueError, match="unknown pattern type 'windoww'"):
        spattn.pattern_from_dict({"type": "windoww", "left": 3})
    with pytest.raises(ValueError, match="no 'type'"):
        spattn.pattern_from_dict({"left": 3})
    with pytest.raises(ValueError, match="unknown field"):
        spattn.pattern_from_dict({"type": "window", "left": 3, "size": 2})
    with pytest.raises(ValueError, match="cannot build Window"):
        spattn.pattern_from_dict({"type": "window"})
    with pytest.raises(TypeError, match="must be a dict"):
        spattn.pattern_from_dict([1, 2])
    with pytest.raises(ValueError, match="parts\\[1\\]"):
        spattn.pattern_from_dict({"type": "union", "parts": [{"type": "causal"}, {"type": "nope"}]})
