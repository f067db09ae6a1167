"""What is particular to the JAX backend: the state matrix rides in the optimizer's variables for
the duration of ``fit``, and the batch loss and the activations are written by a wrapped
``train_step`` (the forward pass runs inside ``jax.value_and_grad``)."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from conftest import BACKEND, StatsRecorder, circles, compiled, fit, mlp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.keras import GradWatchCallback  # noqa: E402

pytestmark = pytest.mark.skipif(BACKEND != "jax", reason="the JAX backend's own paths")


def test_the_optimizer_and_the_model_are_left_as_they_were():
    model = compiled(mlp(3))
    model.build((None, 2))
    model.optimizer.build(model.trainable_variables)
    before = [v.path for v in model.optimizer.variables]
    fit(model, epochs=2, callback=GradWatchCallback(check_every=5))
    assert [v.path for v in model.optimizer.variables] == before
    assert not {"train_step", "_update_metrics_variables"} & set(vars(model))  # the class's own
    # A plain fit afterwards trains as ever, and saving sees only the user's variables.
    model.fit(*circles(n=64), epochs=1, verbose=0)
    assert not any("gradwatch" in v.path for v in model.optimizer.variables)


def test_the_batch_loss_is_each_batchs_own_loss():
    # With a learning rate of 0 the weights never move, so each batch's loss can be recomputed
    # independently: gradwatch must report exactly it (not Keras' running mean in the logs).
    model = compiled(mlp(2), lr=0.0)
    x, y = circles(n=256)
    rec = StatsRecorder()
    fit(model, (x, y), epochs=1, shuffle=False, batch_size=32,
        callback=GradWatchCallback(check_every=4, plugins=[rec]))
    got = np.concatenate([s.loss for s in rec.stats])
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
    want = [float(loss_fn(y[i:i + 32], model(x[i:i + 32], training=True)))
            for i in range(0, 256, 32)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    running = np.cumsum(want) / np.arange(1, 9)  # what the logs show
    assert not np.allclose(got[1:], running[1:], rtol=1e-3)


def test_strict_mode_stops_fit_and_leaves_the_optimizer_clean():
    model = compiled(mlp(8, activation="sigmoid", init="glorot_uniform"))
    n = len(model.optimizer.variables)
    with pytest.raises(gradwatch.GradientHealthError) as raised:
        fit(model, scale=100.0, epochs=20,
            callback=GradWatchCallback(check_every=5, on_finding="raise"))
    assert raised.value.finding.kind in {"vanishing_gradient", "saturated_units"}
    assert raised.value.finding.step < 20 * 16  # it stopped the fit
    assert len(model.optimizer.variables) == n and "train_step" not in vars(model)


def test_run_eagerly_compiles_nothing_new_once_warm(caplog):
    # An eager lax.cond compiles its branches each call (they are new closures every step):
    # watched eager fits were 24x slower than unwatched ones. After a first epoch has compiled
    # each eager op once, a watched epoch (checks, weight work, activation samples, the guard's
    # cond) compiles nothing.
    import jax

    model = compiled(mlp(4, activation="sigmoid"), run_eagerly=True)
    x, y = circles(n=128)
    callback = GradWatchCallback(check_every=2, activation_every=2, guard="skip")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
    caplog.set_level("WARNING")
    with jax.log_compiles(True):
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[callback])
    compiled_now = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled_now == []
    assert callback.report().steps == 4
