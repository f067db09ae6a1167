"""Running the reference experiments in a framework: the runner a plugin provides, the settings
a run is watched with, the typed result it returns, and how the runners are found."""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .._findings import Finding, GradWatchInternalWarning
from .._report import Report
from ._table import Experiment

if TYPE_CHECKING:
    import pluggy

logger = logging.getLogger("gradwatch")

# -- settings --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    """How gradwatch watches a reference run, on top of the experiment's own ``check_every``.

    Every experiment runs under each settings with the same expected verdict: the defaults must
    reach the verdicts the exact measurement reaches.
    """

    #: The name ``--settings`` selects it by; it is also in ``results.json`` and file names.
    name: str
    #: What it changes, in words.
    description: str
    #: The watcher's ``update_ratio`` option; ``None`` keeps the watcher's default (sampled).
    update_ratio: str | None = None

    def options(self) -> dict[str, Any]:
        """Keyword arguments for the watcher: only what differs from gradwatch's defaults."""
        return {} if self.update_ratio is None else {"update_ratio": self.update_ratio}


#: What users get: update ratios estimated from a fixed strided sample of each tensor.
DEFAULT = Settings("default", "gradwatch's defaults, as users get them (update ratios from a "
                              "fixed strided sample of about 2 % of each tensor)")
#: Update ratios measured on every weight, not a sample.
EXACT = Settings("exact", "update ratios measured on every weight (update_ratio='exact')",
                 update_ratio="exact")
#: Every settings, in the order runs use them.
SETTINGS: tuple[Settings, ...] = (DEFAULT, EXACT)


def select_settings(name: str) -> list[Settings]:
    """The settings called ``name``, or all of them for ``"all"``; a ``KeyError`` lists the
    valid names."""
    if name == "all":
        return list(SETTINGS)
    for s in SETTINGS:
        if s.name == name:
            return [s]
    raise KeyError(f"no settings {name!r}; choose from: all, "
                   f"{', '.join(s.name for s in SETTINGS)}")


# -- results ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One watched training run of a reference experiment, as its runner measured it."""

    #: The experiment's name.
    experiment: str
    #: The runner's framework (``"torch"``, ``"keras"``).
    framework: str
    #: The name of the :class:`Settings` the run was watched with.
    settings: str
    #: The watcher's findings, in order of occurrence.
    findings: tuple[Finding, ...]
    #: Binary cross-entropy on the whole training set after training (BatchNorm in inference
    #: mode); NaN when the weights blew up.
    final_loss: float
    #: Accuracy on the whole training set after training, 0 to 1.
    final_accuracy: float
    #: Seconds spent building and training the model (not importing the framework).
    seconds: float
    #: Optimizer steps the framework took (batches trained).
    batches: int
    #: gradwatch's end-of-run report; ``str(report)`` renders it, ``report.steps`` counts the
    #: optimizer steps gradwatch observed.
    report: Report
    #: The framework and its version, e.g. ``"torch 2.13.0"``.
    versions: str
    #: The framework's backend where it has several (Keras: ``"tensorflow"``, ``"torch"``).
    backend: str | None = None

    @property
    def steps_seen(self) -> int:
        """Optimizer steps gradwatch observed; :attr:`batches` when it lost none."""
        return self.report.steps


# -- runners ---------------------------------------------------------------------------------


class ExperimentRunner(abc.ABC):
    """Trains the reference experiments in one framework, watched by gradwatch.

    A plugin returns instances from the ``gradwatch_experiment_runners`` hook. Creating one and
    asking :meth:`unavailable` and :attr:`label` must not import the framework: the command
    line asks every runner before it decides what to run, and a plugin that imports its
    framework at load time breaks gradwatch wherever the framework is missing.

    Example::

        class MyRunner(ExperimentRunner):
            framework = "myfw"

            def versions(self) -> str:
                import myfw
                return f"myfw {myfw.__version__}"

            def run(self, exp, events, settings=DEFAULT) -> RunResult:
                from ._my_experiments import run  # imports myfw
                return run(exp, events, settings)
    """

    #: The name ``--framework`` selects the runner by; one runner per name.
    framework: ClassVar[str] = ""

    def unavailable(self) -> str | None:
        """Why this runner cannot run here (its framework is not installed, an unsupported
        backend is configured), or ``None`` when it can. Must not import the framework."""
        return None

    @property
    def label(self) -> str:
        """The run's name in the table's framework column (``"keras/tf"``). Defaults to
        :attr:`framework`."""
        return self.framework

    @abc.abstractmethod
    def versions(self) -> str:
        """The framework's versions (``"torch 2.13.0"``). Imports the framework: the demo
        calls it before the first run, so that the import is not part of any run's time."""

    @abc.abstractmethod
    def run(self, exp: Experiment, events: str | os.PathLike[str],
            settings: Settings = DEFAULT) -> RunResult:
        """Build ``exp``'s model from the shared initial weights, train it on the shared batches
        watched by gradwatch with ``settings.options()`` and ``events=events`` (the JSONL event
        file plots and checks are made from), and return what happened."""


def experiment_runners(pm: pluggy.PluginManager | None = None) -> dict[str, ExperimentRunner]:
    """Every experiment runner the registered plugins provide, by framework, in the order the
    plugins were registered (gradwatch's own torch and keras first).

    A plugin whose hook fails, or returns something that is not an :class:`ExperimentRunner`,
    is reported and skipped; the first runner of a framework wins over later ones.
    """
    if pm is None:
        from .._manager import get_plugin_manager

        pm = get_plugin_manager()
    found: dict[str, ExperimentRunner] = {}
    for impl in pm.hook.gradwatch_experiment_runners.get_hookimpls():
        try:
            runners = _checked(impl.function())
        except Exception as exc:
            _report_plugin(f"gradwatch plugin {impl.plugin_name!r}: gradwatch_experiment_runners "
                           f"failed and is skipped ({type(exc).__name__}: {exc})")
            continue
        for runner in runners:
            if runner.framework in found:
                _report_plugin(f"gradwatch plugin {impl.plugin_name!r}: a second experiment "
                               f"runner for {runner.framework!r} is ignored")
                continue
            found[runner.framework] = runner
    return found


def _checked(runners: Sequence[Any] | None) -> list[ExperimentRunner]:
    runners = list(runners or ())
    for r in runners:
        if not isinstance(r, ExperimentRunner):
            raise TypeError(f"{r!r} is not a gradwatch.experiments.ExperimentRunner")
        if not r.framework:
            raise TypeError(f"{type(r).__name__} names no framework")
    return runners


def _report_plugin(msg: str) -> None:
    logger.error(msg)
    warnings.warn(msg, GradWatchInternalWarning, stacklevel=3)
