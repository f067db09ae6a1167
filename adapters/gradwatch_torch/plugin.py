"""Registers the PyTorch adapter with gradwatch (entry point ``gradwatch: torch``): it claims
``torch.nn.Module`` models and runs the reference experiments. Imports no torch: this module is
loaded wherever gradwatch is, torch installed or not."""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

from gradwatch import hookimpl
from gradwatch.experiments import DEFAULT, Experiment, ExperimentRunner, RunResult, Settings


@hookimpl(trylast=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None  # no torch imported: this cannot be a torch model
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return None  # a Keras model on the torch backend is the Keras adapter's
    from ._watcher import TorchWatcher

    return TorchWatcher(model, **options)


def tensorboard_opener(logdir: str) -> Callable[[], Any]:
    """For ``tensorboard=<log dir>``: a function opening
    ``torch.utils.tensorboard.SummaryWriter(logdir)``; a clear ImportError now when the
    tensorboard package (which it writes through) is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"tensorboard={logdir!r} needs the tensorboard package: pip install "
                          f"tensorboard (or pass a writer object)") from exc
    return functools.partial(SummaryWriter, log_dir=logdir)


class TorchRunner(ExperimentRunner):
    """The reference experiments in PyTorch (:mod:`gradwatch_torch.experiments`, imported when
    a run starts)."""

    framework = "torch"

    def unavailable(self) -> str | None:
        if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed (pip install torch)"
        return None

    def versions(self) -> str:
        from .experiments import versions

        return versions()

    def run(self, exp: Experiment, events: str | os.PathLike[str],
            settings: Settings = DEFAULT) -> RunResult:
        from .experiments import run

        return run(exp, events, settings)


@hookimpl
def gradwatch_experiment_runners() -> list[ExperimentRunner]:
    return [TorchRunner()]
