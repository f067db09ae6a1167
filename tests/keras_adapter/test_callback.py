"""The Keras callback's mechanics: compile modes, steps, names, reuse, restoring the optimizer,
mixed precision, sinks, options and asynchronous dispatch."""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    STEPS_PER_EPOCH,
    UNHEALTHY,
    StatsRecorder,
    circles,
    compiled,
    deep_sigmoid,
    finding_pairs,
    fit,
    jax_autodiff,
    mlp,
    moons,
    to_numpy,
)

import gradwatch
from gradwatch.keras import GradWatchCallback

# -- compile modes -----------------------------------------------------------------------------

#: run_eagerly exists on every backend; jit_compile=True (XLA) is TensorFlow's choice (JAX always
#: jits, torch never); steps_per_execution > 1 exists on TensorFlow and JAX (the torch backend
#: raises for it).
COMPILE_MODES = [pytest.param({"run_eagerly": True}, id="run-eagerly")]
if BACKEND == "tensorflow":
    COMPILE_MODES.append(pytest.param({"jit_compile": True}, id="xla"))
if BACKEND in ("tensorflow", "jax"):
    COMPILE_MODES.append(pytest.param({"steps_per_execution": 4}, id="steps-per-execution-4"))


@pytest.mark.parametrize("compile_kwargs", COMPILE_MODES)
def test_compile_modes_find_what_the_default_finds(compile_kwargs, deep_sigmoid_short):
    model = deep_sigmoid(**compile_kwargs)
    for key, value in compile_kwargs.items():
        assert getattr(model, key) == value  # the mode really is on
    run = fit(model, scale=100.0, epochs=4, callback=GradWatchCallback(check_every=5))
    assert run.report.steps == 4 * STEPS_PER_EPOCH
    assert finding_pairs(deep_sigmoid_short.findings) == {("vanishing_gradient", "d0"),
                                                          ("saturated_units", "d0")}
    assert finding_pairs(run.findings) == finding_pairs(deep_sigmoid_short.findings), run.report


def _with_check_step(stats, every):
    """The checks whose window holds a check step (a multiple of ``every``): where the weight
    statistics (update ratio, weight norm) are measured. The end-of-fit check of a partial
    window has none."""
    return [s for s in stats if any(int(t) % every == 0 for t in s.steps)]


@pytest.mark.parametrize("compile_kwargs", COMPILE_MODES)
def test_compile_modes_see_every_step_and_every_check_steps_update_ratios(compile_kwargs):
    model = compiled(mlp(2), **compile_kwargs)
    rec = StatsRecorder()
    run = fit(model, epochs=2, callback=GradWatchCallback(check_every=5, plugins=[rec]),
              sync=True)
    assert run.report.steps == 2 * STEPS_PER_EPOCH
    steps = np.concatenate([s.steps for s in rec.stats]).tolist()
    # Every step's gradient norms and loss reach the detectors exactly once, and so do the weight
    # statistics measured at each check step (5, 10, ..., 30).
    missing = sorted(set(range(1, 2 * STEPS_PER_EPOCH + 1)) - set(steps))
    measured = _with_check_step(rec.stats, 5)
    without_ratio = [s.step for s in measured
                     if s.update_ratio is None or not np.isfinite(s.update_ratio).all()]
    assert (missing, without_ratio) == ([], []), "(steps never seen, checks without ratios)"
    assert sorted(steps) == steps and len(measured) == 2 * STEPS_PER_EPOCH // 5


@pytest.mark.skipif(BACKEND == "torch", reason="the torch backend has no steps_per_execution > 1")
def test_steps_per_execution_beyond_the_check_interval_loses_no_step():
    # One batch end per 16 steps, a check every 5: most check steps fall inside an execution,
    # and a read comes up to 16 steps after the last one.
    rec = StatsRecorder()
    run = fit(compiled(mlp(2), steps_per_execution=16), epochs=3, sync=True,
              callback=GradWatchCallback(check_every=5, plugins=[rec]))
    n = 3 * STEPS_PER_EPOCH
    assert run.report.steps == n
    assert np.concatenate([s.steps for s in rec.stats]).tolist() == list(range(1, n + 1))
    # A check's check-step numbers are of its last step: the steps after it wait for the next.
    measured = [s for s in rec.stats if s.update_ratio is not None]
    assert [s.step for s in measured] == [15, 30, 45]
    for s in measured:
        assert (s.grad_norm_orthogonal <= s.last_grad_norm * (1 + 1e-6)).all()


