"""Hook specifications: how adapters, detectors, sinks and experiment runners plug into gradwatch
(pluggy)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ._context import RunInfo
    from ._detectors import Detector
    from ._findings import Finding
    from ._report import Report
    from ._stats import StepStats
    from .experiments import ExperimentRunner

hookspec = pluggy.HookspecMarker("gradwatch")
hookimpl = pluggy.HookimplMarker("gradwatch")

# -------------------------------------------------------------------------
# adapters
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    """Return a watcher for ``model`` if this adapter recognises it, else ``None``.

    Stops at the first non-None result. An adapter must not import its framework just to say
    no: check ``sys.modules`` first (a model of a framework that was never imported cannot
    exist). ``options`` are the keyword arguments given to :func:`gradwatch.watch`.
    """


# -------------------------------------------------------------------------
# detectors
# -------------------------------------------------------------------------


@hookspec
def gradwatch_default_detectors() -> list[Detector]:
    """Return fresh detector instances to run when the user does not pass ``detectors=``.

    All results are used (not first-result): built-in and third-party detectors add up.
    """


# -------------------------------------------------------------------------
# sinks: everything that leaves the monitor. Each receives ``run``, a frozen
# :class:`~gradwatch.RunInfo` (name, framework, layers, model facts, check schedule): data, not
# the engine, so a sink cannot change the run it reports on.
# -------------------------------------------------------------------------


@hookspec
def gradwatch_run_start(run: RunInfo) -> None:
    """A watched run starts (its layers and model summary are known). All are called."""


@hookspec
def gradwatch_step_stats(run: RunInfo, stats: StepStats) -> None:
    """Statistics of one check arrived, before detectors run. All are called."""


@hookspec
def gradwatch_finding(run: RunInfo, finding: Finding) -> None:
    """A condition started. All are called; an exception in one does not stop the others
    (except :class:`~gradwatch.GradientHealthError` and warnings turned into errors, which
    propagate to the training loop on purpose)."""


@hookspec
def gradwatch_finding_cleared(run: RunInfo, finding: Finding, step: int) -> None:
    """A condition reported earlier no longer holds at ``step``. All are called."""


@hookspec
def gradwatch_run_end(run: RunInfo, report: Report) -> None:
    """The run ended (watcher removed, or Keras' on_train_end). All are called."""


# -------------------------------------------------------------------------
# experiments
# -------------------------------------------------------------------------

@hookspec
def gradwatch_experiment_runners() -> list[ExperimentRunner]:
    """Return the :class:`~gradwatch.experiments.ExperimentRunner` of each framework this
    plugin trains the reference experiments in (``gradwatch demo``, ``gradwatch experiments
    run``, :func:`gradwatch.experiments.experiment_runners`).

    All results are used (not first-result). Neither the plugin module nor this hook may import
    the framework: a runner says through ``unavailable()`` why it cannot run (framework not
    installed, unsupported backend) and imports its framework when a run starts.
    """
