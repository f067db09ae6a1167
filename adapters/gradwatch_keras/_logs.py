"""gradwatch's numbers in Keras' epoch ``logs``, for the callbacks after it (``CSVLogger``,
``TensorBoard``, ``EarlyStopping(monitor=...)``, ``History``)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch import kit

#: Every key gradwatch adds starts with this.
PREFIX = "gradwatch/"
#: The keys, in the order they are added.
KEYS = tuple(PREFIX + k for k in ("findings", "warnings", "grad_norm_min", "grad_norm_max"))


class EpochLogs:
    """A run plugin keeping the last check's statistics, which ``add`` writes into an epoch's
    ``logs``: how many findings so far (``gradwatch/findings``) and of them warnings
    (``gradwatch/warnings``), and the smallest and largest layer gradient norm at the epoch's
    last check (``gradwatch/grad_norm_min``, ``gradwatch/grad_norm_max``: NaN before the first
    check, or when no layer had a gradient). A few scalars, not one per layer: Keras' progress
    bar prints every key of ``logs`` (``tensorboard=`` has the per-layer curves)."""

    def __init__(self) -> None:
        self._norms: np.ndarray | None = None

    @kit.hookimpl
    def gradwatch_run_start(self, run: kit.RunInfo) -> None:
        self._norms = None

    @kit.hookimpl
    def gradwatch_step_stats(self, stats: kit.StepStats) -> None:
        norms = np.asarray(stats.grad_norm[-1], dtype=float)
        self._norms = norms[np.asarray(stats.has_grad[-1], dtype=bool) & np.isfinite(norms)]

    def add(self, logs: Any, findings: list[kit.Finding]) -> None:
        if not isinstance(logs, dict):
            return  # Keras passes a dict; anything else is not ours to change
        norms = self._norms
        some = norms is not None and norms.size > 0
        logs[KEYS[0]] = float(len(findings))
        logs[KEYS[1]] = float(sum(1 for f in findings if f.is_warning))
        logs[KEYS[2]] = float(norms.min()) if some else math.nan
        logs[KEYS[3]] = float(norms.max()) if some else math.nan
