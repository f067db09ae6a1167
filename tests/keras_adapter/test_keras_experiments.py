"""The reference experiments in Keras 3 (on whichever backend Keras loads): every run meets its
expected verdict, and it is the PyTorch run's model, data and optimizer."""

from __future__ import annotations

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import experiment_runs as runs  # noqa: E402
from experiment_runs import NAMES, RUNNERS  # noqa: E402
from gradwatch_keras import experiments as kx  # noqa: E402

from gradwatch import experiments as ex  # noqa: E402
from gradwatch._events import weight_change_percent  # noqa: E402

BACKEND = keras.backend.backend()
SETTINGS = [pytest.param(s, id=s.name) for s in ex.SETTINGS]


def train(exp, tmp_path, framework="keras", settings=ex.EXACT):
    return runs.train(exp, tmp_path, framework, settings)


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
    runs.assert_meets_its_verdict(name, raw, run)
    assert run.framework == f"keras/{BACKEND}" and raw.backend == BACKEND
    # Only gradwatch's async_safe callback is passed to fit(): Keras may dispatch its batch
    # ends asynchronously, and gradwatch must still see every step it trained, each with
    # its loss.
    assert raw.batches == exp.steps
    assert raw.steps_seen == raw.batches and run.ended and run.steps == exp.steps
    assert run.loss_steps.tolist() == list(range(1, exp.steps + 1))
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
    pytest.importorskip("torch")
    runs.assert_first_steps_agree_with_pytorch(name, tmp_path, "keras")


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
