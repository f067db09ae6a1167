"""What the Keras callback reads from the model and its weights: each gradient's part along
its own weights (from g . W), skip connections from the model's graph, activation kinds and
their counts, and float64 models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    StatsRecorder,
    circles,
    compiled,
    fit,
    jax_autodiff,
    mlp,
    to_numpy,
)

import gradwatch
from gradwatch.keras import GradWatchCallback

#: The compile modes of the callback's two code paths (graph and eager) and XLA.
MODES = [pytest.param({}, id="default"), pytest.param({"run_eagerly": True}, id="run-eagerly")]
if BACKEND == "tensorflow":
    MODES.append(pytest.param({"jit_compile": True}, id="xla"))


class WeightsAtBatchBegin(keras.callbacks.Callback):
    """Host copies of the trainable weights before every training batch (the weights its
    gradient is computed at). Overriding ``on_train_batch_end`` keeps Keras' batch-end dispatch
    synchronous."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[list[np.ndarray]] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.weights.append([to_numpy(w) for w in self.model.trainable_weights])

    def on_train_batch_end(self, batch, logs=None):
        pass


def reference_grads(model, loss_fn, x, y, weights: list[np.ndarray]) -> list[np.ndarray]:
    """Dense gradients of the batch's loss plus the model's regularisation losses, at
    ``weights``, by the backend's own autodiff."""
    for w, value in zip(model.trainable_weights, weights):
        w.assign(value)
    tws = model.trainable_weights
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            if model.losses:
                loss = loss + tf.add_n(model.losses)
        return [to_numpy(tf.convert_to_tensor(g)) for g in tape.gradient(loss, tws)]
    if BACKEND == "jax":
        return jax_autodiff(model, x, lambda out: loss_fn(y, out), with_losses=True)[2]
    import torch

    loss = loss_fn(torch.as_tensor(y), model(torch.as_tensor(x), training=True))
    if model.losses:
        loss = loss + sum(model.losses)
    return [to_numpy(g) for g in torch.autograd.grad(loss, [w.value for w in tws])]


def per_layer(model, values: list[np.ndarray], weights: list[np.ndarray]) -> dict[str, float]:
    """Per layer owning trainable weights: sum over its variables of values . weights."""
    return {name: float(sum(np.vdot(values[i].astype("float64"), weights[i].astype("float64"))
                            for i in idx)) for name, idx in _layer_vars(model).items()}


def _layer_vars(model) -> dict[str, list[int]]:
    tws = model.trainable_weights
    out = {}
    for layer in model.layers:
        idx = [i for i, w in enumerate(tws) if any(w is v for v in layer.trainable_weights)]
        if idx:
            out[layer.name] = idx
    return out


def orthogonal(model, grads: list[np.ndarray], weights: list[np.ndarray]) -> dict[str, float]:
    """Per layer: sqrt(sum over its variables of |g|^2 - (g . W)^2 / |W|^2) (W = 0: |g|^2)."""
    out = {}
    for name, idx in _layer_vars(model).items():
        total = 0.0
        for i in idx:
            g, w = grads[i].astype("float64").ravel(), weights[i].astype("float64").ravel()
            ww = w @ w
            total += g @ g - ((g @ w) ** 2 / ww if ww > 0 else 0.0)
        out[name] = float(np.sqrt(max(total, 0.0)))
    return out




def conv_dense_model(regularized: float = 1e-2) -> keras.Model:
    """Conv -> Dense -> Dense (l2 kernel penalty) -> Dense; biases start non-zero."""
    bias = keras.initializers.RandomNormal(stddev=0.3, seed=1)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", bias_initializer=bias, name="conv")(inputs)
    h = keras.layers.Flatten(name="flat")(h)
    h = keras.layers.Dense(8, activation="tanh", bias_initializer=bias, name="dense")(h)
    h = keras.layers.Dense(8, activation="gelu", bias_initializer=bias, name="penalised",
                           kernel_regularizer=keras.regularizers.l2(regularized))(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h), name="convnet")


def embedding_model() -> keras.Model:
    """Token ids from a vocabulary of 5 in sequences of 12: every batch repeats tokens (on
    TensorFlow the embedding's gradient is IndexedSlices with repeated rows)."""
    inputs = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(5, 8, name="embed")(inputs)
    h = keras.layers.GlobalAveragePooling1D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(1, name="out")(h), name="bag")


