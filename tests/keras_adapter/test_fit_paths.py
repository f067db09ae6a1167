"""Ways of training with Keras that users take besides a plain ``fit``: a custom ``train_step``,
``evaluate``/``predict`` (and validation) during ``fit``, and ``gradient_accumulation_steps``.
Each is compared with a plain ``fit`` of the same model, weights and batches, which the other
tests check against hand computations: where the two are one computation, gradwatch must report
the same numbers."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
from conftest import BACKEND, StatsRecorder, circles, compiled, fit, mlp

from gradwatch.keras import GradWatchCallback

OPTIONS = dict(check_every=5, activation_every=5, update_ratio="exact")
#: Statistics compared between two runs that are the same computation on the same backend
#: (same traced ops, same order): they agree to rounding or exactly.
COMPARED = ("steps", "loss", "grad_norm", "grad_max", "weight_norm", "update_ratio",
            "weight_change", "grad_norm_orthogonal")


class CustomStep(keras.Sequential):
    """A custom ``train_step`` in the shape Keras' guides give it, on either backend: the
    backend's own autodiff, then ``optimizer.apply``. With ``scale_loss`` it passes the loss
    through ``optimizer.scale_loss`` (as Keras' own train_step does); without, it does not."""

    scale_loss = True

    def train_step(self, *args):
        if BACKEND == "jax":
            return self._jax_train_step(*args)
        x, y = args[0]
        if BACKEND == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
                if self.scale_loss:
                    loss = self.optimizer.scale_loss(loss)
            grads = tape.gradient(loss, self.trainable_variables)
        else:
            self.zero_grad()
            loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
            if self.scale_loss:
                loss = self.optimizer.scale_loss(loss)
            loss.backward()
            grads = [v.value.grad for v in self.trainable_variables]
        self.optimizer.apply(grads, self.trainable_variables)
        return {"loss": loss}

    def _jax_train_step(self, state, data):
        # JAX: the stateless form of Keras' guide, loss tracked with Keras' own loss tracker
        # (which is where gradwatch reads the loss on JAX) only with ``scale_loss``.
        import jax

        tv, ntv, ov, mv = state
        x, y = data

        def loss_fn(tv):
            y_pred, new_ntv = self.stateless_call(tv, ntv, x, training=True)
            loss, (_, _, new_mv) = self.stateless_compute_loss(tv, new_ntv, mv, x=x, y=y,
                                                               y_pred=y_pred, training=True)
            return loss, (new_ntv, new_mv)

        (loss, (ntv, mv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(tv)
        tv, ov = self.optimizer.stateless_apply(ov, grads, tv)
        if self.scale_loss:
            mapping = list(zip(self.metrics_variables, mv))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                self._loss_tracker.update_state(loss, sample_weight=x.shape[0])
            new = [scope.get_current_value(v) for v in self.metrics_variables]
            mv = [value if value is not None else old for value, old in zip(new, mv)]
        return {"loss": loss}, (tv, ntv, ov, mv)


def twin_of(model: keras.Sequential, cls: type) -> keras.Sequential:
    """The same architecture as ``cls``, with ``model``'s weights."""
    twin = cls.from_config(model.get_config())
    twin.set_weights(model.get_weights())
    return compiled(twin)


def stats_of(model, epochs=2, **fit_kwargs):
    rec = StatsRecorder()
    fit(model, epochs=epochs, shuffle=False, sync=True,
        callback=GradWatchCallback(plugins=[rec], **OPTIONS), **fit_kwargs)
    return rec.stats


def assert_same_stats(a, b, rtol=1e-6):
    assert [s.step for s in a] == [s.step for s in b] and a
    for sa, sb in zip(a, b):
        assert sa.layers == sb.layers
        for name in COMPARED:
            va, vb = getattr(sa, name), getattr(sb, name)
            assert (va is None) == (vb is None), f"{name} at check {sa.step}"
            if va is not None:
                np.testing.assert_allclose(va, vb, rtol=rtol, err_msg=f"{name} at {sa.step}")
        assert {k: (v.dead_fraction, v.saturated_fraction) for k, v in sa.activations.items()} \
            == {k: (v.dead_fraction, v.saturated_fraction) for k, v in sb.activations.items()}


def test_a_custom_train_step_that_calls_apply_is_watched_like_fit():
    plain = compiled(mlp(3, activation="tanh"))
    custom = twin_of(plain, CustomStep)
    a, b = stats_of(plain), stats_of(custom)
    assert_same_stats(a, b, rtol=1e-5)  # (the custom step is traced apart: rounding may differ)
    assert all(s.has_loss.all() for s in b) and len(b[0].activations) == 3


def test_a_custom_train_step_without_scale_loss_is_watched_and_says_the_loss_is_unseen(caplog):
    plain = compiled(mlp(3, activation="tanh"))
    no_loss = type("NoScaleLoss", (CustomStep,), {"scale_loss": False})
    custom = twin_of(plain, no_loss)
    with caplog.at_level(logging.WARNING, logger="gradwatch"):
        b = stats_of(custom)
    a = stats_of(plain)
    for sa, sb in zip(a, b):  # the gradients are the same; only the loss is missing
        np.testing.assert_allclose(sb.grad_norm, sa.grad_norm, rtol=1e-5)
        assert not sb.has_loss.any() and np.isnan(sb.loss).all()
    said = [r.getMessage() for r in caplog.records if "no loss" in r.getMessage()]
    fix = "loss tracker" if BACKEND == "jax" else "optimizer.scale_loss"
    assert len(said) == 1 and fix in said[0], said  # once, with the fix


class EvaluateAndPredict(keras.callbacks.Callback):
    """Runs ``evaluate`` and ``predict`` on the training model at every epoch end (as users'
    own callbacks do for custom metrics or sample outputs)."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y = x, y
        self.runs = 0

    def on_epoch_end(self, epoch, logs=None):
        self.model.evaluate(self.x, self.y, verbose=0)
        self.model.predict(self.x, verbose=0)
        self.runs += 1


def test_evaluate_predict_and_validation_during_fit_are_not_training_steps():
    """Validation, evaluate and predict run the same layers (and the wrapped activations) but
    never call ``apply``: the steps, the numbers and the activation samples are those of a
    fit without them."""
    x, y = circles(seed=1)
    plain = compiled(mlp(3, activation="relu", init="he_normal"))
    busy = twin_of(plain, keras.Sequential)
    side = EvaluateAndPredict(x[:64] * 50.0, y[:64])  # inputs x50: their activations differ
    a = stats_of(plain, epochs=3)
    b = stats_of(busy, epochs=3, validation_data=(x[:64] * 50.0, y[:64]), callbacks=(side,))
    assert side.runs == 3
    assert [s.steps[-1] for s in b][-1] == 3 * 16
    assert_same_stats(a, b)


@pytest.mark.parametrize("check_every", [5, 10])
def test_gradient_accumulation_counts_every_apply_and_reads_no_ratio_where_weights_stay(
        check_every):
    """``gradient_accumulation_steps=2``: every ``apply`` is a step (its gradient is the
    micro-batch's); the weights move on every second one only, so a check on an accumulating
    step reports no update ratio rather than a zero that reads as a stalled update. (Before
    the fix the step counter was read once, and gradwatch saw 1 step of 64.)"""
    model = mlp(3, activation="tanh")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05,
                                                 gradient_accumulation_steps=2),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True))
    rec = StatsRecorder()
    run = fit(model, epochs=4, sync=True,
              callback=GradWatchCallback(plugins=[rec], check_every=check_every))
    assert run.report.steps == 4 * 16 and int(model.optimizer.iterations) == 2 * 16
    # (and the end of fit checks the steps since the last check)
    assert [s.step for s in rec.stats] == sorted({*range(check_every, 65, check_every), 64})
    for s in rec.stats:
        assert s.has_grad.all() and s.has_loss.all()
        if s.step % check_every:  # the end-of-fit check: per-step norms and losses only
            assert s.update_ratio is None and s.grad_max is None
        elif s.step % 2:
            assert s.update_ratio is None, s.step
        else:
            assert (s.update_ratio > 0).all(), s.step
    assert "stalled_update" not in run.kinds, run.report