def test_validation_batches_are_not_training_steps():
    xv, yv = circles(n=128, seed=1)
    model = compiled(mlp(2))
    rec = StatsRecorder()
    cb = GradWatchCallback(plugins=[rec])
    run = fit(model, epochs=4, callback=cb, validation_data=(xv, yv), sync=True)
    assert "val_loss" in run.history.history  # validation did run
    assert run.report.steps == 4 * STEPS_PER_EPOCH
    steps = np.concatenate([s.steps for s in rec.stats])
    assert steps.tolist() == list(range(1, 4 * STEPS_PER_EPOCH + 1))
    assert run.report.checks == math.ceil(4 * STEPS_PER_EPOCH / 10)


def test_partial_last_batch_is_a_step():
    x, y = circles(n=500)  # 15 batches of 32 and one of 20: a second trace on TensorFlow
    rec = StatsRecorder()
    run = fit(compiled(mlp(2)), (x, y), epochs=3, sync=True,
              callback=GradWatchCallback(check_every=5, plugins=[rec]))
    assert run.report.steps == 3 * 16
    steps = np.concatenate([s.steps for s in rec.stats])
    assert steps.tolist() == list(range(1, 3 * 16 + 1))
    assert all(np.isfinite(s.grad_norm).all() for s in rec.stats)


def test_loss_is_the_batch_loss_the_optimizer_sees():
    model = compiled(mlp(2))
    rec = StatsRecorder()
    fit(model, epochs=1, callback=GradWatchCallback(check_every=1, plugins=[rec]), sync=True)
    losses = np.concatenate([s.loss for s in rec.stats])
    assert len(losses) == STEPS_PER_EPOCH and np.isfinite(losses).all()
    # Per-batch losses, not Keras' running mean: they are not monotone smoothed values.
    assert np.std(np.diff(losses)) > 0
    assert 0.3 < losses[0] < 3


# -- what is measured --------------------------------------------------------------------------


