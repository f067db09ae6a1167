"""Registers the optax adapter with gradwatch (entry point ``gradwatch: jax``): it claims optax
``GradientTransformation`` objects. Imports no jax: this module is loaded wherever gradwatch
is, jax installed or not."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from gradwatch import hookimpl


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
