"""The seeded-bug benchmark in Keras 3: build a spec's model, ``fit`` it, gather raw evidence.

Runs on the backend Keras loads (TensorFlow by default; PyTorch with ``KERAS_BACKEND=torch``).
The model is trained by the ordinary compiled ``fit`` with gradwatch's callback; the evidence is
gathered by a second callback at the probe steps, from the backend itself and never from
gradwatch: a forward pass written with ``keras.ops`` on the layers' own variables (no layer is
called, so none of gradwatch's activation wrappers runs) and its gradient taken by the backend
(``tf.GradientTape``, or ``torch.autograd.grad`` on the PyTorch backend).
"""

from __future__ import annotations

import os
from typing import Any

# One thread: set before TensorFlow starts (the benchmark's entry point sets these too).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from gradwatch.keras import GradWatchCallback  # noqa: E402

from . import families as fm  # noqa: E402

FRAMEWORK = "keras"
BACKEND = keras.backend.backend()

if BACKEND == "tensorflow":
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started (the environment variables still hold)
        pass

_F32 = {"dtype": "float32"}
_ACT = {None: None, "relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "exp": "exponential"}
_OPS_ACT = {"relu": ops.relu, "sigmoid": ops.sigmoid, "tanh": ops.tanh, "exp": ops.exp}


def build(spec: fm.ModelSpec) -> keras.Model:
    """The spec's model with the spec's initial weights: layers ``fc{i}``/``conv{i}`` (activation
    in the layer, as Keras models are usually written), ``pool{i}``, ``flatten``, ``out``."""
    reg = keras.regularizers.L2(spec.l2) if spec.l2 else None
    names = iter(fm.param_layers(spec))
    inputs = keras.Input(spec.input_shape, name="x")
    h = inputs
    for i, layer in enumerate(spec.layers):
        if layer.kind == "dense":
            h = keras.layers.Dense(layer.size, activation=_ACT[layer.activation],
                                   kernel_regularizer=reg, name=next(names)[0], **_F32)(h)
        elif layer.kind == "conv":
            h = keras.layers.Conv2D(layer.size, layer.kernel, activation=_ACT[layer.activation],
                                    kernel_regularizer=reg, name=next(names)[0], **_F32)(h)
        elif layer.kind == "pool":
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}", **_F32)(h)
        else:
            h = keras.layers.Flatten(name="flatten", **_F32)(h)
    model = keras.Model(inputs, h, name=spec.variant.replace("-", "_"))
    for (name, _), (w, b) in zip(fm.param_layers(spec), fm.initial_weights(spec)):
        model.get_layer(name).set_weights([w, b])
    return model


def _raw_forward(spec: fm.ModelSpec, model: keras.Model, x: Any) -> tuple[Any, dict[str, Any]]:
    """The model's forward pass in ``keras.ops`` on its variables' values: the logits and every
    ReLU output, keyed by its layer. Calls no layer (gradwatch wraps layers' activations)."""
    acts = {}
    names = iter(fm.param_layers(spec))
    h = x
    for layer in spec.layers:
        if layer.kind in ("dense", "conv"):
            name = next(names)[0]
            lyr = model.get_layer(name)
            k, b = lyr.kernel.value, lyr.bias.value
            if layer.kind == "dense":
                h = ops.matmul(h, k) + b
            else:
                h = ops.conv(h, k, strides=1, padding="valid", data_format="channels_last") + b
            if layer.activation is not None:
                h = _OPS_ACT[layer.activation](h)
                if layer.activation == "relu":
                    acts[name] = h
        elif layer.kind == "pool":
            h = ops.max_pool(h, 2, 2, padding="valid", data_format="channels_last")
        else:
            h = ops.reshape(h, (ops.shape(h)[0], -1))
    return h, acts


def _variables(spec: fm.ModelSpec, model: keras.Model) -> list[list[Any]]:
    """Per parameterised layer, the backend variables of its kernel and bias."""
    return [[model.get_layer(n).kernel.value, model.get_layer(n).bias.value]
            for n, _ in fm.param_layers(spec)]


def _ce(y: Any, logits: Any) -> Any:
    return ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))


def _penalty(spec: fm.ModelSpec, model: keras.Model) -> Any:
    return spec.l2 * sum(ops.sum(ops.square(model.get_layer(n).kernel.value))
                         for n, _ in fm.param_layers(spec))


def _squares(grads: list[Any]) -> Any:
    """Each gradient's squared L2 norm, in float64 (norms of 1e-20 must not underflow)."""
    return ops.stack([ops.sum(ops.square(ops.cast(g, "float64"))) for g in grads])


def _dead_fractions(acts: dict[str, Any]) -> Any:
    """Per ReLU output: share of units (last axis) zero for every example and position."""
    if not acts:
        return ops.zeros((0,), dtype="float32")
    fr = []
    for a in acts.values():
        per_unit = ops.sum(ops.reshape(a, (-1, ops.shape(a)[-1])), axis=0)
        fr.append(ops.mean(ops.cast(per_unit <= 0, "float32")))
    return ops.stack(fr)


