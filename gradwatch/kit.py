"""The adapter kit: everything a framework adapter needs from gradwatch's core, by public name.

The built-in PyTorch and Keras adapters import from here and from :mod:`gradwatch` only,
exactly as a third party's adapter would. An adapter's job is to measure per-tensor numbers on
the device and move them to the host once per check; the kit does the rest:

* :func:`check_options` refuses options nobody knows, naming them;
* :class:`Monitor` is the engine (``monitor.guard`` runs hook bodies so that gradwatch's own
  failures never stop training; ``monitor.update_model`` says what changed about the model;
  ``Monitor(..., emit=False)`` keeps findings on a rank that does not report);
* :class:`TensorLayout` + :class:`CheckRecord` -> :func:`step_stats` turns one check's
  per-tensor numbers into the per-layer :class:`StepStats` the detectors read;
* :func:`sample_stride` chooses the strided sample kept for update ratios;
  :data:`SAMPLED_ACTIVATIONS` and :data:`SATURATION_DERIVATIVE` say which activation outputs to
  sample and where a sigmoid/tanh counts as saturated;
* :func:`tensorboard_sink` validates an adapter's ``tensorboard=`` option and makes the
  :class:`TensorBoardSink` its Monitor writes to (the adapter turns a log directory into a
  writer with its framework's own ``SummaryWriter`` or ``tf.summary``).

docs/plugins.md shows a complete adapter.
"""

from __future__ import annotations

from ._context import RunContext, RunInfo, empty_context
from ._detectors import SATURATION_DERIVATIVE
from ._findings import Finding, GradientHealthError
from ._hookspecs import hookimpl
from ._monitor import (
    CORE_OPTIONS,
    GUARD_MODES,
    UPDATE_RATIO_MODES,
    Monitor,
    check_options,
    guard_mode,
)
from ._record import (
    SAMPLED_ACTIVATIONS,
    ActivationSite,
    CheckRecord,
    TensorLayout,
    activation_stats,
    step_stats,
)
from ._report import Report, plain
from ._stats import (
    MIN_SAMPLES,
    ActivationStats,
    LayerInfo,
    ModelInfo,
    StepStats,
    orthogonal_norms,
    sample_stride,
)
from ._tensorboard import TensorBoardSink, tensorboard_sink
from ._validate import choice, fraction, positive_int

__all__ = [
    "CORE_OPTIONS",
    "GUARD_MODES",
    "MIN_SAMPLES",
    "SAMPLED_ACTIVATIONS",
    "SATURATION_DERIVATIVE",
    "UPDATE_RATIO_MODES",
    "ActivationSite",
    "ActivationStats",
    "CheckRecord",
    "Finding",
    "GradientHealthError",
    "LayerInfo",
    "ModelInfo",
    "Monitor",
    "Report",
    "RunContext",
    "RunInfo",
    "StepStats",
    "TensorBoardSink",
    "TensorLayout",
    "activation_stats",
    "check_options",
    "choice",
    "empty_context",
    "fraction",
    "guard_mode",
    "hookimpl",
    "orthogonal_norms",
    "plain",
    "positive_int",
    "sample_stride",
    "step_stats",
    "tensorboard_sink",
]
