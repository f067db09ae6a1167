"""What the trainer callbacks (Lightning's, the Hugging Face Trainer's) share: checking the
watcher's options before there is a model, and keeping each check's numbers until the callback
can hand them to the trainer's loggers. It imports neither trainer."""

from __future__ import annotations

import dataclasses
from typing import Any

from gradwatch import kit

from ._amp import LossScale
from ._distributed import RANKS
from ._watcher import TORCH_OPTIONS, TorchWatcher
from .plugin import tensorboard_opener

#: Every key gradwatch logs starts with this.
PREFIX = "gradwatch/"


def validate_options(options: dict[str, Any], watched: str) -> kit.Monitor:
    """Check the options of :func:`gradwatch.torch.watch` without a model (a TypeError or
    ValueError names the bad one); ``watched`` says which optimizers the callback watches
    instead of an ``optimizer=``. Returns a Monitor that has run the core options' own checks,
    which stands in for the watcher before the first fit (no findings, an empty report)."""
    if "optimizer" in options:
        raise TypeError(f"GradWatchCallback takes no optimizer=: it watches {watched}")
    core = {k: v for k, v in options.items() if k not in TORCH_OPTIONS}
    kit.check_options("GradWatchCallback", core, TORCH_OPTIONS)
    kit.choice("update_ratio", options.get("update_ratio", "sampled"), kit.UPDATE_RATIO_MODES)
    kit.fraction("sample_fraction", options.get("sample_fraction", 0.02))
    kit.choice("ranks", options.get("ranks", "zero"), RANKS)
    kit.guard_mode(options.get("guard"))
    LossScale(options.get("scaler"))
    kit.tensorboard_sink(options.get("tensorboard"), tensorboard_opener, write=False)
    plugins = options.get("plugins", ())
    if not isinstance(plugins, (list, tuple)):
        raise TypeError(f"plugins must be a list of plugin objects, got {type(plugins).__name__}")
    return kit.Monitor(kit.empty_context(), **core)  # never started: it writes nothing


@dataclasses.dataclass
class Collected:
    """What the checks since the last hand-over measured and found."""

    #: (step, {key: value}) in step order.
    scalars: list[tuple[int, dict[str, float]]]
    #: (step, markdown) of each finding, as TensorBoard's text plugin shows it.
    texts: list[tuple[int, str]]
    findings: list[kit.Finding]

    def __bool__(self) -> bool:
        return bool(self.scalars or self.findings)


class CheckCollector:
    """A per-run plugin keeping each check's numbers until the callback hands them on (the
    check runs inside ``optimizer.step()``, where the trainers do not log).

    It is the writer of a :class:`gradwatch.kit.TensorBoardSink`, so the keys are those of
    ``tensorboard=``: ``gradwatch/grad_norm/<layer>``, ``gradwatch/update_ratio/<layer>``,
    ``gradwatch/weight_change/<layer>``, ``gradwatch/loss``; besides, ``gradwatch/findings``
    and ``gradwatch/warnings`` count the findings so far (all, and those of warning severity).
    """

    def __init__(self) -> None:
        self._kept = Collected([], [], [])
        self._rows: dict[int, dict[str, float]] = {}
        self._board = kit.TensorBoardSink(self)
        self._all = self._warnings = 0

    # the writer the TensorBoard sink writes to
    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self._rows.setdefault(int(global_step), {})[tag] = float(value)

    def add_text(self, tag: str, text: str, global_step: int) -> None:
        self._kept.texts.append((int(global_step), text))

    def flush(self) -> None:
        """The callback hands on what is kept (it needs the trainer)."""

    def _counts(self, step: int) -> None:
        row = self._rows.setdefault(int(step), {})
        row[PREFIX + "findings"] = float(self._all)
        row[PREFIX + "warnings"] = float(self._warnings)

    @kit.hookimpl
    def gradwatch_step_stats(self, stats: kit.StepStats) -> None:
        self._board.gradwatch_step_stats(stats)
        self._counts(stats.step)

    @kit.hookimpl
    def gradwatch_finding(self, finding: kit.Finding) -> None:
        self._all += 1
        self._warnings += bool(finding.is_warning)
        self._kept.findings.append(finding)
        self._board.gradwatch_finding(finding)
        self._counts(finding.step)

    def pending(self) -> bool:
        return bool(self._rows or self._kept.findings)

    def take(self) -> Collected:
        """What is kept, in step order; cleared."""
        kept, self._kept = self._kept, Collected([], [], [])
        kept.scalars, self._rows = sorted(self._rows.items()), {}
        return kept


class WatchedRuns:
    """The results side of a trainer callback: ``findings`` and ``report()`` of the current
    (or last) run, a ``fit`` or a ``train()``; before the first, those of the idle Monitor that
    checked the options (none, and an empty report)."""

    #: The watcher of the current (or last) run; ``None`` before the first.
    watcher: TorchWatcher | None
    _idle: kit.Monitor

    def _monitor(self) -> kit.Monitor:
        return self.watcher.monitor if self.watcher is not None else self._idle

    @property
    def findings(self) -> list[kit.Finding]:
        """Findings of the current (or last) run, in order of occurrence."""
        return self._monitor().findings

    def report(self) -> kit.Report:
        """Per-layer table and findings of the current (or last) run; ``str()`` renders it."""
        return self._monitor().report()

    def __repr__(self) -> str:
        return f"GradWatchCallback({self.watcher!r})"
