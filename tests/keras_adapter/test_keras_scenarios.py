"""Real small Keras models that train for real under compiled ``fit``: each detector fires on the
broken run, names the layer, and stays quiet on the healthy one."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import UNHEALTHY, compiled, fit, mlp, to_numpy

import gradwatch


def test_deep_sigmoid_with_large_inputs_reports_vanishing_gradient_in_the_first_dense_layer(
        deep_sigmoid_default):
    run = deep_sigmoid_default
    f = run.first("vanishing_gradient")
    assert f.layer == "d0"  # the first Dense layer: furthest from the loss
    assert f.value < 1e-4 and f.evidence["ratio_to_largest"]["d0"] < 1e-3
    assert "first of 11" in f.message
    # The advice comes from the model: it names the saturating activation and the structural fixes.
    advice = " ".join(f.advice)
    assert "ReLU" in advice and "BatchNorm" in advice and "residual" in advice
    assert run.warned(gradwatch.VanishingGradientWarning)
    # Not mistaken for a learning-rate problem.
    assert "stalled_update" not in run.kinds
    rows = {r.name: r for r in run.report.layers}
    assert "vanishing_gradient" in rows["d0"].flags
    assert run.report.internal_errors == ()


def test_deep_sigmoid_with_large_inputs_reports_saturated_units_after_the_first_layer(
        deep_sigmoid_default):
    run = deep_sigmoid_default
    sat = run.first("saturated_units")
    # The activation site is the Dense layer that applies the sigmoid.
    assert sat.layer == "d0"
    assert sat.value > 0.5
    assert run.warned(gradwatch.SaturationWarning)


def test_relu_he_init_10_layers_stays_quiet_and_trains():
    model = compiled(mlp(10, activation="relu", init="he_normal"), lr=0.05)
    run = fit(model)
    assert not run.kinds & UNHEALTHY, run.report
    assert run.last_loss < 0.3  # it really trained
    assert run.report.internal_errors == ()
    assert not run.caught


# Found by the label check below: on the PyTorch backend at lr=50 a gradient of finite elements
# (loss 9.3e29 at step 6; the loss and every weight stay finite to the end) was reported as
# non-finite: the per-variable norm summed its squares in float32, which overflows from a norm of
# ~1.8e19 on (``torch._foreach_norm([torch.full((100,), 1e20)], 2, dtype=torch.float32)`` is inf).
# Fixed: the adapter sums squares in float64 (test_finite_huge_gradient_is_not_nonfinite below).
@pytest.mark.parametrize("lr", [pytest.param(10.0, id="lr-10"),
                                pytest.param(50.0, id="lr-50")])
def test_huge_learning_rate_is_reported_without_breaking_fit(lr):
    model = compiled(mlp(3, activation="relu", init="he_normal"), lr=lr)
    run = fit(model, epochs=4)
    assert len(run.history.history["loss"]) == 4  # fit ran to the end and returned normally
    assert run.kinds & {"nonfinite", "loss_divergence", "exploding_gradient"}, run.report
    # The label, from the run itself without gradwatch: did NaN/Inf reach the loss or weights?
    went_nonfinite = (not all(math.isfinite(x) for x in run.history.history["loss"])
                      or any(not np.isfinite(to_numpy(w)).all() for w in model.weights))
    nonfinite = [f for f in run.findings if f.kind == "nonfinite"]
    # Told once when it happened (one condition, no spam), never when it did not.
    assert len(nonfinite) == (1 if went_nonfinite else 0), (went_nonfinite, run.report)
    assert run.report.internal_errors == ()
    assert run.report.steps == 4 * 16


def _huge_gradient_run(x: np.ndarray, run_eagerly: bool) -> gradwatch.Report:
    """A bias-free Dense "d" on ``x`` whose loss is mean(output) * 1e20: each kernel entry's
    gradient is (the mean of its input column) * 1e20 / 1, finite in float32, while the squared
    norm of the 100 entries (1e42) is beyond float32."""
    import keras

    model = keras.Sequential([keras.Input((100,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="ones",
                                                 name="d")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e-30),
                  loss=lambda y, p: keras.ops.mean(p) * 1e20, run_eagerly=run_eagerly)
    cb = gradwatch.keras.GradWatchCallback(check_every=1, on_finding="log")
    model.fit(x, np.zeros((len(x), 1), "float32"), batch_size=len(x), epochs=3, verbose=0,
              callbacks=[cb])
    return cb


@pytest.mark.parametrize("run_eagerly", [pytest.param(False, id="compiled"),
                                         pytest.param(True, id="eager")])
def test_finite_huge_gradient_is_not_nonfinite_but_exploding(run_eagerly):
    cb = _huge_gradient_run(np.ones((8, 100), "float32"), run_eagerly)
    report = cb.report()
    assert not [f for f in cb.findings if f.kind == "nonfinite"], str(report)
    row = {r.name: r for r in report.layers}["d"]
    # The norm is 1e21 (100 entries of 1e20): measured, finite, and it reaches the detector.
    assert row.grad_norm == pytest.approx(1e21, rel=1e-5), str(report)
    assert "exploding_gradient" in {f.kind for f in cb.findings}, str(report)
    assert report.internal_errors == ()


@pytest.mark.parametrize("run_eagerly", [pytest.param(False, id="compiled"),
                                         pytest.param(True, id="eager")])
def test_a_real_nan_gradient_entry_is_nonfinite_in_its_layer(run_eagerly):
    x = np.ones((8, 100), "float32")
    x[3, 17] = np.nan  # one NaN input: the kernel's gradient entry 17 is NaN
    cb = _huge_gradient_run(x, run_eagerly)
    nonfinite = [f for f in cb.findings if f.kind == "nonfinite"]
    report = cb.report()
    # Told once, at the first step; the layer is named (the only layer: in the evidence and flags).
    assert len(nonfinite) == 1 and nonfinite[0].step == 1, str(report)
    assert nonfinite[0].evidence["layers"] == ["d"], nonfinite[0]
    assert "nonfinite" in {r.name: r for r in report.layers}["d"].flags, str(report)


def test_tiny_learning_rate_is_stalled_updates_not_vanishing_gradients():
    model = compiled(mlp(3, activation="relu", init="he_normal"), lr=1e-7)
    run = fit(model)
    assert "stalled_update" in run.kinds, run.report
    assert "vanishing_gradient" not in run.kinds
    f = run.first("stalled_update")
    assert f.layer == "d0"
    assert f.value < 1e-5
    assert "learning rate (now 1e-07" in f.advice[0]
    assert run.warned(gradwatch.UpdateRatioWarning)


def test_batchnorm_mlp_stays_quiet_and_its_moving_statistics_are_not_layers():
    model = compiled(mlp(6, activation="relu", init="he_normal", bn=True), lr=0.05)
    run = fit(model)
    assert not run.kinds & UNHEALTHY, run.report
    assert run.last_loss < 0.3
    rows = {r.name: r for r in run.report.layers}
    # gamma/beta are trained by the optimizer; moving mean/variance are not and are no rows.
    assert list(rows) == [n for i in range(6) for n in (f"d{i}", f"bn{i}")] + ["out"]
    assert rows["bn0"].num_params == 2 * 32  # gamma and beta only
    assert not any("moving" in name for name in rows)
    assert all("stalled_update" not in r.flags for r in rows.values())
    assert all(math.isfinite(r.grad_norm) for r in rows.values())


def test_frozen_layer_is_not_a_row_and_not_flagged():
    model = mlp(4, activation="relu", init="he_normal")
    model.get_layer("d1").trainable = False
    compiled(model, lr=0.05)
    frozen = [to_numpy(w) for w in model.get_layer("d1").weights]
    run = fit(model)
    assert not run.kinds & UNHEALTHY, run.report
    rows = {r.name: r for r in run.report.layers}
    assert list(rows) == ["d0", "d2", "d3", "out"]
    assert all(not f.layer or f.layer != "d1" for f in run.findings)
    after = [to_numpy(w) for w in model.get_layer("d1").weights]
    assert all((a == b).all() for a, b in zip(frozen, after))  # gradwatch did not train it
