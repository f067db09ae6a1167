"""Registers the Keras adapter with gradwatch (entry point ``gradwatch: keras``): it claims
``keras.Model`` models and runs the reference experiments. Imports no Keras: this module is
loaded wherever gradwatch is, Keras installed or not."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from gradwatch import hookimpl
from gradwatch.experiments import DEFAULT, Experiment, ExperimentRunner, RunResult, Settings

#: Keras backends the callback supports.
BACKENDS = ("tensorflow", "torch", "jax")


@hookimpl(trylast=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Model):
        return None  # keras was never imported: this cannot be a Keras model
    from ._callback import GradWatchCallback

    callback = GradWatchCallback(**options)
    callback.set_model(model)
    return callback


def configured_backend() -> str:
    """The backend Keras will load, read as Keras reads it (``KERAS_BACKEND``, else
    ``keras.json`` under ``KERAS_HOME`` or ``~/.keras``, else TensorFlow), without importing
    Keras; the backend it did load when it is imported already."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return str(keras.backend.backend())
    backend = os.environ.get("KERAS_BACKEND")
    if backend:
        return backend
    config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                          "keras.json")
    try:
        with open(config, encoding="utf-8") as fh:
            return str(json.load(fh).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def tensorboard_opener(logdir: str) -> Callable[[], Any]:
    """For ``tensorboard=<log dir>``: a function opening a writer with what the backend
    brings: PyTorch's ``SummaryWriter`` on the torch backend, ``tf.summary`` otherwise. A
    clear ImportError now when what it writes through is missing."""
    hint = (f"tensorboard={logdir!r} needs the tensorboard package: pip install tensorboard "
            f"(or pass a writer object)")
    if configured_backend() == "torch":
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(hint) from exc
        return functools.partial(SummaryWriter, log_dir=logdir)
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise ImportError(hint.replace("tensorboard package: pip install tensorboard",
                                       "tensorflow package: pip install tensorflow")) from exc
    if not callable(getattr(tf.summary, "scalar", None)):  # tf.summary's ops come from it
        raise ImportError(hint)
    return functools.partial(TfSummaryWriter, logdir)


class TfSummaryWriter:
    """The writer interface gradwatch writes through (``add_scalar``, ``add_text``,
    ``flush``, ``close``), on ``tf.summary``'s file writer (TF2 summaries: TensorBoard and
    ``EventAccumulator.Tensors`` read them)."""

    def __init__(self, logdir: str) -> None:
        import tensorflow as tf

        self._tf = tf
        #: The ``tf.summary`` file writer.
        self.writer = tf.summary.create_file_writer(logdir)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        with self.writer.as_default():
            self._tf.summary.scalar(tag, value, step=global_step)

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        with self.writer.as_default():
            self._tf.summary.text(tag, text, step=global_step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class KerasRunner(ExperimentRunner):
    """The reference experiments in Keras 3 on its configured backend
    (:mod:`gradwatch_keras.experiments`, imported when a run starts)."""

    framework = "keras"

    def unavailable(self) -> str | None:
        if "keras" not in sys.modules and importlib.util.find_spec("keras") is None:
            return "Keras is not installed (pip install -e '.[keras]')"
        backend = configured_backend()
        if backend not in BACKENDS:
            return (f"the Keras callback does not support Keras' {backend!r} backend yet "
                    f"(set KERAS_BACKEND to {' or '.join(BACKENDS)})")
        if backend not in sys.modules and importlib.util.find_spec(backend) is None:
            return f"Keras' backend {backend!r} is not installed"
        return None

    @property
    def label(self) -> str:
        backend = configured_backend()
        return f"keras/{'tf' if backend == 'tensorflow' else backend}"

    def versions(self) -> str:
        return _experiments().versions()

    def run(self, exp: Experiment, events: str | os.PathLike[str],
            settings: Settings = DEFAULT) -> RunResult:
        return _experiments().run(exp, events, settings)


def _experiments() -> Any:
    # TensorFlow's C++ start-up chatter is not part of the experiments' output.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from . import experiments

    return experiments


@hookimpl
def gradwatch_experiment_runners() -> list[ExperimentRunner]:
    return [KerasRunner()]