def _measure(spec: fm.ModelSpec, model: keras.Model, x: Any, y: Any, px: Any, py: Any
             ) -> dict[str, Any]:
    """The probe's numbers as tensors: the data loss and accuracy on the whole training set,
    squared gradient norms per variable of the data loss (``sq``) and of data loss + penalty
    (``tsq``) on the probe batch, by the backend's own autodiff, the penalty, and the dead
    fractions of that forward pass."""
    logits, _ = _raw_forward(spec, model, x)
    out = {"loss": _ce(y, logits),
           "acc": ops.mean(ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"),
                                              ops.cast(y, "int32")), "float32")),
           "penalty": _penalty(spec, model) if spec.l2 else ops.zeros(())}
    variables = [v for vs in _variables(spec, model) for v in vs]
    if BACKEND == "tensorflow":
        with tf.GradientTape(persistent=True) as tape:
            plogits, acts = _raw_forward(spec, model, px)
            data = _ce(py, plogits)
            total = data + _penalty(spec, model) if spec.l2 else data
        out["sq"] = _squares(tape.gradient(data, variables))
        out["tsq"] = _squares(tape.gradient(total, variables)) if spec.l2 else out["sq"]
        del tape
    elif BACKEND == "torch":
        import torch

        plogits, acts = _raw_forward(spec, model, px)
        data = _ce(py, plogits)
        grads = torch.autograd.grad(data, variables, retain_graph=bool(spec.l2))
        out["sq"] = _squares(list(grads))
        out["tsq"] = (_squares(list(torch.autograd.grad(data + _penalty(spec, model), variables)))
                      if spec.l2 else out["sq"])
        acts = {k: v.detach() for k, v in acts.items()}
        out = {k: v.detach() for k, v in out.items()}
    else:
        raise RuntimeError(f"the seeded benchmark needs the tensorflow or torch backend, "
                           f"not {BACKEND}")
    out["dead"] = _dead_fractions(acts)
    return out


class Evidence(keras.callbacks.Callback):
    """Gathers :class:`families.Probe` records at the spec's probe steps.

    Overriding ``on_train_batch_end`` (without ``async_safe``) also makes ``fit`` call batch ends
    in order on the training thread, so every step is seen. On TensorFlow the measurement is one
    ``tf.function`` (traced once per run).
    """

    def __init__(self, spec: fm.ModelSpec, x: np.ndarray, y: np.ndarray, px: np.ndarray,
                 py: np.ndarray, ev: fm.Evidence) -> None:
        super().__init__()
        self.spec, self.ev = spec, ev
        self.args = tuple(ops.convert_to_tensor(a) for a in (x, y, px, py))
        self.at = set(fm.probe_steps(spec))
        self.sites = fm.relu_sites(spec)
        self._fn: Any = None

    def on_train_begin(self, logs: Any = None) -> None:
        def measure(*args: Any) -> dict[str, Any]:
            return _measure(self.spec, self.model, *args)

        self._fn = tf.function(measure) if BACKEND == "tensorflow" else measure
        self._probe(0)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch + 1 in self.at:
            self._probe(batch + 1)

    def _probe(self, step: int) -> None:
        m = {k: np.asarray(ops.convert_to_numpy(v), dtype=np.float64)
             for k, v in self._fn(*self.args).items()}
        # Per layer: its kernel and its bias (two variables each, in _variables' order).
        norms = np.sqrt(m["sq"].reshape(-1, 2).sum(axis=1)).tolist()
        total = np.sqrt(m["tsq"].reshape(-1, 2).sum(axis=1)).tolist()
        self.ev.probes.append(fm.Probe(
            step=step, loss=float(m["loss"]), accuracy=float(m["acc"]),
            penalty=float(m["penalty"]), grad_norm=norms, total_grad_norm=total,
            dead_fraction=dict(zip(self.sites, m["dead"].tolist()))))


def run(spec: fm.ModelSpec, watch: bool = True) -> fm.RunResult:
    """``fit`` ``spec`` (with gradwatch's callback, default options, when ``watch``)."""
    if BACKEND != "torch":
        return fm.run_spec(spec, FRAMEWORK, watch, _fit)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fm.run_spec(spec, FRAMEWORK, watch, _fit)
    finally:
        torch.set_num_threads(threads)


def _fit(spec: fm.ModelSpec, watch: bool, ev: fm.Evidence) -> list:
    keras.backend.clear_session()
    keras.utils.set_random_seed(spec.seed)
    data = fm.dataset(spec)
    idx = fm.batch_indices(spec).reshape(-1)
    # The batches in order, laid end to end: fit() without shuffling sees exactly these.
    xs, ys = data.x[idx], data.y[idx]
    pidx = fm.probe_indices(spec)
    model = build(spec)
    # The raw forward is the model: checked once, before gradwatch attaches anything.
    logits, _ = _raw_forward(spec, model, ops.convert_to_tensor(data.x[pidx]))
    expect = np.asarray(ops.convert_to_numpy(model(data.x[pidx], training=False)))
    got = np.asarray(ops.convert_to_numpy(logits))
    if not np.allclose(got, expect, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise AssertionError("the evidence's raw forward pass differs from the model's")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=spec.lr, momentum=spec.momentum),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    cb = GradWatchCallback(on_finding="log") if watch else None
    evidence = Evidence(spec, data.x, data.y, data.x[pidx], data.y[pidx], ev)
    model.fit(xs, ys, batch_size=spec.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=([cb] if cb is not None else []) + [evidence])
    if len(ev.probes) != len(fm.probe_steps(spec)):
        raise AssertionError(f"{len(ev.probes)} probes, expected {len(fm.probe_steps(spec))}")
    return list(cb.findings) if cb is not None else []


def versions() -> str:
    try:
        mod = __import__(BACKEND)
        return f"keras {keras.__version__} ({BACKEND} {mod.__version__})"
    except Exception:
        return f"keras {keras.__version__} ({BACKEND})"
