"""gradwatch: says in the training log, while it happens, that gradients vanish or explode, the
loss plateaus or diverges, or the weights stop moving, with the layer, the evidence and the fix.

Importing gradwatch imports no deep-learning framework; the adapters import theirs when a model
of theirs is watched.
"""

from __future__ import annotations

from typing import Any

from . import jax, keras, kit, torch  # noqa: E402  (none imports its framework until used)
from ._context import RunContext, RunInfo
from ._detectors import (
    DeadUnitsDetector,
    Detector,
    ExplodingGradientDetector,
    LossDivergenceDetector,
    LossPlateauDetector,
    NonFiniteDetector,
    SaturationDetector,
    UpdateRatioDetector,
    VanishingGradientDetector,
    default_detectors,
)
from ._findings import (
    KINDS,
    DeadUnitsWarning,
    ExplodingGradientWarning,
    Finding,
    GradientHealthError,
    GradientHealthWarning,
    GradWatchInternalWarning,
    LossDivergenceWarning,
    LossPlateauWarning,
    NonFiniteWarning,
    SaturationWarning,
    UpdateRatioWarning,
    VanishingGradientWarning,
)
from ._hookspecs import hookimpl, hookspec
from ._manager import adapter_names, get_plugin_manager
from ._monitor import Monitor
from ._report import LayerRow, Report
from ._stats import ActivationStats, LayerInfo, ModelInfo, StepStats, make_step_stats

__version__ = "0.1.0"


def watch(model: Any, **options: Any) -> Any:
    """Watch ``model`` with the adapter that recognises it.

    A ``torch.nn.Module`` gets a torch watcher with hooks attached (see
    :func:`gradwatch.torch.watch`); a ``keras.Model`` gets a Keras callback bound to it, to pass
    to ``fit()``. Raises :class:`TypeError` when no installed adapter claims the object.
    """
    pm = get_plugin_manager()
    watcher = pm.hook.gradwatch_claim_model(model=model, options=options)
    if watcher is None:
        names = adapter_names(pm)
        raise TypeError(
            f"gradwatch.watch: no adapter recognises a {type(model).__module__}."
            f"{type(model).__qualname__}; installed adapters: {', '.join(names) or 'none'} "
            "(torch.nn.Module, keras.Model)"
        )
    return watcher


__all__ = [
    "KINDS",
    "ActivationStats",
    "DeadUnitsDetector",
    "DeadUnitsWarning",
    "Detector",
    "ExplodingGradientDetector",
    "ExplodingGradientWarning",
    "Finding",
    "GradWatchInternalWarning",
    "GradientHealthError",
    "GradientHealthWarning",
    "LayerInfo",
    "LayerRow",
    "LossDivergenceDetector",
    "LossDivergenceWarning",
    "LossPlateauDetector",
    "LossPlateauWarning",
    "ModelInfo",
    "Monitor",
    "NonFiniteDetector",
    "NonFiniteWarning",
    "Report",
    "RunContext",
    "RunInfo",
    "SaturationDetector",
    "SaturationWarning",
    "StepStats",
    "UpdateRatioDetector",
    "UpdateRatioWarning",
    "VanishingGradientDetector",
    "VanishingGradientWarning",
    "adapter_names",
    "default_detectors",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "jax",
    "keras",
    "kit",
    "make_step_stats",
    "torch",
    "watch",
]
