"""Plan: per-layer patterns, JSON round trip, clear errors."""

import json

import pytest

import spattn
from spattn.integrations.plan import Plan, as_plan


def test_uniform_and_per_layer():
    window = spattn.Sinks(64) | spattn.Window(256)
    plan = Plan.uniform(window)
    assert plan.pattern_for(0) == window and plan.pattern_for(29) == window
    plan = Plan(layers={0: None, 3: spattn.Window(8)}, default=window)
    assert plan.pattern_for(0) is None
    assert plan.pattern_for(3) == spattn.Window(8)
    assert plan.pattern_for(4) == window
    assert Plan().is_dense() and Plan(layers={1: None}).is_dense() and not plan.is_dense()


def test_json_round_trip(tmp_path):
    plan = Plan(
        layers={2: spattn.PerHead([spattn.Window(4), spattn.Full(), spattn.Sinks(2) | spattn.Window(3, 1)]), 0: None},
        default=spattn.Sinks(64) | spattn.Window(256),
        meta={"budget": 0.25},
    )
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert list(again.layers) == [0, 2]
    assert again.pattern_for(2) == plan.pattern_for(2)
    assert json.loads(plan.to_json())["format"] == "spattn.plan/1"
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path) == plan
    assert Plan.from_dict(Plan.uniform(None).to_dict()) == Plan()
    assert plan != Plan.uniform(spattn.Window(4))


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: Plan(layers={-1: None}), ValueError, "layers keys"),
        (lambda: Plan(layers={"0": None}), TypeError, "layer indices"),
        (lambda: Plan(layers={0: "window"}), TypeError, "layers[0]"),
        (lambda: Plan(default=3), TypeError, "default"),
        (lambda: Plan(layers=[spattn.Window(3)]), TypeError, "mapping"),
        (lambda: Plan.from_dict({"format": "other"}), ValueError, "format"),
        (lambda: Plan.from_dict({"layers": {"x": None}}), ValueError, "layer index"),
        (lambda: Plan.from_dict({"default": {"type": "nope"}}), ValueError, "unknown pattern type"),
        (lambda: Plan.from_dict({"extra": 1}), ValueError, "unknown field"),
        (lambda: Plan.load("/nonexistent/plan.json"), FileNotFoundError, "plan file"),
        (lambda: Plan().pattern_for("3"), TypeError, "layer"),
        (lambda: as_plan("window"), TypeError, "plan must be"),
    ],
)
def test_errors(make, error, words):
    with pytest.raises(error, match=None) as info:
        make()
    assert words in str(info.value)


def test_as_plan():
    assert as_plan(None) == Plan()
    assert as_plan(spattn.Window(3)) == Plan.uniform(spattn.Window(3))
    plan = Plan.uniform(spattn.Window(5))
    assert as_plan(plan) is plan
