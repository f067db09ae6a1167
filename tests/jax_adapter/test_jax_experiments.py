"""The reference experiments in JAX with optax: every run meets its expected verdict, and it is the
PyTorch run's model, data and optimizer (the first step's per-layer gradients agree)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
import experiment_runs as runs  # noqa: E402
from experiment_runs import NAMES, RUNNERS  # noqa: E402
from gradwatch_jax import experiments as jx  # noqa: E402

from gradwatch import experiments as ex  # noqa: E402


def train(exp, tmp_path, framework="jax", settings=ex.DEFAULT):
    return runs.train(exp, tmp_path, framework, settings)


def test_the_runner_is_there_without_importing_jax_to_ask():
    runner = RUNNERS["jax"]
    assert runner.unavailable() is None and runner.label == "jax"


@pytest.mark.parametrize("name", NAMES)
def test_experiment_meets_its_expected_verdict(name, tmp_path):
    exp = ex.get(name)
    raw, run = train(exp, tmp_path)
    runs.assert_meets_its_verdict(name, raw, run)
    assert raw.batches == raw.steps_seen == run.steps == exp.steps


def test_same_model_data_and_optimizer_as_pytorch(tmp_path):
    pytest.importorskip("torch")
    # BatchNorm, PReLU's slopes, residual adds and clipping each written anew in JAX:
    for name in ("deep-sigmoid", "deep-sigmoid-batchnorm", "deep-prelu",
                 "deep-sigmoid-residual", "explode-repaired"):
        runs.assert_first_steps_agree_with_pytorch(name, tmp_path, "jax")


def test_the_model_is_the_spec():
    exp = ex.get("deep-sigmoid-batchnorm")
    params, stats = jx.build(exp)
    assert list(params) == ex.layer_names(exp)
    for i, (w, b) in enumerate(ex.initial_weights(exp)):
        layer = params[f"fc{i}" if i < exp.depth else "out"]
        assert np.array_equal(layer["kernel"], w) and np.array_equal(layer["bias"], b)
    assert np.all(np.asarray(stats["bn0"]["var"]) == 1)
    alpha = np.asarray(jx.build(ex.get("deep-prelu"))[0]["act0"]["alpha"])
    assert alpha.shape == (32,) and np.all(alpha == 0.25)  # PyTorch's PReLU(32, init=0.25)
