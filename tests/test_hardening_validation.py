"""Issue 11, item 7: bad arguments fail at construction with a message naming the argument; a fuzz of
``pattern_from_dict``."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spattn
from spattn.patterns.serialize import _REGISTRY


@pytest.mark.parametrize("data, error, words", [
    ({"type": "union", "parts": []}, ValueError, "Union.parts"),
    ({"type": "intersection", "parts": []}, ValueError, "Intersection.parts"),
    ({"type": "union", "parts": [1, 2]}, ValueError, "Union.parts[0]"),
    ({"type": "union", "parts": [{"type": "causal"}, "x"]}, ValueError, "Union.parts[1]"),
    ({"type": ["window"], "left": 3}, ValueError, "type"),
    ({"type": {"a": 1}}, ValueError, "type"),
    ({"type": "global", "tokens": 5}, ValueError, "Global.tokens"),
    ({"type": "random_blocks", "per_row": 1, "per_head": "no"}, ValueError, "RandomBlocks.per_head"),
    ({"type": "document", "segment_ids": {"tensor": "abc", "dtype": "int64"}}, ValueError, "segment_ids"),
])
def test_pattern_from_dict_names_the_field(data, error, words):
    with pytest.raises(error, match=None) as info:
        spattn.pattern_from_dict(data)
    assert words in str(info.value)


@pytest.mark.parametrize("build, words", [
    (lambda: spattn.Global(5), "Global.tokens"),
    (lambda: spattn.Global("12"), "Global.tokens"),
    (lambda: spattn.Global((1, "2")), "Global.tokens[1]"),
    (lambda: spattn.RandomBlocks(2, per_head="no"), "RandomBlocks.per_head"),
    (lambda: spattn.RandomBlocks(2, per_head=1), "RandomBlocks.per_head"),
    (lambda: spattn.Union(()), "Union.parts"),
    (lambda: spattn.Intersection((spattn.Causal(), 3)), "Intersection.parts[1]"),
    (lambda: spattn.Window(-1), "Window.left"),
    (lambda: spattn.Window(1.5), "Window.left"),
])
def test_constructors_name_the_argument(build, words):
    with pytest.raises((TypeError, ValueError)) as info:
        build()
    assert words in str(info.value)


def test_global_accepts_a_tensor_of_positions():
    assert spattn.Global(torch.tensor([3, 1])).tokens == (1, 3)


def test_head_dim_zero_is_refused_by_name():
    q = torch.randn(1, 1, 8, 0)
    with pytest.raises(ValueError, match="head dim"):
        spattn.attention(q, q, q, spattn.Causal(), causal=True)
    with pytest.raises(ValueError, match="head dim"):
        spattn.coverage.measure(q, q, spattn.Causal(), causal=True)
    with pytest.raises(ValueError, match="head dim"):
        spattn.attention(torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 0), spattn.Full())


# -- fuzz -------------------------------------------------------------------------------------------------------
_FIELDS = sorted({f.name for cls in _REGISTRY.values() for f in dataclasses.fields(cls)})
_L = 24

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(2**40, 2**70),
                    st.floats(allow_nan=True), st.text(max_size=4))
json_value = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                        st.dictionaries(st.text(max_size=4), c, max_size=2)),
                          max_leaves=5)


def _pattern_dict(children):
    tensor = st.fixed_dictionaries({"tensor": st.lists(st.integers(-1, 2), min_size=_L, max_size=_L)},
                                   optional={"dtype": st.sampled_from(["int64", "int32", "bool", "nope"])})
    value = st.one_of(json_value, children, st.lists(children, max_size=3), tensor)
    return st.builds(lambda kind, fields: {"type": kind, **fields},
                     st.one_of(st.sampled_from(sorted(_REGISTRY)), json_value),
                     st.dictionaries(st.sampled_from(_FIELDS), value, max_size=3))


pattern_json = st.recursive(st.builds(lambda k: {"type": k}, st.sampled_from(sorted(_REGISTRY))), _pattern_dict,
                            max_leaves=4)


def _named(message: str, data) -> bool:
    names = {"type", "pattern"}
    stack = [data]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            names.update(str(k) for k in d)
            stack.extend(d.values())
        elif isinstance(d, list):
            stack.extend(d)
    return any(n and n in message for n in names)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=pattern_json)
def test_pattern_from_dict_fuzz(data):
    try:
        pattern = spattn.pattern_from_dict(data)
    except (ValueError, TypeError) as exc:
        assert _named(str(exc), data), (data, exc)
        return
    heads = len(pattern.patterns) if isinstance(pattern, spattn.PerHead) else 2
    q = torch.randn(1, heads, _L, 8)
    try:
        layout = spattn.compile(pattern, _L, causal=True, block_size=8, batch=1, heads=heads, query=q, key=q)
    except (ValueError, TypeError) as exc:  # a valid pattern that does not fit here (or never compiles, e.g.
        # Hierarchical, which runs through spattn.hierarchical) says which pattern or field
        assert type(pattern).__name__ in str(exc) or _named(str(exc), data), (data, exc)
        return
    assert 0.0 <= layout.density() <= 1.0
