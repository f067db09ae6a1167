"""Every statistic the Keras adapter reports, against a computation from its definition in
docs/detectors.md made by the test itself: the weights before and after every step (read by a
callback of its own), the gradients and activations recomputed afterwards from those weights with
the backend's own autodiff (``tf.GradientTape`` / ``torch.autograd``) on the same batch; and the
callback releasing the model's variables after ``fit``.

Runs on whichever backend Keras loads (CI runs it on TensorFlow and on PyTorch).
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
from conftest import BACKEND, StatsRecorder, fit, jax_autodiff, to_numpy
from references import orthogonal_norm, ratio, sq

import gradwatch
from gradwatch.keras import GradWatchCallback

keras = pytest.importorskip("keras")

CHECK_EVERY = 2
ACTIVATION_EVERY = 4  # activations sampled at steps 4 and 8
STEPS = 8
BATCH = 16
#: The reference recomputes each step eagerly from the same weights and batch; fit ran it as a
#: traced (maybe XLA-compiled) function, so the two differ by float32 operation order. Measured
#: gaps: ~1e-6 relative; 1e-4 leaves room and still fails on any definitional slip (a bias left
#: out of a layer, a ratio against the wrong weights, a norm of half squares).
RTOL = 1e-4
#: The layers, as gradwatch names them (a variable's path less its own name), in
#: ``model.trainable_weights`` order.
LAYERS = ("emb", "gru/gru_cell", "conv", "ln", "fc1", "bn", "fc2", "head")


def network() -> keras.Model:
    """Tokens through an Embedding, a GRU and a LayerNormalization; an image through a ReLU
    Conv2D (two of its four channels dead by construction); both into a Dense, BatchNorm, tanh
    (partly saturated), sigmoid Dense (partly saturated), Dense head. Adam: the update is not
    a multiple of the gradient, so an update ratio computed from the gradient would not pass."""
    layers = keras.layers
    tokens = keras.Input((5,), dtype="int32", name="tokens")
    image = keras.Input((6, 6, 1), name="image")
    a = layers.Embedding(20, 8, name="emb")(tokens)
    a = layers.LayerNormalization(name="ln")(layers.GRU(12, name="gru")(a))
    bias = keras.initializers.Constant([-50.0, -50.0, 0.0, 0.0])
    b = layers.Flatten()(layers.Conv2D(4, 3, activation="relu", bias_initializer=bias,
                                       name="conv")(image))
    h = layers.Dense(24, name="fc1")(layers.Concatenate()([a, b]))
    h = layers.BatchNormalization(gamma_initializer=keras.initializers.Constant(3.0),
                                  name="bn")(h)
    h = layers.Activation("tanh", name="tanh")(h)
    h = layers.Dense(16, activation="sigmoid", name="fc2",
                     kernel_initializer=keras.initializers.RandomNormal(stddev=2.0))(h)
    model = keras.Model([tokens, image], layers.Dense(1, name="head")(h), name="net")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.01),
                  loss=keras.losses.MeanSquaredError())
    return model


def data() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(1)
    n = STEPS * BATCH
    tokens = rng.integers(0, 10, (n, 5)).astype("int32")  # rows 10..19 never used
    image = rng.normal(size=(n, 6, 6, 1)).astype("float32")
    return [tokens, image], rng.normal(size=(n, 1)).astype("float32")


class Weights(keras.callbacks.Callback):
    """Every weight (trainable and not) before each batch, and at the end of the fit."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[list[np.ndarray]] = []
        self.final: list[np.ndarray] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before.append([to_numpy(w) for w in self.model.weights])

    def on_train_end(self, logs=None):
        self.final = [to_numpy(w) for w in self.model.weights]


def layer_of(w) -> str:
    """The rule gradwatch documents: a variable's layer is its path less its own name."""
    path = w.path.rsplit("/", 1)[0]
    return path[len("net/"):] if path.startswith("net/") else path


