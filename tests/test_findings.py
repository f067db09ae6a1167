"""Finding: validation, strict-JSON round trip, rendering, and the warning category of each kind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradwatch


def make(**kw):
    fields = dict(kind="vanishing_gradient", step=10, layer="0", value=1e-7, threshold=1e-4,
                  message="step 10: layer '0' receives almost no gradient.")
    fields.update(kw)
    return gradwatch.Finding(**fields)


def strict_loads(line: str):
    def reject(name):
        raise AssertionError(f"bare {name} in JSON output")

    return json.loads(line, parse_constant=reject)


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        pytest.param("kind", 3, id="kind-int"),
        pytest.param("kind", None, id="kind-none"),
        pytest.param("kind", "", id="kind-empty"),
        pytest.param("step", -1, id="step-negative"),
        pytest.param("step", 1.0, id="step-float"),
        pytest.param("step", "10", id="step-str"),
        pytest.param("step", True, id="step-bool"),
        pytest.param("step", None, id="step-none"),
        pytest.param("layer", 0, id="layer-int"),
        pytest.param("layer", b"fc1", id="layer-bytes"),
        pytest.param("layer", ("0",), id="layer-tuple"),
    ],
)
def test_invalid_field_raises_type_error_naming_it(field, value):
    with pytest.raises(TypeError, match=f"Finding.{field}"):
        make(**{field: value})


def test_numpy_integer_step_is_accepted_as_int():
    # A third-party detector naturally takes the step from StepStats.steps (a numpy array);
    # rejecting np.int64 there turns the detector into an internal error on its first finding.
    f = make(step=np.int64(20))
    assert f.step == 20 and type(f.step) is int
    json.dumps(f.to_dict(), allow_nan=False)


def test_fields_are_normalised():
    f = make(value=np.float32(0.5), threshold=1, advice=["use ReLU", "add BatchNorm"])
    assert (type(f.value), type(f.threshold)) == (float, float)
    assert f.advice == ("use ReLU", "add BatchNorm")


# -- JSON -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, threshold",
    [
        pytest.param(1e-7, 1e-4, id="finite"),
        pytest.param(math.nan, math.inf, id="nan-value-inf-threshold"),
        pytest.param(math.inf, 1e3, id="inf-value"),
        pytest.param(-math.inf, 0.0, id="minus-inf-value"),
    ],
)
@pytest.mark.parametrize("layer", [pytest.param("encoder.fc1", id="layer"),
                                   pytest.param(None, id="model-wide")])
def test_to_dict_is_strict_json_and_round_trips(value, threshold, layer):
    f = make(value=value, threshold=threshold, layer=layer, advice=("clip gradients", "lower lr"),
             evidence={"layers": ["0", "1"], "ratio": 0.5})
    line = json.dumps(f.to_dict(), allow_nan=False)
    back = gradwatch.Finding.from_dict(strict_loads(line))
    for name in ("kind", "step", "layer", "message", "advice"):
        assert getattr(back, name) == getattr(f, name), name
    for name in ("value", "threshold"):
        a, b = getattr(back, name), getattr(f, name)
        assert (math.isnan(a) and math.isnan(b)) or a == b, name
    assert dict(back.evidence) == {"layers": ["0", "1"], "ratio": 0.5}


def test_evidence_with_numpy_and_nonfinite_values_is_strict_json():
    f = make(evidence={"norms": np.array([1.0, np.nan, np.inf]), "loss": np.float64("nan"),
                       "count": np.int64(3), "pair": (1, -math.inf), "nested": {"x": math.nan}})
    data = strict_loads(json.dumps(f.to_dict(), allow_nan=False))
    assert data["evidence"] == {"norms": [1.0, "NaN", "Infinity"], "loss": "NaN", "count": 3,
                                "pair": [1, "-Infinity"], "nested": {"x": "NaN"}}


def test_from_dict_rejects_a_number_that_is_not_one():
    data = make().to_dict()
    data["value"] = "lots"
    with pytest.raises(ValueError, match="lots"):
        gradwatch.Finding.from_dict(data)


# -- rendering --------------------------------------------------------------------------------


def test_render_includes_message_and_every_advice():
    advice = ("replace sigmoid with ReLU or LeakyReLU", "use He initialisation", "add BatchNorm")
    text = make(advice=advice).render()
    assert text.startswith("step 10: layer '0' receives almost no gradient.")
    for a in advice:
        assert a in text


def test_render_without_advice_is_the_message():
    assert make(advice=()).render() == "step 10: layer '0' receives almost no gradient."


# -- categories -------------------------------------------------------------------------------


def test_kinds_are_the_contract_kinds():
    assert gradwatch.KINDS == (
        "vanishing_gradient", "exploding_gradient", "nonfinite", "loss_plateau",
        "loss_divergence", "stalled_update", "large_update", "dead_units", "saturated_units",
    )


CATEGORIES = [
    pytest.param("vanishing_gradient", gradwatch.VanishingGradientWarning, id="vanishing"),
    pytest.param("exploding_gradient", gradwatch.ExplodingGradientWarning, id="exploding"),
    pytest.param("nonfinite", gradwatch.NonFiniteWarning, id="nonfinite"),
    pytest.param("loss_plateau", gradwatch.LossPlateauWarning, id="plateau"),
    pytest.param("loss_divergence", gradwatch.LossDivergenceWarning, id="divergence"),
    pytest.param("stalled_update", gradwatch.UpdateRatioWarning, id="stalled-update"),
    pytest.param("large_update", gradwatch.UpdateRatioWarning, id="large-update"),
    pytest.param("dead_units", gradwatch.DeadUnitsWarning, id="dead-units"),
    pytest.param("saturated_units", gradwatch.SaturationWarning, id="saturated-units"),
]


def test_every_kind_has_a_category_case():
    assert {p.values[0] for p in CATEGORIES} == set(gradwatch.KINDS)


@pytest.mark.parametrize("kind, category", CATEGORIES)
def test_category_of_each_kind(kind, category):
    assert make(kind=kind).category is category
    assert issubclass(category, gradwatch.GradientHealthWarning)


def test_unknown_kind_gets_the_base_category():
    assert make(kind="my_plugin_kind").category is gradwatch.GradientHealthWarning


def test_warning_hierarchy():
    assert issubclass(gradwatch.GradientHealthWarning, UserWarning)
    # Silencing findings must not silence reports of gradwatch's own failures.
    assert not issubclass(gradwatch.GradWatchInternalWarning, gradwatch.GradientHealthWarning)


def test_gradient_health_error_carries_the_finding():
    f = make()
    err = gradwatch.GradientHealthError(f)
    assert err.finding is f
    assert str(err) == f.message
