"""The reference experiments in Keras 3: build the spec's model, ``fit`` it watched, return what
happened. :class:`gradwatch_keras.plugin.KerasRunner` is the way in; this module imports Keras.

The model, initial weights, batches and optimizer are the PyTorch run's (see
:mod:`gradwatch.experiments`); only the framework differs.
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np

from gradwatch import experiments as ex
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


def run(exp: ex.Experiment, events: str | os.PathLike[str],
        settings: ex.Settings = ex.DEFAULT) -> ex.RunResult:
    """Train ``exp`` with ``model.fit`` and gradwatch's callback configured by ``settings``,
    writing the event file ``events``."""
    if keras.backend.backend() != "torch":
        return _run(exp, events, settings)
    import torch

    threads = torch.get_num_threads()
    # Models this small run fastest on one thread, and one thread cannot be oversubscribed.
    torch.set_num_threads(1)
    try:
        return _run(exp, events, settings)
    finally:
        torch.set_num_threads(threads)


def _run(exp: ex.Experiment, events: str | os.PathLike[str],
         settings: ex.Settings) -> ex.RunResult:
    keras.utils.set_random_seed(exp.seed)
    x, y = exp.dataset()
    idx = ex.batch_indices(exp)
    # The batches in order, laid end to end: fit() without shuffling sees exactly these.
    xs, ys = x[idx.reshape(-1)], y[idx.reshape(-1)]
    start = time.perf_counter()
    model = build(exp)
    opt = keras.optimizers.SGD(learning_rate=exp.lr, global_clipnorm=exp.clip_norm)
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    # Only gradwatch's callback, which is async_safe: Keras may dispatch its batch ends
    # asynchronously, as it does in users' fit() calls, and the run must still see every step.
    cb = GradWatchCallback(check_every=exp.check_every, events=events, on_finding="log",
                           name=f"{exp.name} ({FRAMEWORK})", **settings.options())
    model.fit(xs, ys, batch_size=exp.batch, epochs=1, shuffle=False, verbose=0, callbacks=[cb])
    logits = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)), dtype=np.float64)
    seconds = time.perf_counter() - start
    return ex.RunResult(
        experiment=exp.name, framework=FRAMEWORK, settings=settings.name,
        findings=tuple(cb.findings), final_loss=ex.bce_with_logits(logits, y),
        final_accuracy=ex.accuracy(logits, y), seconds=seconds,
        batches=int(opt.iterations), report=cb.report(),
        versions=versions(), backend=keras.backend.backend())


def versions() -> str:
    backend = keras.backend.backend()
    try:
        mod = __import__(backend)
        return f"keras {keras.__version__} ({backend} {mod.__version__})"
    except Exception:  # a backend without __version__
        return f"keras {keras.__version__} ({backend})"