def reference_grad_norms(model, x, y) -> dict[str, tuple[float, float]]:
    """Per layer: (L2 norm, max |g|) of the dense gradient of the mean loss, by the backend's own
    autodiff (TensorFlow hands embeddings IndexedSlices; converting sums duplicate rows)."""
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
    weights = model.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = [to_numpy(tf.convert_to_tensor(g)) for g in tape.gradient(loss, weights)]
    elif BACKEND == "jax":
        grads = jax_autodiff(model, x, lambda out: loss_fn(y, out))[2]
    else:
        import torch

        loss = loss_fn(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
        grads = [to_numpy(g) for g in torch.autograd.grad(loss, [w.value for w in weights])]
    out: dict[str, tuple[float, float]] = {}
    for layer in model.layers:
        gs = [g for w, g in zip(weights, grads) if any(w is v for v in layer.trainable_weights)]
        if gs:
            out[layer.name] = (float(np.sqrt(sum(np.sum(g.astype("float64") ** 2) for g in gs))),
                               float(max(np.abs(g).max() for g in gs)))
    return out


def embedding_model() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """Token ids from a vocabulary of 5 in sequences of 12: every batch repeats tokens."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, (64, 12)).astype("int32")
    y = (tokens.sum(axis=1) > 24).astype("float32")
    inputs = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(5, 8, name="embed")(inputs)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h), name="bag"), tokens, y


def mlp_model() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    x, y = circles(n=64)
    return mlp(3, activation="tanh"), x, y


@pytest.mark.parametrize("build", [pytest.param(mlp_model, id="dense-mlp"),
                                   pytest.param(embedding_model, id="embedding-repeated-tokens")])
def test_gradient_statistics_are_those_of_the_gradient_the_optimizer_applies(build):
    model, x, y = build()
    compiled(model, lr=0.0)  # the weights stay put: every step's gradient is the first one's
    rec = StatsRecorder()
    fit(model, (x, y), epochs=1, batch_size=len(x), shuffle=False, sync=True,
        callback=GradWatchCallback(check_every=1, plugins=[rec]))
    reference = reference_grad_norms(model, x, y)
    [stats] = rec.stats
    assert list(stats.layers) == list(reference)
    np.testing.assert_allclose(stats.grad_norm[0], [n for n, _ in reference.values()], rtol=1e-4)
    np.testing.assert_allclose(stats.grad_max, [m for _, m in reference.values()], rtol=1e-4)


# -- per-step cost ------------------------------------------------------------------------------


def _traced_step_ops(model, x, y) -> collections.Counter:
    """Op types of the train step traced now, outside any cond branch (what every step runs)."""
    import tensorflow as tf

    step = tf.function(model.train_step)
    graph = step.get_concrete_function((tf.constant(x), tf.constant(y))).graph
    return collections.Counter(op.type for op in graph.get_operations())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="graph mode (tf.function) is TensorFlow's")
def test_traced_step_adds_three_conds_and_one_norm_per_variable_whatever_the_activation_sites():
    # Six ReLU activation sites: their sampling lives inside the check step's cond, so steps that
    # sample nothing pay nothing per site; every step pays one l2_loss per gradient.
    model = compiled(mlp(6))
    x, y = circles(n=64)
    fit(model, (x, y), epochs=1, callback=None)  # builds the model and optimizer
    plain = _traced_step_ops(model, x, y)
    cb = GradWatchCallback()
    cb.set_model(model)
    cb.on_train_begin()
    try:
        added = _traced_step_ops(model, x, y) - plain
    finally:
        cb.on_train_end()
    # The check step's two conds, and one whose float64 branch runs only when a float32 sum of
    # squares was not finite (an overflow of a finite gradient, or NaN/Inf in it).
    assert added["If"] + added["StatelessIf"] == 3, added
    assert added["L2Loss"] == len(model.trainable_weights), added
    assert added["ResourceScatterUpdate"] == 1, added  # this step's row of the ring buffer
    # A fixed number of scalar ops besides (the overflow test is IsFinite, All and the cond).
    assert sum(added.values()) <= len(model.trainable_weights) + 45, added


# -- names -------------------------------------------------------------------------------------


def nested_model() -> keras.Model:
    """A Sequential named "block" (10 sigmoid layers) inside a functional model."""
    block = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(32, activation="sigmoid", name="d_in")]
        + [keras.layers.Dense(32, activation="sigmoid", name=f"d{i}") for i in range(1, 10)],
        name="block")
    inputs = keras.Input((2,))
    outputs = keras.layers.Dense(1, name="head")(block(inputs))
    return keras.Model(inputs, outputs, name="outer")


def test_nested_model_layers_are_named_by_their_path_in_depth_order():
    model = compiled(nested_model(), lr=0.1)
    run = fit(model, scale=100.0)
    names = [r.name for r in run.report.layers]
    assert names == ["block/d_in"] + [f"block/d{i}" for i in range(1, 10)] + ["head"]
    f = run.first("vanishing_gradient")
    assert f.layer == "block/d_in"
    assert "saturated_units" in run.kinds
    assert run.first("saturated_units").layer == "block/d_in"


class TwoDense(keras.layers.Layer):
    """A custom layer owning two Dense sub-layers."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(units, activation="relu", name="inner")
        self.proj = keras.layers.Dense(units, name="proj")

    def build(self, input_shape):
        self.inner.build(input_shape)
        self.proj.build((*input_shape[:-1], self.inner.units))

    def call(self, x):
        return self.proj(self.inner(x))


def test_sub_layers_of_a_custom_layer_are_named_by_their_path():
    inputs = keras.Input((2,))
    h = keras.layers.Dense(16, activation="relu", name="stem")(inputs)
    h = TwoDense(16, name="pair")(h)
    outputs = keras.layers.Dense(1, name="head")(h)
    model = compiled(keras.Model(inputs, outputs, name="custom"))
    run = fit(model, epochs=2)
    assert [r.name for r in run.report.layers] == ["stem", "pair/inner", "pair/proj", "head"]
    assert all(math.isfinite(r.grad_norm) for r in run.report.layers)


# -- reuse and restoring the model -------------------------------------------------------------


def test_callback_reused_across_fits_reports_each_fit_on_its_own():
    cb = GradWatchCallback()
    first = fit(deep_sigmoid(), scale=100.0, epochs=3, callback=cb)
    first_findings = list(first.findings)
    assert "vanishing_gradient" in {f.kind for f in first_findings}
    assert first.report.steps == 3 * STEPS_PER_EPOCH

    # The same instance on a healthy model: the findings and the step count start over.
    healthy = compiled(mlp(3, init="he_normal"))
    second = fit(healthy, epochs=3, callback=cb)
    assert cb.model is None  # released when the fit ended (the report is about `healthy`)
    assert second.report.steps == 3 * STEPS_PER_EPOCH
    assert second.report.checks == math.ceil(3 * STEPS_PER_EPOCH / 10)
    assert not second.kinds & UNHEALTHY, second.report
    assert [r.name for r in second.report.layers] == ["d0", "d1", "d2", "out"]
    assert first_findings and not set(map(id, first_findings)) & set(map(id, cb.findings))


def test_callback_reused_on_the_same_model_counts_only_its_own_steps():
    model = deep_sigmoid()
    rec = StatsRecorder()
    cb = GradWatchCallback(plugins=[rec])
    fit(model, scale=100.0, epochs=3, callback=cb, sync=True)
    rec.stats.clear()
    run = fit(model, scale=100.0, epochs=3, callback=cb, sync=True)
    assert run.report.steps == 3 * STEPS_PER_EPOCH
    steps = np.concatenate([s.steps for s in rec.stats])
    assert steps.tolist() == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert all(f.step <= 3 * STEPS_PER_EPOCH for f in run.findings)
    # Still starved: found again within this fit, from this fit's own checks.
    assert run.first("vanishing_gradient").layer == "d0"


def test_new_callback_for_each_fit_of_the_same_model():
    model = deep_sigmoid()
    first = fit(model, scale=100.0, epochs=3)
    second = fit(model, scale=100.0, epochs=2)
    assert first.callback is not second.callback
    assert first.report.steps == 3 * STEPS_PER_EPOCH  # the first report is left alone
    assert second.report.steps == 2 * STEPS_PER_EPOCH
    for run in (first, second):
        assert run.first("vanishing_gradient").layer == "d0"


def _gradwatch_attributes(model: keras.Model) -> list[str]:
    left = [a for a in ("apply", "scale_loss") if a in vars(model.optimizer)]
    inner = getattr(model.optimizer, "inner_optimizer", None)
    if inner is not None:
        left += [f"inner.{a}" for a in ("apply",) if a in vars(inner)]
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if "call" in vars(layer):
            left.append(f"{layer.name}.call")
        act = getattr(layer, "activation", None)
        if act is not None and getattr(act, "__module__", "").startswith("gradwatch"):
            left.append(f"{layer.name}.activation")
    return left


def test_plain_fit_after_a_watched_fit_trains_normally_without_gradwatch():
    model = compiled(mlp(3, init="he_normal"), lr=0.1)
    activation = model.get_layer("d0").activation
    weights = len(model.weights)
    fit(model, epochs=2)
    assert _gradwatch_attributes(model) == []
    assert model.get_layer("d0").activation is activation
    assert len(model.weights) == weights  # gradwatch's state is not part of the model
    plain = fit(model, epochs=6, callback=None)
    losses = plain.history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert _gradwatch_attributes(model) == []


def test_watching_does_not_change_training():
    def history(callback):
        keras.utils.set_random_seed(0)
        model = compiled(mlp(3, init="he_normal"), lr=0.1)
        return fit(model, epochs=4, callback=callback).history.history["loss"]

    np.testing.assert_allclose(history("new"), history(None), rtol=1e-5)


def test_watched_fit_after_a_plain_fit_sees_its_steps():
    model = compiled(mlp(3, init="he_normal"))
    fit(model, epochs=1, callback=None)  # the train function is traced without gradwatch
    rec = StatsRecorder()
    run = fit(model, epochs=3, callback=GradWatchCallback(plugins=[rec]), sync=True)
    assert run.report.steps == 3 * STEPS_PER_EPOCH
    assert rec.stats and all(np.isfinite(s.grad_norm).all() for s in rec.stats)


def test_strict_mode_raises_from_fit_and_leaves_the_model_as_it_was():
    model = deep_sigmoid()
    activation = model.get_layer("d0").activation
    cb = GradWatchCallback(on_finding="raise")
    with pytest.raises(gradwatch.GradientHealthError) as info:
        fit(model, scale=100.0, epochs=3, callback=cb)
    assert info.value.finding.kind == "vanishing_gradient"
    assert info.value.finding.layer == "d0"
    # fit() was interrupted, so Keras never called on_train_end: the wrappers must not outlive it.
    assert _gradwatch_attributes(model) == []
    assert model.get_layer("d0").activation is activation


# -- mixed precision ---------------------------------------------------------------------------


def _first_check_norms(policy: str) -> tuple[np.ndarray, gradwatch.Report]:
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    model = compiled(mlp(3, init="he_normal"), lr=0.05)
    rec = StatsRecorder()
    run = fit(model, epochs=3, callback=GradWatchCallback(plugins=[rec]), sync=True)
    assert rec.stats
    for s in rec.stats:
        assert np.isfinite(s.grad_norm).all() and np.isfinite(s.loss).all()
    measured = _with_check_step(rec.stats, 10)
    assert measured
    for s in measured:
        assert np.isfinite(s.weight_norm).all() and np.isfinite(s.update_ratio).all()
    assert all(math.isfinite(r.grad_norm) for r in run.report.layers)
    assert run.report.internal_errors == ()
    assert not run.kinds & UNHEALTHY, run.report
    return rec.stats[0].grad_norm[0], run.report


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_statistics_are_finite_and_unscaled(policy, float32_policy):
    reference, _ = _first_check_norms("float32")
    norms, report = _first_check_norms(policy)
    # Same data, same initial weights: the first step's gradient has the float32 run's size
    # (a loss-scaled gradient would be thousands of times larger).
    np.testing.assert_allclose(norms, reference, rtol=0.1)
    assert [r.name for r in report.layers] == ["d0", "d1", "d2", "out"]


# -- models without anything to watch ----------------------------------------------------------


def test_model_without_trainable_weights_fits_without_errors():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="frozen")])
    model.get_layer("frozen").trainable = False
    compiled(model)
    run = fit(model, epochs=2)
    assert len(run.history.history["loss"]) == 2
    assert run.report.internal_errors == ()
    assert run.report.layers == ()
    assert run.findings == []
    str(run.report)  # renders


