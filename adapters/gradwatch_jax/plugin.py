"""Registers the optax adapter with gradwatch (entry point ``gradwatch: jax``): it claims optax
``GradientTransformation`` objects and runs the reference experiments. Imports no jax: this
module is loaded wherever gradwatch is, jax installed or not."""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

from gradwatch import hookimpl
from gradwatch.experiments import DEFAULT, Experiment, ExperimentRunner, RunResult, Settings


@hookimpl(trylast=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    optax = sys.modules.get("optax")
    if optax is None or not isinstance(model, optax.GradientTransformation):
        return None  # no optax imported: this cannot be an optax transformation
    from ._watcher import JaxWatcher

    if isinstance(model, JaxWatcher):
        return model
    return JaxWatcher(model, **options)


def tensorboard_opener(logdir: str) -> Callable[[], Any]:
    """For ``tensorboard=<log dir>``: a function opening ``tensorboardX.SummaryWriter(logdir)``
    (JAX has no writer of its own with ``add_scalar``); a clear ImportError now when
    tensorboardX is missing."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"tensorboard={logdir!r} needs the tensorboardX package: pip install "
                          f"tensorboardX (or pass a writer object with add_scalar/add_text)"
                          ) from exc
    return functools.partial(SummaryWriter, logdir=logdir)


class JaxRunner(ExperimentRunner):
    """The reference experiments in JAX with optax (:mod:`gradwatch_jax.experiments`, imported
    when a run starts)."""

    framework = "jax"

    def unavailable(self) -> str | None:
        for name in ("jax", "optax"):
            if name not in sys.modules and importlib.util.find_spec(name) is None:
                return f"{name} is not installed (pip install -e '.[jax]')"
        return None

    def versions(self) -> str:
        from . import experiments

        return experiments.versions()

    def run(self, exp: Experiment, events: Any, settings: Settings = DEFAULT) -> RunResult:
        from . import experiments

        return experiments.run(exp, events, settings)


@hookimpl
def gradwatch_experiment_runners() -> list[ExperimentRunner]:
    return [JaxRunner()]
