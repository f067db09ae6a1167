"""Small real Keras models, data made in code, and a ``fit`` that records gradwatch's warnings.

Runs on whichever backend Keras loads (``KERAS_BACKEND``; TensorFlow when unset).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from typing import Any

import numpy as np
import pytest

from gradwatch.experiments import moons  # noqa: F401  (the experiments' own data set)

keras = pytest.importorskip("keras")

import gradwatch  # noqa: E402
from gradwatch import hookimpl  # noqa: E402
from gradwatch.keras import GradWatchCallback  # noqa: E402

#: The backend these tests run on: "tensorflow", "torch" or "jax".
BACKEND = keras.backend.backend()

#: What a healthy run must never report.
UNHEALTHY = {"vanishing_gradient", "exploding_gradient", "nonfinite", "stalled_update",
             "loss_divergence"}

#: 512 samples in batches of 32: 16 optimizer steps per epoch.
STEPS_PER_EPOCH = 16


def circles(n: int = 512, noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric rings (radius 1 and 0.5), alternating labels; made in code."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, 2 * math.pi, n)
    outer = np.arange(n) % 2 == 0
    r = np.where(outer, 1.0, 0.5)
    x = np.c_[r * np.cos(t), r * np.sin(t)] + rng.normal(0, noise, (n, 2))
    return x.astype("float32"), outer.astype("float32")


def mlp(depth: int, width: int = 32, activation: str = "relu", init: str = "glorot_uniform",
        bn: bool = False, name: str = "mlp", d_in: int = 2) -> keras.Sequential:
    """``depth`` hidden Dense layers named ``d0``.. and a 1-unit ``out`` (logits).

    With ``bn``: Dense ``d{i}`` (no bias, linear) -> BatchNormalization ``bn{i}`` -> Activation
    ``act{i}``.
    """
    layers: list[Any] = [keras.Input((d_in,))]
    for i in range(depth):
        if bn:
            layers += [keras.layers.Dense(width, use_bias=False, kernel_initializer=init,
                                          name=f"d{i}"),
                       keras.layers.BatchNormalization(name=f"bn{i}"),
                       keras.layers.Activation(activation, name=f"act{i}")]
        else:
            layers.append(keras.layers.Dense(width, activation=activation,
                                             kernel_initializer=init, name=f"d{i}"))
    layers.append(keras.layers.Dense(1, name="out"))
    return keras.Sequential(layers, name=name)


def compiled(model: keras.Model, lr: float = 0.05, **compile_kwargs: Any) -> keras.Model:
    """SGD at ``lr`` on binary cross-entropy from logits."""
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True), **compile_kwargs)
    return model


@dataclasses.dataclass
class Run:
    """What one ``fit`` left behind."""

    callback: GradWatchCallback | None
    history: Any
    #: gradwatch's health warnings raised during fit (recorded, not printed).
    caught: list[warnings.WarningMessage]

    @property
    def findings(self) -> list[gradwatch.Finding]:
        return self.callback.findings

    @property
    def kinds(self) -> set[str]:
        return {f.kind for f in self.callback.findings}

    @property
    def report(self) -> gradwatch.Report:
        return self.callback.report()

    @property
    def last_loss(self) -> float:
        return float(self.history.history["loss"][-1])

    def first(self, kind: str) -> gradwatch.Finding:
        found = [f for f in self.callback.findings if f.kind == kind]
        assert found, f"no {kind} finding; report:\n{self.report}"
        return found[0]

    def warned(self, category: type[Warning]) -> bool:
        return any(issubclass(w.category, category) for w in self.caught)


class SyncCallback(keras.callbacks.Callback):
    """Overrides ``on_train_batch_end`` without declaring ``async_safe``: Keras then runs every
    batch end on the training thread, in order (tests of other mechanics use it to be
    deterministic; asynchronous dispatch has its own tests)."""

    def on_train_batch_end(self, batch, logs=None):
        pass


def fit(model: keras.Model, data: tuple[np.ndarray, np.ndarray] | None = None, *,
        scale: float = 1.0, epochs: int = 10, batch_size: int = 32,
        callback: GradWatchCallback | None | str = "new", callbacks: tuple = (),
        before: tuple = (), sync: bool = False, **fit_kwargs: Any) -> Run:
    """Fit a compiled ``model`` on circles (inputs times ``scale``) with gradwatch watching.

    ``callback="new"`` makes a fresh :class:`GradWatchCallback`; ``None`` fits without one.
    ``before`` and ``callbacks`` go before and after it in the list; ``sync`` adds a
    :class:`SyncCallback`. gradwatch's own failures fail the test (pyproject turns
    GradWatchInternalWarning into an error, but recording warnings would hide it).
    """
    x, y = data if data is not None else circles()
    cb = GradWatchCallback() if callback == "new" else callback
    cbs = list(before) + ([cb] if cb is not None else []) + list(callbacks)
    if sync:
        cbs.append(SyncCallback())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x if scale == 1.0 else x * scale, y, batch_size=batch_size, epochs=epochs, verbose=0,
                            callbacks=cbs, **fit_kwargs)
    internal = [str(w.message) for w in caught
                if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
    assert not internal, "gradwatch failed internally:\n" + "\n".join(internal)
    health = [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)]
    return Run(cb, history, health)


def to_numpy(x: Any) -> np.ndarray:
    """A host copy of a tensor or variable (quietly: Keras' variables trip numpy 2's ``copy``
    deprecation, which is theirs, not ours)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return np.array(keras.ops.convert_to_numpy(x))