def gradients_and_outputs(model, weights, x, y, sites):
    """With ``weights`` set: the loss, every trainable variable's gradient and the outputs of
    the activation ``sites`` of one training-mode forward pass, by the backend's autodiff."""
    model.set_weights(weights)  # (the pass updates BatchNorm's moving statistics: reset each time)
    probe = keras.Model(model.inputs, [model.output] + [model.get_layer(s).output for s in sites])
    loss_fn = keras.losses.MeanSquaredError()
    variables = model.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            out = probe(x, training=True)
            loss = loss_fn(y, out[0])
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]
    elif BACKEND == "jax":
        loss, out, grads = jax_autodiff(probe, list(x), lambda out: loss_fn(y, out[0]))
    else:
        import torch

        out = probe([torch.as_tensor(v) for v in x], training=True)
        loss = loss_fn(torch.as_tensor(y), out[0])
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    return (float(to_numpy(loss)), [to_numpy(g).astype(np.float64) for g in grads],
            [to_numpy(o).astype(np.float64) for o in out[1:]])


@pytest.mark.parametrize(("update_ratio", "fraction"), [
    pytest.param("exact", 0.02, id="exact"),
    pytest.param("sampled", 0.2, id="sampled-fraction-0.2"),
])
def test_every_reported_statistic_matches_a_recomputation(update_ratio, fraction):
    model = network()
    x, y = data()
    keep, weights = StatsRecorder(), Weights()
    cb = GradWatchCallback(update_ratio=update_ratio, sample_fraction=fraction,
                           check_every=CHECK_EVERY, activation_every=ACTIVATION_EVERY,
                           plugins=[keep])
    fit(model, (x, y), epochs=1, batch_size=BATCH, shuffle=False, callback=cb,
        before=(weights,), sync=True)
    stats = keep.stats
    assert [s.step for s in stats] == list(range(CHECK_EVERY, STEPS + 1, CHECK_EVERY))
    assert len(weights.before) == STEPS

    trainable = {id(w) for w in model.trainable_weights}
    is_trainable = [id(w) in trainable for w in model.weights]
    layer = [layer_of(w) for w in model.trainable_weights]
    assert tuple(dict.fromkeys(layer)) == LAYERS

    def per_layer(tensors):  # trainable tensors of each layer, in LAYERS order
        return {k: [t for t, n in zip(tensors, layer) if n == k] for k in LAYERS}

    def trainable_of(all_weights):
        return per_layer([w for w, t in zip(all_weights, is_trainable) if t])

    sites = ("conv", "tanh", "fc2")
    ref = {}
    after = weights.before[1:] + [weights.final]
    for t in range(1, STEPS + 1):
        xb = [v[(t - 1) * BATCH:t * BATCH] for v in x]
        loss, grads, outs = gradients_and_outputs(model, weights.before[t - 1], xb,
                                                  y[(t - 1) * BATCH:t * BATCH], sites)
        ref[t] = dict(loss=loss, grads=per_layer(grads), outs=dict(zip(sites, outs)),
                      before=trainable_of(weights.before[t - 1]),
                      after=trainable_of(after[t - 1]))
    start = trainable_of(weights.before[0])
    sample = None if update_ratio == "exact" else fraction

    for s in stats:
        assert s.layers == LAYERS
        assert s.steps.tolist() == list(range(s.step - CHECK_EVERY + 1, s.step + 1))
        r = ref[s.step]
        grads, before, now = r["grads"], r["before"], r["after"]
        np.testing.assert_array_equal(
            s.grad_size, [sum(g.size for g in grads[k]) for k in LAYERS])
        np.testing.assert_allclose(s.loss, [ref[t]["loss"] for t in s.steps], rtol=RTOL)
        assert s.has_loss.all() and s.has_grad.all()
        np.testing.assert_allclose(
            s.grad_norm,
            [[math.sqrt(sum(sq(g) for g in ref[t]["grads"][k])) for k in LAYERS]
             for t in s.steps], rtol=RTOL)
        np.testing.assert_array_equal(s.grad_nonfinite, 0)
        np.testing.assert_array_equal(s.weight_nonfinite, 0)
        np.testing.assert_allclose(
            s.weight_norm, [math.sqrt(sum(sq(p) for p in now[k])) for k in LAYERS], rtol=RTOL)
        np.testing.assert_allclose(
            s.grad_norm_orthogonal, [orthogonal_norm(grads[k], before[k]) for k in LAYERS],
            rtol=RTOL)
        np.testing.assert_allclose(
            s.update_ratio, [ratio(now[k], before[k], sample) for k in LAYERS], rtol=RTOL)
        np.testing.assert_allclose(
            s.weight_change, [ratio(now[k], start[k], sample) for k in LAYERS], rtol=RTOL)
        # Max |g|: the Keras adapter reads it at every check. The share of exactly-zero
        # gradient elements (AUTOTRAINER's dying-ReLU evidence, event file only) is measured by
        # the PyTorch adapter alone; docs/keras.md says so.
        np.testing.assert_allclose(
            s.grad_max, [max(float(np.abs(g).max()) for g in grads[k]) for k in LAYERS],
            rtol=RTOL)
        assert s.grad_zero_fraction is None
        if s.step % ACTIVATION_EVERY:
            assert not s.activations
            continue
        # A ReLU unit (a channel: the last axis of [B, H, W, C]) is dead when it is > 0 for no
        # example and no position; sigmoid/tanh outputs are saturated where the derivative is
        # under 1 % of its peak. A saturation count may flip on an output within rounding of
        # the threshold: one flip is 1 / elements.
        y_relu, y_tanh, y_sig = (r["outs"][k] for k in sites)
        alive = (y_relu > 0).reshape(-1, 4).any(axis=0)
        expected = {
            "conv": ("dead_fraction", 1 - alive.mean(), 4, 0.0),
            "tanh": ("saturated_fraction", (1 - y_tanh**2 < 0.01).mean(), 24, 1.5 / y_tanh.size),
            "fc2": ("saturated_fraction", (y_sig * (1 - y_sig) < 0.25 * 0.01).mean(), 16,
                    1.5 / y_sig.size),
        }
        assert set(s.activations) == set(expected)
        for site, (field, value, units, slack) in expected.items():
            a = s.activations[site]
            assert getattr(a, field) == pytest.approx(value, abs=slack + 1e-7), site
            assert a.units == units
    # The model is built so that each fraction is a real test: neither 0 nor 1.
    last = stats[-1]
    assert last.activations["conv"].dead_fraction == 0.5
    assert 0.05 < last.activations["tanh"].saturated_fraction < 0.95
    assert 0.05 < last.activations["fc2"].saturated_fraction < 0.95
    # The GRU's variables belong to its cell: that layer is recurrent (advice about recurrent
    # weights depends on it), and the cell's tanh, applied at every time step, is no site.
    assert [i.name for i in cb.monitor.context.layers if i.recurrent] == ["gru/gru_cell"]
    # The report's weight change is the last check's.
    row = {r.name: r for r in cb.report().layers}
    assert row["fc1"].weight_change == pytest.approx(last.weight_change[LAYERS.index("fc1")])


def test_after_fit_the_callback_holds_no_variable_of_the_model():
    """The callback outlives the fit (``print(cb.report())``), the model need not: once the
    user drops the model, its variables are freed although the callback is alive, also when
    the same callback watched a second, rebuilt model since; the report stays usable."""
    cb = GradWatchCallback(update_ratio="exact", check_every=2)

    def fit_one():
        model = network()
        fit(model, data(), epochs=1, batch_size=BATCH, shuffle=False, callback=cb)
        return [weakref.ref(model), weakref.ref(model.trainable_weights[0])]

    first = fit_one()
    gc.collect()
    assert [r() for r in first] == [None, None]
    second = fit_one()  # a rebuilt model: the callback's previous fit holds nothing either
    gc.collect()
    assert [r() for r in second] == [None, None]
    assert cb.report().steps == STEPS and tuple(r.name for r in cb.report().layers) == LAYERS
    assert cb.extra_memory_bytes() == 0
    assert isinstance(cb.findings, list) and all(
        isinstance(f, gradwatch.Finding) for f in cb.findings)