# -- gradwatch.watch ---------------------------------------------------------------------------


def test_watch_returns_a_callback_bound_to_the_keras_model():
    model = deep_sigmoid()
    if BACKEND == "torch":
        import torch

        # The torch adapter must decline a Keras model even though it is a torch Module.
        assert isinstance(model, torch.nn.Module)
    cb = gradwatch.watch(model, check_every=5)
    assert isinstance(cb, GradWatchCallback)
    assert cb.model is model
    assert cb.monitor.check_every == 5
    run = fit(model, scale=100.0, epochs=3, callback=cb)
    assert run.first("vanishing_gradient").layer == "d0"
    assert run.report.framework == f"keras/{BACKEND}"


def test_watch_passes_bad_options_on_as_errors():
    with pytest.raises(ValueError, match="check_every"):
        gradwatch.watch(compiled(mlp(1)), check_every=0)


# -- sinks -------------------------------------------------------------------------------------


def test_train_end_logs_a_summary(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    run = fit(deep_sigmoid(), scale=100.0, epochs=3)
    summaries = [r for r in caplog.records
                 if r.name == "gradwatch" and "gradwatch summary" in r.getMessage()]
    assert len(summaries) == 1
    text = summaries[0].getMessage()
    assert f"keras/{BACKEND}" in text and "48 optimizer steps" in text
    assert "vanishing_gradient" in text and "d0" in text
    # Each finding was logged when it started, as well as warned.
    assert any("VanishingGradientWarning" in r.getMessage() for r in caplog.records)
    assert run.caught


def test_on_finding_log_writes_warning_records_instead_of_warnings(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    run = fit(deep_sigmoid(), scale=100.0, epochs=3, callback=GradWatchCallback(on_finding="log"))
    assert run.caught == []
    warned = [r for r in caplog.records if r.name == "gradwatch" and r.levelno == logging.WARNING]
    assert any("d0" in r.getMessage() and "VanishingGradientWarning" in r.getMessage()
               for r in warned)


def test_event_file_has_start_stats_findings_and_end(tmp_path):
    path = tmp_path / "run.jsonl"
    run = fit(deep_sigmoid(), scale=100.0, epochs=3,
              callback=GradWatchCallback(events=path, name="deep-sigmoid"), sync=True)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("start") == 1 and kinds.count("end") == 1
    assert kinds.count("stats") == run.report.checks == 5
    start = events[0]
    assert start["run"] == "deep-sigmoid" and start["framework"] == f"keras/{BACKEND}"
    assert [layer["name"] for layer in start["layers"]] == [f"d{i}" for i in range(10)] + ["out"]
    findings = [e for e in events if e["event"] == "finding"]
    assert {(e["kind"], e["layer"]) for e in findings} == finding_pairs(run.findings)
    assert ("vanishing_gradient", "d0") in {(e["kind"], e["layer"]) for e in findings}
    assert events[-1]["step"] == 48 and events[-1]["summary"]["steps"] == 48


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("options, error, name", [
    pytest.param({"check_every": 0}, ValueError, "check_every", id="check_every-0"),
    pytest.param({"check_every": "10"}, TypeError, "check_every", id="check_every-str"),
    pytest.param({"update_ratio": "x"}, ValueError, "update_ratio", id="update_ratio-x"),
    pytest.param({"sample_fraction": 0.0}, ValueError, "sample_fraction", id="sample_fraction-0"),
    pytest.param({"sample_fraction": 2.0}, ValueError, "sample_fraction", id="sample_fraction-2"),
    pytest.param({"activation_every": 15}, ValueError, "activation_every",
                 id="activation_every-not-a-multiple"),
    pytest.param({"on_finding": "shout"}, ValueError, "on_finding", id="on_finding-unknown"),
    pytest.param({"events": 3}, TypeError, "events", id="events-not-a-path"),
    pytest.param({"bogus": 1}, TypeError, "bogus", id="unknown-option"),
    pytest.param({"scaler": None}, TypeError, "scaler", id="torch-only-option"),
])
def test_bad_options_raise_naming_the_parameter(options, error, name):
    with pytest.raises(error, match=name):
        GradWatchCallback(**options)


def test_uncompiled_model_is_an_internal_error_not_a_crash():
    cb = GradWatchCallback()
    cb.set_model(mlp(1))
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="compiled"):
        cb.on_train_begin()
    assert cb.report().internal_errors


# -- asynchronous dispatch ---------------------------------------------------------------------


def test_callback_declares_async_safe():
    assert GradWatchCallback.async_safe is True
    assert GradWatchCallback().async_safe is True


@pytest.mark.parametrize("build, lr, scale, kind", [
    pytest.param(lambda: mlp(10, activation="sigmoid"), 0.1, 100.0, "vanishing_gradient",
                 id="deep-sigmoid"),
    pytest.param(lambda: mlp(3, init="he_normal"), 1e-7, 1.0, "stalled_update", id="tiny-lr"),
])
def test_async_dispatch_finds_what_sync_dispatch_finds(build, lr, scale, kind):
    def run(sync):
        keras.utils.set_random_seed(0)
        model = compiled(build(), lr=lr)
        rec = StatsRecorder()
        run = fit(model, scale=scale, epochs=4, callback=GradWatchCallback(plugins=[rec]),
                  sync=sync)
        return run, rec

    async_run, async_rec = run(sync=False)  # gradwatch plus Keras' defaults: async where allowed
    sync_run, sync_rec = run(sync=True)
    # In eager mode (the PyTorch backend) gradwatch checks inside the training step, so even
    # with Keras' asynchronous batch-end dispatch its checks run in the training thread; in
    # graph mode they run at batch end, which TensorFlow dispatches synchronously.
    assert set(async_rec.threads) == set(sync_rec.threads) == {threading.main_thread().name}
    assert async_run.first(kind).layer == "d0"
    assert finding_pairs(async_run.findings) == finding_pairs(sync_run.findings)


#: Keras hands batch ends of async-safe callbacks to a thread pool only on the backends it deems
#: thread-safe (PyTorch, JAX), not on TensorFlow.
ASYNC_DISPATCH = bool(getattr(keras.src.backend, "IS_THREAD_SAFE", False))


class SlowAsyncCallback(keras.callbacks.Callback):
    """An async-safe callback whose batch end takes a while (an upload, a disk write): Keras'
    dispatch pool falls behind the training loop until the epoch ends."""

    async_safe = True

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


@pytest.mark.skipif(not ASYNC_DISPATCH,
                    reason="this Keras backend dispatches batch ends synchronously "
                           "(keras.src.backend.IS_THREAD_SAFE is false): nothing runs behind "
                           "the loop")
def test_async_dispatch_behind_the_training_loop_loses_no_steps():
    # 64 steps per epoch; each batch end waits 0.1 s, a step takes a few ms: by the epoch's
    # end the dispatch pool is dozens of steps behind. The training thread does not wait.
    rec = StatsRecorder()
    cb = GradWatchCallback(plugins=[rec])
    run = fit(compiled(mlp(3, init="he_normal")), circles(n=2048), epochs=2, callback=cb,
              before=(SlowAsyncCallback(0.1),))
    assert run.report.steps == 2 * 64
    steps = np.concatenate([s.steps for s in rec.stats]).tolist()
    assert sorted(set(range(1, 2 * 64 + 1)) - set(steps)) == []  # none missing
    assert sorted(steps) == steps and len(set(steps)) == len(steps)  # in order, once each


class BatchEndThreads(GradWatchCallback):
    """GradWatchCallback that notes the thread each of its batch ends runs on (still async-safe)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.batch_end_threads: list[str] = []

    def on_train_batch_end(self, batch, logs=None):
        self.batch_end_threads.append(threading.current_thread().name)
        super().on_train_batch_end(batch, logs)


@pytest.mark.parametrize("check_every, update_ratio", [
    pytest.param(1, "exact", id="every-step-exact"),  # the reference experiments' settings
    pytest.param(5, "sampled", id="every-5-sampled"),
])
def test_async_dispatch_alone_loses_no_step_check_or_sample(check_every, update_ratio):
    # GradWatchCallback is the only callback with a batch end, so Keras dispatches batch ends to
    # its thread pool (where the backend allows it). 3 epochs of 16 batches, the last of each
    # epoch partial: every step, check, check-step measurement and activation sample arrives,
    # once, in order.
    epochs, batches = 3, 16
    n = epochs * batches
    rec = StatsRecorder()
    cb = BatchEndThreads(check_every=check_every, update_ratio=update_ratio, plugins=[rec])
    run = fit(compiled(mlp(3, init="he_normal")), circles(n=500), epochs=epochs, callback=cb)
    assert len(cb.batch_end_threads) == n
    if ASYNC_DISPATCH:
        assert threading.main_thread().name not in cb.batch_end_threads  # dispatched async
    assert run.report.steps == n
    assert run.report.checks == len(rec.stats) == math.ceil(n / check_every)
    assert np.concatenate([s.steps for s in rec.stats]).tolist() == list(range(1, n + 1))
    assert np.isfinite(np.concatenate([s.loss for s in rec.stats])).all()
    measured = [s for s in rec.stats if s.step % check_every == 0]
    assert len(measured) == n // check_every
    for s in measured:  # the check step's own numbers, measured at that step
        assert np.isfinite(s.update_ratio).all() and np.isfinite(s.weight_norm).all()
        assert np.isfinite(s.grad_max).all() and np.isfinite(s.grad_norm_orthogonal).all()
    every = 5 * check_every  # activation_every's default
    assert [s.step for s in rec.stats if s.activations] == list(range(every, n + 1, every))


def test_moons_relu_run_is_quiet():
    # A second data set: the detectors do not depend on the circles geometry.
    model = compiled(mlp(4, init="he_normal"), lr=0.1)
    run = fit(model, moons(), epochs=8)
    assert not run.kinds & UNHEALTHY, run.report
    assert run.last_loss < 0.3


def test_an_unsupported_backend_is_said_once_not_watched_in_silence(monkeypatch, caplog):
    # Keras' OpenVINO backend (inference only) is not watched: the callback says so at
    # on_train_begin, once per callback, instead of training with no finding at all.
    model = compiled(mlp(2))
    cb = GradWatchCallback()
    cb.set_model(model)
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        cb.on_train_begin()
        cb.on_train_begin()  # a second fit
    said = [r for r in caplog.records if "does not watch Keras on the 'openvino' backend" in r.message]
    assert len(said) == 1 and cb._fit is None