def data(build) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if build is embedding_model:
        tokens = rng.integers(0, 5, (64, 12)).astype("int32")
        return tokens, (tokens.sum(axis=1) > 24).astype("float32")[:, None]
    return (rng.normal(size=(64, 6, 6, 2)).astype("float32"),
            rng.normal(size=(64, 1)).astype("float32"))


# -- g . W --------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [pytest.param(conv_dense_model, id="conv-dense-l2"),
                                   pytest.param(embedding_model, id="embedding-repeated-tokens")])
@pytest.mark.parametrize("mode", MODES)
def test_gradient_along_the_weights_is_measured_with_the_weights_before_the_update(
        build, mode):
    model = build()
    x, y = data(build)
    loss_fn = keras.losses.MeanSquaredError()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss=loss_fn, **mode)
    rec, before = StatsRecorder(), WeightsAtBatchBegin()
    # One batch per epoch, a check every step: check k sees step k's gradient.
    fit(model, (x, y), epochs=3, batch_size=len(x), shuffle=False, callbacks=(before,),
        callback=GradWatchCallback(check_every=1, plugins=[rec]))
    assert len(rec.stats) == 3 and len(before.weights) == 3
    after = [to_numpy(w) for w in model.trainable_weights]
    for k, stats in enumerate(rec.stats):
        w = before.weights[k]
        w_next = before.weights[k + 1] if k + 1 < len(before.weights) else after
        grads = reference_grads(model, loss_fn, x, y, w)
        gnorm = np.sqrt(list(per_layer(model, grads, grads).values()))
        want = orthogonal(model, grads, w)
        assert list(stats.layers) == list(want)
        orth = stats.grad_norm_orthogonal
        assert orth is not None and np.isfinite(orth).all()
        np.testing.assert_allclose(orth, list(want.values()), rtol=1e-4, atol=1e-6 * gnorm.max())
        assert (orth <= stats.last_grad_norm * (1 + 1e-6)).all()
        # ... and not with the weights after the update (the test tells the two apart: they
        # differ by 0.5 % to 40 % in some layer, the measurement by < 1e-5)
        moved = list(orthogonal(model, grads, w_next).values())
        assert not np.allclose(orth, moved, rtol=1e-3), (k, moved)


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_without_data_gradient_under_an_l2_penalty_has_cos_one(mode):
    # The "starved" layer's output is multiplied by 0: its only gradient is the l2 penalty's
    # pull 2 lambda W (its bias, unpenalised, gets none), parallel to its weights.
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    h = keras.layers.Dense(8, activation="tanh", name="dense")(keras.layers.Flatten()(h))
    s = keras.layers.Dense(8, name="starved", kernel_regularizer=keras.regularizers.l2(1e-2))(h)
    h = keras.layers.Add()([h, keras.layers.Rescaling(0.0)(s)])
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse", **mode)
    x, y = data(conv_dense_model)
    rec = StatsRecorder()
    fit(model, (x, y), epochs=2, batch_size=16, sync=True,
        callback=GradWatchCallback(check_every=2, plugins=[rec]))
    checks = [s for s in rec.stats if s.grad_norm_orthogonal is not None]
    assert len(checks) == 4
    for stats in checks:
        # What is left of the gradient once its component along W is taken out, as a share of
        # it: cos(g, W) = sqrt(1 - share^2).
        share = dict(zip(stats.layers, stats.grad_norm_orthogonal / stats.last_grad_norm))
        cos = {n: float(np.sqrt(max(1 - v * v, 0.0))) for n, v in share.items()}
        assert cos["starved"] > 0.999, cos
        assert max(cos[n] for n in ("conv", "dense", "out")) < 0.9, cos
        assert stats.last_grad_norm[stats.layers.index("starved")] > 1e-3  # not a zero gradient


def _first_dot(policy: str, **optimizer) -> np.ndarray:
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(policy)
    model = conv_dense_model()
    keras.mixed_precision.set_global_policy("float32")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1, **optimizer), loss="mse")
    rec = StatsRecorder()
    fit(model, data(conv_dense_model), epochs=1, batch_size=64, shuffle=False, sync=True,
        callback=GradWatchCallback(check_every=1, plugins=[rec]))
    [stats] = rec.stats
    return np.asarray(stats.grad_norm_orthogonal)


