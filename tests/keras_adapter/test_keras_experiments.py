"""The reference experiments in Keras 3 (on whichever backend Keras loads): every run meets its
expected verdict, and it is the PyTorch run's model, data and optimizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from gradwatch_keras import experiments as kx  # noqa: E402

from gradwatch import experiments as ex  # noqa: E402
from gradwatch._events import first_last_ratio, read_runs, weight_change_percent  # noqa: E402

BACKEND = keras.backend.backend()
#: The runners the plugins give the command line.
RUNNERS = ex.experiment_runners()
NAMES = [e.name for e in ex.EXPERIMENTS]
SETTINGS = [pytest.param(s, id=s.name) for s in ex.SETTINGS]
REPAIRS = ["shallow-sigmoid", "deep-relu", "deep-leaky-relu", "deep-prelu", "deep-tanh-xavier",
           "deep-sigmoid-batchnorm", "deep-sigmoid-residual", "explode-repaired",
           "dying-relu-leaky-0.3"]


def train(exp, tmp_path, framework="keras", settings=ex.EXACT):
    events = tmp_path / f"{exp.name}-{framework}-{settings.name}.jsonl"
    raw = RUNNERS[framework].run(exp, events, settings)
    [run] = read_runs(events)
    return raw, run


def test_the_runner_reads_the_backend_keras_loaded():
    runner = RUNNERS["keras"]
    assert runner.unavailable() is None
    assert runner.label == ("keras/tf" if BACKEND == "tensorflow" else f"keras/{BACKEND}")


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_experiment_meets_its_expected_verdict(name, settings, tmp_path):
    # Under gradwatch's defaults (sampled update ratios) as under exact measurement.
    exp = ex.get(name)
    raw, run = train(exp, tmp_path, settings=settings)
    assert ex.judge(exp, run.kinds) == [], raw.report
    assert [(f.kind, f.step, f.layer) for f in run.findings] == [
        (f.kind, f.step, f.layer) for f in raw.findings]
    assert list(run.layers) == ex.layer_names(exp)
    assert run.framework == f"keras/{BACKEND}" and raw.backend == BACKEND
    # Only gradwatch's async_safe callback is passed to fit(): Keras may dispatch its batch
    # ends asynchronously, and gradwatch must still see every step it trained, each with
    # its loss.
    assert raw.batches == exp.steps
    assert raw.steps_seen == raw.batches and run.ended and run.steps == exp.steps
    assert run.loss_steps.tolist() == list(range(1, exp.steps + 1))
    if name in REPAIRS:
        assert first_last_ratio(run) > 1e-2, raw.report
        assert raw.final_loss < 0.69
    if name == "deep-sigmoid":
        assert first_last_ratio(run) < 1e-6
        assert run.findings[0].kind == "vanishing_gradient" and run.findings[0].layer == "fc0"
        assert raw.final_loss == pytest.approx(math.log(2), abs=0.01)
    if name == "explode-clip-only":
        assert math.isfinite(raw.final_loss) and raw.final_loss > 10


def test_weight_change_since_the_start_is_measured(tmp_path):
    raw, run = train(ex.get("deep-sigmoid"), tmp_path)
    change = weight_change_percent(run)
    assert change["out"] > 1  # the output layer learns; the first does not
    assert change["fc0"] < 1e-4


@pytest.mark.parametrize("name", ["deep-sigmoid", "deep-sigmoid-batchnorm", "deep-prelu",
                                  "deep-sigmoid-residual", "dying-relu-leaky-0.3"])
def test_same_model_data_and_optimizer_as_pytorch(name, tmp_path):
    # Same initial weights, batches and SGD: the first step's per-layer gradients and the first
    # losses agree to float32 noise. (Later steps drift apart as rounding differences grow,
    # fastest with BatchNorm.)
    pytest.importorskip("torch")
    exp = ex.get(name).with_(steps=5, check_every=1)
    _, k = train(exp, tmp_path)
    _, t = train(exp, tmp_path, framework="torch")
    assert k.loss_steps.tolist() == t.loss_steps.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(k.loss, t.loss, rtol=1e-4)
    np.testing.assert_allclose(k.grad_norm[0], t.grad_norm[0], rtol=1e-4)


def test_the_model_is_the_spec():
    exp = ex.get("deep-sigmoid-batchnorm")
    model = kx.build(exp)
    for i, (w, b) in enumerate(ex.initial_weights(exp)):
        layer = model.get_layer(f"fc{i}" if i < exp.depth else "out")
        kernel, bias = (keras.ops.convert_to_numpy(v) for v in layer.weights)
        assert np.array_equal(kernel, w) and np.array_equal(bias, b)
    bn = model.get_layer("bn0")
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5  # PyTorch's BatchNorm1d defaults
    prelu = kx.build(ex.get("deep-prelu")).get_layer("act0")
    alpha = keras.ops.convert_to_numpy(prelu.weights[0])
    assert alpha.shape == (32,) and np.all(alpha == 0.25)  # PyTorch's PReLU(32, init=0.25)
