"""GradWatchCallback(guard="skip"): a step whose gradients are not finite is not applied,
inside compiled ``fit`` (TensorFlow graph, JAX's jitted train step) and eagerly (the PyTorch
backend, ``run_eagerly``).

Each test labels its run with its own evidence: without the guard the same NaN batch makes the
weights NaN, and the state compared is Keras' own (every optimizer variable: ``iterations``,
Adam's moments)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from conftest import circles, mlp

import gradwatch
from gradwatch.keras import GradWatchCallback

BAD_STEP = 7  # the optimizer step (1-based) whose batch holds a NaN
BATCH = 32


def data(steps: int = 48):
    x, y = circles(n=steps * BATCH)
    x = x.astype("float32")
    x[(BAD_STEP - 1) * BATCH + 3, 0] = np.nan
    return x, y


class Snapshots(keras.callbacks.Callback):
    """Every variable of the model and its optimizer after each batch end it sees (not
    gradwatch's own: on the JAX backend its state rides in the optimizer's variables during
    ``fit``)."""

    def __init__(self):
        super().__init__()
        self.after: dict[int, list[np.ndarray]] = {}

    def on_train_batch_end(self, batch, logs=None):
        variables = self.model.weights + [v for v in self.model.optimizer.variables
                                          if "gradwatch" not in v.path]
        self.after[batch + 1] = [np.array(keras.ops.convert_to_numpy(v)) for v in variables]


def train(guard, *, steps_per_execution=1, run_eagerly=False, jit_compile="auto"):
    keras.utils.set_random_seed(0)
    model = mlp(3, width=16)
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution, run_eagerly=run_eagerly,
                  jit_compile=jit_compile)
    x, y = data()
    clean = np.nan_to_num(x[:512])
    start_loss = model.evaluate(clean, y[:512], verbose=0)
    cb = GradWatchCallback(guard=guard, check_every=4)
    snaps = Snapshots()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[cb, snaps])
    told = [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)]
    end_loss = model.evaluate(clean, y[:512], verbose=0)
    return dict(model=model, cb=cb, snaps=snaps.after, told=told, start_loss=start_loss,
                end_loss=end_loss)


def finite(model) -> bool:
    return all(np.isfinite(keras.ops.convert_to_numpy(w)).all() for w in model.weights)


def test_without_the_guard_the_nan_batch_ruins_the_weights():
    run = train("off")
    assert not finite(run["model"])
    assert run["cb"].report().skipped_steps == 0


MODES = [dict(), dict(run_eagerly=True)]
if keras.backend.backend() != "torch":  # (the PyTorch backend runs one step at a time)
    MODES.append(dict(steps_per_execution=4))
if keras.backend.backend() == "tensorflow":  # (JAX always compiles with XLA)
    MODES.append(dict(jit_compile=True))


@pytest.mark.parametrize("mode", MODES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items())
                         or "compiled")
def test_the_guard_skips_the_nan_step_and_training_goes_on(mode):
    run = train("skip", **mode)
    model, report = run["model"], run["cb"].report()
    assert finite(model)
    assert report.skipped_steps == 1
    (finding,) = [f for f in report.findings if f.kind == "nonfinite"]
    assert finding.is_warning and finding.step == BAD_STEP and finding.layer == "d0"
    assert finding.evidence["skipped"] is True
    assert finding.evidence["batch_id"] == BAD_STEP - 1  # Keras' batch number in the epoch
    assert [w.category for w in run["told"]] == [gradwatch.NonFiniteWarning]
    # the skipped step is no step: 47 updates of 48 batches, and the run went on learning
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 47
    assert report.steps == 47
    assert run["end_loss"] < 0.8 * run["start_loss"]


@pytest.mark.parametrize("mode", [dict(), dict(run_eagerly=True)], ids=["compiled", "eager"])
def test_the_skipped_step_leaves_weights_and_optimizer_state_bit_for_bit(mode):
    snaps = train("skip", **mode)["snaps"]
    before, after = snaps[BAD_STEP - 1], snaps[BAD_STEP]
    assert len(before) == len(after) > 10  # weights, iterations, Adam's two moments per weight
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


def test_bad_guard_values_are_refused_by_name():
    with pytest.raises(ValueError, match="guard"):
        GradWatchCallback(guard="yes")


def test_a_warnings_window_names_each_steps_batch_in_its_epoch(tmp_path):
    # Two epochs of 48 batches; without the guard the NaN batch (batch 6 of each epoch) turns
    # into a nonfinite warning whose window in the event file numbers each step's batch.
    from gradwatch._events import read_runs

    keras.utils.set_random_seed(0)
    model = mlp(2, width=8)
    model.compile(optimizer=keras.optimizers.SGD(1e-2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    x, y = data()
    path = tmp_path / "run.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0,
                  callbacks=[GradWatchCallback(check_every=8, events=str(path))])
    [run] = read_runs(path)
    window = next(w for w in run.windows if w["kind"] == "nonfinite")
    steps = window["steps"].tolist()
    assert window["batch_ids"] == [(s - 1) % 48 for s in steps]  # the label: 48 batches an epoch
    assert BAD_STEP in steps
