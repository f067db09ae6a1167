"""The reference experiments in Keras 3: build the spec's model, ``fit`` it watched, return numbers.

The model, initial weights, batches and optimizer are the PyTorch run's (see
``gradwatch._experiments``); only the framework differs.
"""

from __future__ import annotations

import os
import time
from typing import Any

import keras
import numpy as np

from gradwatch import _experiments as ex
from gradwatch.keras import GradWatchCallback

FRAMEWORK = "keras"


# float32 whatever the global dtype policy: the PyTorch run is float32 too.
_F32 = {"dtype": "float32"}


def _activation(exp: ex.Experiment, name: str) -> keras.layers.Layer:
    if exp.activation == "leaky_relu":
        return keras.layers.LeakyReLU(negative_slope=exp.negative_slope, name=name, **_F32)
    if exp.activation == "prelu":
        # PyTorch's PReLU(num_parameters=width, init=0.25); Keras' default starts at 0.
        return keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.25), name=name,
                                  **_F32)
    return keras.layers.Activation(exp.activation, name=name, **_F32)


class _Synchronous(keras.callbacks.Callback):
    """Makes ``fit`` call batch-end callbacks in the training loop, not from a thread pool.

    Keras dispatches ``on_train_batch_end`` asynchronously only when every callback allows it.
    When GradWatchCallback's check runs a step late, the step that fell out of its
    ``check_every``-step ring buffer is lost (seen on the PyTorch backend with
    ``check_every=1``). The experiments must see every step, so this callback opts out.
    """

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        pass


def build(exp: ex.Experiment) -> keras.Model:
    """The spec's model with the spec's initial weights (layers ``fc0``, ``bn0``, ``act0``, ...)."""
    inputs = keras.Input((2,), name="x")
    h = inputs
    for i in range(exp.depth):
        z = keras.layers.Dense(exp.width, name=f"fc{i}", **_F32)(h)
        if exp.batchnorm:
            # PyTorch's BatchNorm1d defaults: running stats keep 0.9 of the old value, eps 1e-5.
            z = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"bn{i}",
                                                **_F32)(z)
        z = _activation(exp, f"act{i}")(z)
        h = keras.layers.Add(name=f"skip{i}", **_F32)([h, z]) if exp.residual and i > 0 else z
    outputs = keras.layers.Dense(1, name="out", **_F32)(h)
    model = keras.Model(inputs, outputs, name=exp.name.replace("-", "_").replace(".", "_"))
    names = [f"fc{i}" for i in range(exp.depth)] + ["out"]
    for name, (w, b) in zip(names, ex.initial_weights(exp)):
        model.get_layer(name).set_weights([w, b])
    return model


def run(exp: ex.Experiment, events: str | os.PathLike) -> dict[str, Any]:
    """Train ``exp`` with ``model.fit`` and gradwatch's callback, writing the event file ``events``.

    Returns the same framework-neutral result as the PyTorch adapter's ``run``.
    """
    if keras.backend.backend() != "torch":
        return _run(exp, events)
    import torch

    threads = torch.get_num_threads()
    # Models this small run fastest on one thread, and one thread cannot be oversubscribed.
    torch.set_num_threads(1)
    try:
        return _run(exp, events)
    finally:
        torch.set_num_threads(threads)


def _run(exp: ex.Experiment, events: str | os.PathLike) -> dict[str, Any]:
    keras.utils.set_random_seed(exp.seed)
    x, y = exp.dataset()
    idx = ex.batch_indices(exp)
    # The batches in order, laid end to end: fit() without shuffling sees exactly these.
    xs, ys = x[idx.reshape(-1)], y[idx.reshape(-1)]
    start = time.perf_counter()
    model = build(exp)
    opt = keras.optimizers.SGD(learning_rate=exp.lr, global_clipnorm=exp.clip_norm)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    cb = GradWatchCallback(check_every=exp.check_every, events=events, on_finding="log",
                           update_ratio="exact", name=f"{exp.name} ({FRAMEWORK})")
    model.fit(xs, ys, batch_size=exp.batch, epochs=1, shuffle=False, verbose=0,
              callbacks=[cb, _Synchronous()])
    logits = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)
    seconds = time.perf_counter() - start
    return {
        "framework": FRAMEWORK,
        "backend": keras.backend.backend(),
        "final_loss": ex.bce_with_logits(logits, y),
        "final_accuracy": ex.accuracy(logits, y),
        "seconds": seconds,
        "findings": [{"kind": f.kind, "step": f.step, "layer": f.layer} for f in cb.findings],
        "report": str(cb.report()),
    }


def versions() -> str:
    backend = keras.backend.backend()
    try:
        mod = __import__(backend)
        return f"keras {keras.__version__} ({backend} {mod.__version__})"
    except Exception:  # a backend without __version__
        return f"keras {keras.__version__} ({backend})"