@pytest.mark.parametrize("policy, optimizer", [
    pytest.param("mixed_bfloat16", {}, id="mixed-bfloat16"),
    pytest.param("mixed_float16", {}, id="mixed-float16-loss-scale-optimizer"),
    pytest.param("float32", {"loss_scale_factor": 128.0}, id="static-loss-scale-factor"),
])
def test_gradient_along_the_weights_is_unscaled(policy, optimizer, float32_policy):
    reference = _first_dot("float32")
    dot = _first_dot(policy, **optimizer)
    # Same data, same initial weights: the float32 run's numbers (loss-scaled ones would be
    # 128 or thousands of times larger).
    np.testing.assert_allclose(dot, reference, rtol=0.1, atol=0.01 * np.abs(reference).max())


@pytest.mark.skipif(BACKEND != "tensorflow", reason="graph mode (tf.function) is TensorFlow's")
def test_dot_products_are_computed_in_the_check_steps_cond_only():
    import collections

    import tensorflow as tf

    model = compiled(mlp(3))
    x, y = circles(n=64)
    fit(model, (x, y), epochs=1, callback=None)  # builds the model and optimizer

    def traced():
        return tf.function(model.train_step).get_concrete_function(
            (tf.constant(x), tf.constant(y))).graph

    plain = collections.Counter(op.type for op in traced().get_operations())
    cb = GradWatchCallback()
    cb.set_model(model)
    cb.on_train_begin()
    try:
        graph = traced()
    finally:
        cb.on_train_end()
    added = collections.Counter(op.type for op in graph.get_operations()) - plain
    # Every step: no product, no sum (the dot products are not in the step body) ...
    assert added["Mul"] == added["Sum"] == 0, added
    # ... but in the branch of the check step's cond that runs before the update: one
    # multiply-and-sum per variable.
    branches = [graph._get_function(op.get_attr(b).name).graph
                for op in graph.get_operations() if op.type in ("If", "StatelessIf")
                for b in ("then_branch",)]
    sums = [sum(o.type == "Sum" for o in g.get_operations()) for g in branches]
    assert len(model.trainable_weights) in sums, sums


# -- skip connections ---------------------------------------------------------------------------


def model_facts(model: keras.Model) -> tuple[gradwatch.ModelInfo, dict[str, int]]:
    """The ModelInfo and activation counts the callback derives at the start of ``fit``."""
    compiled(model)
    cb = GradWatchCallback()
    cb.set_model(model)
    cb.on_train_begin()
    try:
        return cb.monitor.context.model, dict(cb._activation_counts)
    finally:
        cb.on_train_end()


def resnet_block() -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inputs)
    z = keras.layers.Conv2D(8, 3, padding="same", name="c1")(h)
    z = keras.layers.BatchNormalization()(z)
    z = keras.layers.ReLU()(z)
    z = keras.layers.Conv2D(8, 3, padding="same", name="c2")(z)
    h = keras.layers.ReLU()(keras.layers.Add()([h, z]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(1)(h), name="resnet")


def projection_shortcut() -> keras.Model:
    inputs = keras.Input((8,))
    a = keras.layers.Dense(4, name="proj")(inputs)
    b = keras.layers.Dense(6, activation="relu", name="d1")(inputs)
    b = keras.layers.Dense(4, name="d2")(b)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Add()([a, b])))


def dense_concat() -> keras.Model:
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    z = keras.layers.Dense(8, activation="relu")(h)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Concatenate()([h, z])))


def ops_add() -> keras.Model:
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8)(inputs)
    h = h + keras.layers.Dense(8, activation="tanh")(h)  # keras.ops.add on KerasTensors
    return keras.Model(inputs, keras.layers.Dense(1)(h))


def sequential_with_residual_block() -> keras.Model:
    return keras.Sequential([keras.Input((8, 8, 3)), resnet_block(), keras.layers.Dense(1)])


def plain_mlp() -> keras.Model:
    return mlp(4)


def inception_equal_branches() -> keras.Model:
    inputs = keras.Input((8,))
    a = keras.layers.Dense(4, activation="relu")(inputs)
    b = keras.layers.Dense(4, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Concatenate()([a, b])))


def two_inputs() -> keras.Model:
    # The raw second input joins a deep path from the first: different depths, no common source.
    x1, x2 = keras.Input((4,)), keras.Input((3,))
    h = keras.layers.Dense(8)(keras.layers.Dense(8, activation="relu")(x1))
    return keras.Model([x1, x2], keras.layers.Dense(1)(keras.layers.Concatenate()([h, x2])))