def jax_autodiff(model: keras.Model, x: Any, loss_of: Any, with_losses: bool = False
                 ) -> tuple[Any, Any, list[np.ndarray]]:
    """On the JAX backend: (loss, outputs, the gradient of every trainable variable) of one
    training-mode forward pass of ``model`` on ``x``, by ``jax.value_and_grad`` of Keras'
    stateless call; ``loss_of(outputs)`` is the loss, plus the model's own losses with
    ``with_losses``."""
    import jax

    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss_and_outputs(tv: list[Any]) -> tuple[Any, Any]:
        out, _, losses = model.stateless_call(tv, fixed, x, training=True, return_losses=True)
        loss = loss_of(out)
        if with_losses and losses:
            loss = loss + sum(losses)
        return loss, out

    (loss, out), grads = jax.value_and_grad(loss_and_outputs, has_aux=True)(trainable)
    return loss, out, [np.asarray(g) for g in grads]


def finding_pairs(findings) -> set[tuple[str, str | None]]:
    return {(f.kind, f.layer) for f in findings}


class StatsRecorder:
    """A run plugin that keeps every StepStats the monitor receives (and the thread it ran on)."""

    def __init__(self) -> None:
        self.stats: list[gradwatch.StepStats] = []
        self.threads: list[str] = []

    @hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        import threading

        self.stats.append(stats)
        self.threads.append(threading.current_thread().name)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same seed and a fresh Keras name/uid state."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


@contextlib.contextmanager
def one_torch_thread():
    """One intra-op thread for torch (when loaded): with ``-n 2`` on two cores, two workers with
    a thread pool each oversubscribe the CPU, and torch's spinning OpenMP threads then make a
    small model's training loop 10-100x slower (measured: 0.2 s vs 5-50 s for the same loop)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture
def float32_policy():
    """Restores the float32 dtype policy however the test ends."""
    yield
    keras.mixed_precision.set_global_policy("float32")


def deep_sigmoid(**compile_kwargs: Any) -> keras.Model:
    """The classic failure: 10 sigmoid layers of 32, SGD lr 0.1 (fit it with ``scale=100``)."""
    return compiled(mlp(10, activation="sigmoid"), lr=0.1, **compile_kwargs)


@pytest.fixture(scope="session")
def deep_sigmoid_default() -> Run:
    """Scenario 1 with default compile settings, fitted once per worker and shared."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with one_torch_thread():
        return fit(deep_sigmoid(), scale=100.0)


@pytest.fixture(scope="session")
def deep_sigmoid_short() -> Run:
    """Scenario 1 cut short for runs in slower modes: default compile, 4 epochs, checks every 5
    steps (so activations are sampled every 25)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    with one_torch_thread():
        return fit(deep_sigmoid(), scale=100.0, epochs=4, callback=GradWatchCallback(check_every=5))
