"""The reference experiments: the classic lesson on vanishing and exploding gradients, run in
every installed framework from one numpy source of data, initial weights and batch order, and
the verdict each run must produce. ``gradwatch demo`` runs them; they are also how gradwatch
checks its own detectors.

Framework-free (numpy only). A framework takes part through a plugin whose
``gradwatch_experiment_runners`` hook returns an :class:`ExperimentRunner`; gradwatch's own
torch and keras adapters provide one each.

Example::

    from gradwatch import experiments

    runners = experiments.experiment_runners()        # {"torch": ..., "keras": ...}
    result = runners["torch"].run(experiments.get("deep-sigmoid"), "deep-sigmoid.jsonl")
    experiments.judge(experiments.get("deep-sigmoid"), {f.kind for f in result.findings})  # []
"""

from __future__ import annotations

from ._data import DATASETS, circles, moons
from ._results import RunRecord
from ._runner import (
    DEFAULT,
    EXACT,
    SETTINGS,
    ExperimentRunner,
    RunResult,
    Settings,
    experiment_runners,
    select_settings,
)
from ._shared import (
    BatchPlan,
    accuracy,
    batch_indices,
    bce_with_logits,
    initial_weights,
    layer_dims,
    layer_names,
)
from ._table import (
    ACTIVATIONS,
    EXPERIMENTS,
    GROUPS,
    INITS,
    NOT_A_BLOWUP,
    UNHEALTHY,
    Experiment,
    describe,
    get,
    judge,
    select,
)

__all__ = [
    "ACTIVATIONS",
    "DATASETS",
    "DEFAULT",
    "EXACT",
    "EXPERIMENTS",
    "GROUPS",
    "INITS",
    "NOT_A_BLOWUP",
    "SETTINGS",
    "UNHEALTHY",
    "BatchPlan",
    "Experiment",
    "ExperimentRunner",
    "RunRecord",
    "RunResult",
    "Settings",
    "accuracy",
    "batch_indices",
    "bce_with_logits",
    "circles",
    "describe",
    "experiment_runners",
    "get",
    "initial_weights",
    "judge",
    "layer_dims",
    "layer_names",
    "moons",
    "select",
    "select_settings",
]