def squeeze_excitation_gate() -> keras.Model:
    inputs = keras.Input((8,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    gate = keras.layers.Dense(8, activation="sigmoid")(keras.layers.Dense(2, activation="relu")(h))
    return keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Multiply()([h, gate])))


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.d1 = keras.layers.Dense(8, activation="relu")
        self.d2 = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        h = self.d1(x)
        return self.out(h + self.d2(h))


class Block(keras.layers.Layer):
    """A custom layer that calls sub-layers: what its call does is not read."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(8)

    def call(self, x):
        return x + self.inner(x)


def functional_with_custom_block() -> keras.Model:
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(1)(Block()(keras.layers.Dense(8)(inputs))))


class SubclassedWithResidualSubmodel(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = projection_shortcut()

    def call(self, x):
        return self.block(x)


def _built(model: keras.Model, shape: tuple[int, ...]) -> keras.Model:
    model(np.zeros((2, *shape), "float32"))
    return model


@pytest.mark.parametrize("build, want", [
    pytest.param(resnet_block, True, id="functional-resnet-block"),
    pytest.param(projection_shortcut, True, id="projection-shortcut"),
    pytest.param(dense_concat, True, id="densenet-concatenate"),
    pytest.param(ops_add, True, id="keras-ops-add"),
    pytest.param(sequential_with_residual_block, True, id="sequential-holding-a-resnet-block"),
    pytest.param(plain_mlp, False, id="sequential-mlp"),
    pytest.param(inception_equal_branches, False, id="parallel-branches-of-equal-depth"),
    pytest.param(two_inputs, False, id="two-inputs-no-common-source"),
    pytest.param(squeeze_excitation_gate, False, id="multiplicative-gate"),
    pytest.param(lambda: _built(Subclassed(), (8,)), None, id="subclassed"),
    pytest.param(functional_with_custom_block, None, id="functional-with-custom-composite-layer"),
    pytest.param(lambda: _built(SubclassedWithResidualSubmodel(), (8,)), True,
                 id="subclassed-holding-a-functional-residual-block"),
])
def test_residual_is_read_from_the_models_graph(build, want):
    info, _ = model_facts(build())
    assert info.residual is want


# -- activations --------------------------------------------------------------------------------


def activations_model() -> keras.Model:
    inputs = keras.Input((8,))
    h = inputs
    for i, act in enumerate(["gelu", "swish", "silu", keras.activations.gelu, "selu", "elu",
                             "softplus", "leaky_relu", "hard_sigmoid", "tanh", "tanh", "tanh"]):
        h = keras.layers.Dense(8, activation=act, name=f"d{i}")(h)
    for layer in [keras.layers.Activation("relu"), keras.layers.ReLU(),
                  keras.layers.ReLU(max_value=6.0), keras.layers.ReLU(negative_slope=0.1),
                  keras.layers.LeakyReLU(), keras.layers.PReLU(), keras.layers.ELU(),
                  keras.layers.Activation(keras.activations.sigmoid),
                  keras.layers.Dense(8, activation=keras.layers.ReLU()),
                  keras.layers.Dense(8, activation="linear")]:
        h = layer(h)
    h = keras.ops.relu(keras.layers.Dense(8)(h))  # an activation op in the functional graph
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="out")(h))


def test_activation_kinds_and_counts_use_the_torch_adapters_names():
    info, counts = model_facts(activations_model())
    assert counts == {"gelu": 2, "silu": 2, "selu": 1, "elu": 2, "softplus": 1,
                      "leaky_relu": 3, "hardsigmoid": 1, "tanh": 3, "relu": 4, "relu6": 1,
                      "prelu": 1, "sigmoid": 2}
    assert info.activations == frozenset(counts)


def test_recurrent_layers_count_their_cells_activation_once():
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.SimpleRNN(4),
                              keras.layers.Dense(1)])
    info, counts = model_facts(model)
    assert counts == {"tanh": 1} and info.recurrent


# -- float64 ------------------------------------------------------------------------------------


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


def _float64_run(mode, model):
    x, y = circles(n=128)
    loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=loss_fn, **mode)
    rec, before = StatsRecorder(), WeightsAtBatchBegin()
    run = fit(model, (x, y), epochs=2, batch_size=32, shuffle=False, callbacks=(before,),
              callback=GradWatchCallback(check_every=2, activation_every=2, plugins=[rec]))
    assert run.report.steps == 8 and not run.report.internal_errors
    steps = np.concatenate([s.steps for s in rec.stats]).tolist()
    assert steps == list(range(1, 9))
    last = rec.stats[-1]
    assert np.isfinite(last.grad_norm).all() and np.isfinite(last.update_ratio).all()
    assert {a.kind for a in last.activations.values()} == {"tanh"}
    # the check step 8's g . W, from its batch (the last 32 samples) and its weights
    w = before.weights[7]
    grads = reference_grads(model, loss_fn, x[96:].astype(model.dtype),
                            y[96:].astype(model.dtype), w)
    want = orthogonal(model, grads, w)
    np.testing.assert_allclose(last.grad_norm_orthogonal, list(want.values()), rtol=1e-4)
    return rec


@pytest.mark.parametrize("mode", MODES)
def test_a_float64_model_is_watched(mode, float64):
    model = mlp(2, activation="tanh")
    assert all(str(w.dtype) == "float64" for w in model.trainable_weights)
    _float64_run(mode, model)


@pytest.mark.parametrize("mode", MODES[:2])
def test_float64_layers_in_a_float32_model_are_watched(mode):
    inputs = keras.Input((2,))
    h = keras.layers.Dense(16, activation="tanh", dtype="float64", name="d0")(inputs)
    h = keras.layers.Dense(16, activation="tanh", name="d1")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    assert {str(w.dtype) for w in model.trainable_weights} == {"float64", "float32"}
    _float64_run(mode, model)


# -- tf.distribute ------------------------------------------------------------------------------

DISTRIBUTED = textwrap.dedent('''
    import json
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    from gradwatch import hookimpl
    from gradwatch.keras import GradWatchCallback


    class Recorder:
        def __init__(self):
            self.stats = []

        @hookimpl
        def gradwatch_step_stats(self, stats):
            self.stats.append(stats)


    def run(strategy, clipnorm=None, compile={}):
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 5, (128, 12)).astype("int32")
        y = (tokens.sum(axis=1) > 24).astype("float32")
        with strategy.scope():
            inputs = keras.Input((12,), dtype="int32")
            h = keras.layers.Embedding(5, 8, name="embed")(inputs)
            h = keras.layers.GlobalAveragePooling1D()(h)
            h = keras.layers.Dense(8, activation="tanh", name="dense",
                                   kernel_regularizer=keras.regularizers.l2(1e-2))(h)
            model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5, clipnorm=clipnorm),
                          loss=keras.losses.BinaryCrossentropy(from_logits=True), **compile)
        rec = Recorder()
        cb = GradWatchCallback(check_every=2, plugins=[rec])
        model.fit(tokens, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
        return {"internal": list(cb.report().internal_errors),
                "norm": np.concatenate([s.grad_norm for s in rec.stats]).tolist(),
                "dot": [s.grad_norm_orthogonal.tolist() for s in rec.stats
                        if s.grad_norm_orthogonal is not None]}


    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    print(json.dumps({
        "single": run(single),
        "mirrored": run(mirrored),
        "mirrored-clipnorm": run(mirrored, clipnorm=1e3),
        "mirrored-eager": run(mirrored, compile={"run_eagerly": True}),
    }))
''')


@pytest.mark.slow
@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_gradient_along_the_weights_and_sparse_norms_under_mirrored_strategy():
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="-1")
    done = subprocess.run([sys.executable, "-c", DISTRIBUTED], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    single = runs.pop("single")
    assert single["internal"] == [] and len(single["dot"]) == 2
    for name, run in runs.items():
        assert run["internal"] == [], name
        # clipnorm 1e3 never clips, but makes gradwatch all-reduce the gradients itself, as
        # run_eagerly does: the embedding's IndexedSlices are reduced before their repeated rows
        # are summed (the replicas' shards hold different tokens).
        np.testing.assert_allclose(run["norm"], single["norm"], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(run["dot"], single["dot"], rtol=1e-4, err_msg=name)


def test_a_model_with_every_kind_of_activation_site_fits_watched():
    model = compiled(activations_model(), lr=0.01)
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    run = fit(model, (x, y), epochs=2, callback=GradWatchCallback(check_every=1,
                                                                  activation_every=1))
    assert run.report.steps == 4 and not run.report.internal_errors


def test_model_info_carries_the_counts_where_the_core_has_the_field():
    info, counts = model_facts(mlp(3, activation="tanh"))
    assert counts == {"tanh": 3}
    if hasattr(info, "activation_counts"):
        assert dict(info.activation_counts) == counts
