"""The framework-neutral engine: runs detectors on each check, reports starts and clears once,
and keeps training alive when gradwatch itself fails."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import statistics
import traceback
import types
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from . import _advice, _manager
from . import _validate as v
from ._context import RunContext, RunInfo
from ._detectors import Detector
from ._findings import (
    Finding,
    GradientHealthError,
    GradWatchInternalWarning,
    register_warning_category,
)
from ._gradnorms import GradNormLog
from ._report import LayerAggregate, LayerRow, Report
from ._severity import RunEvidence, judge_all
from ._sinks import FindingSink, JsonlSink
from ._stats import StepStats
from ._tensorboard import TensorBoardSink

logger = logging.getLogger("gradwatch")

#: Options every adapter accepts; adapters add their own.
CORE_OPTIONS = ("detectors", "on_finding", "events", "check_every", "activation_every",
                "repeat_after", "name", "plugins")
#: What ``update_ratio=`` may be, in every adapter that measures update ratios.
UPDATE_RATIO_MODES = ("sampled", "exact", "off")
#: The values of every adapter's ``guard`` option (``None`` means ``"off"``).
GUARD_MODES = ("off", "skip")


def guard_mode(guard: object) -> str:
    """An adapter's ``guard`` option validated (a ValueError names it): ``"off"`` or
    ``"skip"``."""
    return v.choice("guard", "off" if guard is None else guard, GUARD_MODES)

_R = TypeVar("_R")


def check_options(who: str, options: Mapping[str, Any], own: Sequence[str] = ()) -> None:
    """Refuse an option neither the core nor the adapter knows, naming it and the valid ones:
    ``who`` is how the user called it (``"gradwatch.torch.watch"``)."""
    unknown = sorted(set(options) - set(CORE_OPTIONS))
    if unknown:
        raise TypeError(f"{who} got unexpected option(s) {', '.join(unknown)}; valid options: "
                        f"{', '.join(tuple(own) + CORE_OPTIONS)}")


def _batch(batch_id: Any) -> str:
    """`` (batch B)`` for a message, or nothing when the batch is not known."""
    return "" if batch_id is None else f" (batch {batch_id!r})"


class Monitor:
    """Runs the detectors over each :class:`StepStats` and dispatches what they find.

    Args:
        context: Layers and model summary from the adapter.
        detectors: Detector instances to run. Defaults to every plugin's
            ``gradwatch_default_detectors`` (the built-ins plus any installed).
        on_finding: ``"warn"`` (a warning of the finding's category plus an INFO log record),
            ``"log"`` (a WARNING record on the ``gradwatch`` logger), ``"raise"``
            (:class:`GradientHealthError`) or a callable taking the finding. Defaults to
            ``"warn"``.
        events: Path of a JSONL event file, or ``None``. Defaults to ``None``.
        check_every: Optimizer steps between checks (the adapter's host transfers).
            Defaults to ``10``.
        activation_every: Steps between forward-activation samples (dead/saturated units), a
            multiple of ``check_every``, or ``None`` to disable. Defaults to ``5 * check_every``.
        repeat_after: A condition that clears and starts again within this many steps is not
            reported again (flapping). Defaults to ``500``.
        name: A run name for the event file. Defaults to ``None``.
        plugins: Extra plugin objects (sinks, detectors) for this run only.
        emit: ``False`` keeps findings (``findings``, the report) but tells nobody: no warning,
            log record, callable or event file (a distributed rank that does not report).
            Strict mode still raises. Adapters set it; users do not. Defaults to ``True``.
        tensorboard: A :class:`TensorBoardSink` the adapter made from its ``tensorboard=``
            option (:func:`gradwatch.kit.tensorboard_sink`), registered like ``events`` on a
            run that emits. Defaults to ``None``.
    """

    def __init__(
        self,
        context: RunContext,
        *,
        detectors: Sequence[Detector] | None = None,
        on_finding: str | Callable[[Finding], Any] = "warn",
        events: str | os.PathLike | None = None,
        check_every: int = 10,
        activation_every: int | None | str = "auto",
        repeat_after: int = 500,
        name: str | None = None,
        plugins: Sequence[object] = (),
        emit: bool = True,
        tensorboard: TensorBoardSink | None = None,
    ) -> None:
        self.context = context
        self.check_every = v.positive_int("check_every", check_every)
        if activation_every == "auto":
            activation_every = 5 * self.check_every
        if activation_every is not None:
            activation_every = v.positive_int("activation_every", activation_every)
            if activation_every % self.check_every:
                raise ValueError(f"activation_every ({activation_every}) must be a multiple of "
                                 f"check_every ({self.check_every})")
        self.activation_every = activation_every
        self.repeat_after = v.positive_int("repeat_after", repeat_after, minimum=0)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.run_name = name
        # Before any hook call: a plugin's gradwatch_default_detectors may already fail.
        self._errors: dict[str, str] = {}
        self.pm = _manager.new_plugin_manager()
        for plugin_name, plugin in _manager.get_plugin_manager().list_name_plugin():
            if plugin is not None:
                self.pm.register(plugin, name=plugin_name)
        self.pm.register(FindingSink(on_finding, quiet=not emit), name="findings")
        if events is not None and emit:
            self.pm.register(JsonlSink(events), name="events")
        if tensorboard is not None:
            if not isinstance(tensorboard, TensorBoardSink):
                raise TypeError(f"tensorboard must be a gradwatch.kit.TensorBoardSink (see "
                                f"kit.tensorboard_sink), got {type(tensorboard).__name__}")
            if emit:
                self.pm.register(tensorboard, name="tensorboard")
        #: Whether findings are told (warnings, logs, events), or only kept.
        self.emits = bool(emit)
        self._run_info: RunInfo | None = None
        for i, plugin in enumerate(plugins):
            # The name is what a failure report says: the plugin's class (or module), not a number.
            label = plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__name__
            self.pm.register(plugin, name=f"{label} (run plugin {i})")
        if detectors is None:
            detectors = [d for group in self._call("gradwatch_default_detectors") for d in group]
        else:
            if isinstance(detectors, Detector) or not isinstance(detectors, (list, tuple)):
                raise TypeError(f"detectors must be a list of gradwatch.Detector instances, got "
                                f"{type(detectors).__name__}")
            detectors = list(detectors)
            for i, d in enumerate(detectors):
                if not isinstance(d, Detector):
                    raise TypeError(f"detectors[{i}] must be a gradwatch.Detector, got "
                                    f"{type(d).__name__}")
        for det in detectors:
            # A third-party detector may name the warning class of its own kinds.
            for kind, category in getattr(det, "categories", {}).items():
                register_warning_category(kind, category)
        self.detectors: list[Detector] = detectors
        #: Findings in order of occurrence (starts only; clears go to the log and event file).
        self.findings: list[Finding] = []
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new run: detectors, findings and summaries are cleared."""
        for det in self.detectors:
            try:
                det.bind(self.context)
            except Exception as exc:
                self.internal_error(f"detector {type(det).__name__}.bind", exc)
        self.findings = []
        self._active: dict[int, dict[tuple[str, str | None], Finding]] = {}
        self._last_start: dict[tuple[str, str | None], int] = {}
        self._silent: set[tuple[str, str | None]] = set()
        # Conditions that started as info: one that becomes a warning is told again, as news.
        self._info_started: set[tuple[str, str | None]] = set()
        self._aggregate = LayerAggregate(len(self.context.layers))
        self._steps = 0
        self._checks = 0
        self._suppressed = 0
        self._skipped = 0
        self._scaler_skipped = 0
        self._norms = GradNormLog()
        self._loss_first = math.nan
        self._loss_last = math.nan
        self._ended = False
        self._started = False
        self._trend = _RunTrend()

    def start(self) -> None:
        """The run begins: sinks hear ``gradwatch_run_start`` (once per run)."""
        if not self._started:
            self._started = True
            self._call("gradwatch_run_start", run=self.run_info)

    @property
    def run_info(self) -> RunInfo:
        """The frozen description sinks receive (remade after each change of the model)."""
        if self._run_info is None:
            ctx = self.context
            self._run_info = RunInfo(name=self.run_name, framework=ctx.model.framework,
                                     layers=ctx.layers, model=ctx.model,
                                     check_every=self.check_every,
                                     activation_every=self.activation_every)
        return self._run_info

    def update_model(self, **changes: Any) -> None:
        """Tell the monitor what the adapter learnt about the model since watch time
        (``learning_rates=``, ``clipping=``, ``residual=``, any :class:`ModelInfo` field);
        detectors see it at their next check. Unchanged values cost nothing."""
        model = self.context.model
        if all(getattr(model, key) == value for key, value in changes.items()):
            return
        self.context.model = dataclasses.replace(model, **changes)
        self._run_info = None

    def set_context(self, context: RunContext) -> None:
        """The adapter's view of the model changed (new layers): rebind and keep going."""
        self.context = context
        self._run_info = None
        self._aggregate = LayerAggregate(len(context.layers))
        for det in self.detectors:
            try:
                det.bind(context)
            except Exception as exc:
                self.internal_error(f"detector {type(det).__name__}.bind", exc)

    def is_check_step(self, step: int) -> bool:
        return step % self.check_every == 0

    def is_activation_step(self, step: int) -> bool:
        return self.activation_every is not None and step % self.activation_every == 0

    def is_detail_step(self, step: int) -> bool:
        """Check steps that also measure max |g| and zero fractions: every
        ``activation_every`` steps, or every 5th check without activation sampling. No
        detector needs them at every check, and they cost more than the norms."""
        every = self.activation_every or 5 * self.check_every
        return step % every == 0

    def guard(self, where: str, fn: Callable[..., _R], *args: Any) -> _R | None:
        """Run ``fn(*args)`` for an adapter: gradwatch's own failure is reported once (as
        ``where``) and ``None`` returned, so training goes on; strict mode's error and warnings
        turned into errors propagate."""
        try:
            return fn(*args)
        except (GradientHealthError, Warning):
            raise
        except Exception as exc:
            self.internal_error(where, exc)
            return None

    # -- the check ---------------------------------------------------------------------------

    def check(self, stats: StepStats) -> list[Finding]:
        """Run every detector on ``stats``; return the findings that started at this check."""
        self.start()
        self._checks += 1
        self._steps = max(self._steps, int(stats.step))
        try:
            self._aggregate.add(stats)
            self._norms.add(stats)
            finite = stats.loss[stats.has_loss & np.isfinite(stats.loss)]
            if finite.size:
                if math.isnan(self._loss_first):
                    self._loss_first = float(finite[0])
                self._loss_last = float(finite[-1])
        except Exception as exc:
            self.internal_error("report aggregation", exc)
        self._call("gradwatch_step_stats", run=self.run_info, stats=stats)
        results = []
        with np.errstate(all="ignore"):  # extreme inputs are data, not warnings
            for det in self.detectors:
                try:
                    result = det.update(stats)
                except Exception as exc:
                    self.internal_error(f"detector {type(det).__name__}", exc)
                    continue
                if result is not None:
                    results.append((det, result))
            try:
                results = self._judge(stats, results)
            except Exception as exc:
                self.internal_error("severity rules", exc)
        started: list[tuple[int, Finding]] = []
        cleared: list[Finding] = []
        for det, result in results:
            self._transition(det, result, started, cleared)
        # Once values are NaN/Inf every other statistic is a consequence, not news.
        bad_since = min((f.step for d in self._active.values() for f in d.values()
                         if f.kind == "nonfinite"), default=None)
        started.sort(key=lambda item: item[1].step)
        emitted = []
        for det_id, f in started:
            key = (f.kind, f.layer)
            if bad_since is not None and f.kind != "nonfinite" and f.step >= bad_since:
                # Not active: if it still holds once the values are finite again, it is news.
                del self._active[det_id][key]
                self._suppressed += 1
                continue
            last = self._last_start.get(key)
            self._last_start[key] = f.step
            escalated = key in self._info_started and f.is_warning
            self._info_started.discard(key)
            if not f.is_warning:
                self._info_started.add(key)
            if last is not None and f.step - last < self.repeat_after and not escalated:
                self._silent.add(key)  # active, but neither its start nor its clear is told
                self._suppressed += 1
                continue
            self.findings.append(f)
            emitted.append(f)
            self._call("gradwatch_finding", run=self.run_info, finding=f)
        for f in cleared:
            key = (f.kind, f.layer)
            if key in self._silent:
                self._silent.discard(key)
                continue
            self._call("gradwatch_finding_cleared", run=self.run_info, finding=f,
                       step=stats.step)
        return emitted

    def step_skipped(self, step: int, bad_layers: Sequence[int],
                     batch_id: Any = None) -> Finding | None:
        """The adapter's guard did not apply optimizer step ``step``: the gradients of the
        layers ``bad_layers`` (indices into the context's layers) were not finite. Counted in
        ``report().skipped_steps``; a ``nonfinite`` warning naming the first of them is told
        now, at that step (not at the next check), unless one was told within
        ``repeat_after`` steps. ``batch_id``: the batch that step trained on, where the adapter
        knows it. Returns the finding told, or ``None``."""
        self.start()
        self._skipped += 1
        names = [self.context.layers[i].name for i in bad_layers
                 if 0 <= i < len(self.context.layers)]
        layer = names[0] if names else None
        where = (f"the gradients of {self.context.span(list(bad_layers))} are non-finite"
                 if names else "the gradients are non-finite")
        finding = Finding(
            kind="nonfinite", step=step, layer=layer, value=math.nan, threshold=math.inf,
            message=(f"step {step}{_batch(batch_id)}: {where}; the guard skipped this "
                     f"optimizer step, so the weights and the optimizer state are as they were "
                     f"before it ({self._skipped} skipped so far)."),
            advice=_advice.nonfinite(self.context, in_loss_only=False),
            evidence={"layers": names, "skipped": True,
                      **({"batch_id": batch_id} if batch_id is not None else {})})
        key = (finding.kind, finding.layer)
        last = self._last_start.get(key)
        if last is not None and step - last < self.repeat_after:
            self._suppressed += 1
            return None
        self._last_start[key] = step
        self.findings.append(finding)
        self._call("gradwatch_finding", run=self.run_info, finding=finding)
        return finding

    def scaler_skipped(self, step: int, count: int = 1) -> Finding | None:
        """The AMP loss scaler (``torch.amp.GradScaler``) skipped ``count`` optimizer steps
        before step ``step``: its scaled gradients overflowed, and it lowered the scale. That
        is how a loss scaler finds its scale, not a problem: counted in
        ``report().scaler_skipped_steps`` and told once, as an ``info`` finding (never a
        warning, never a divergence or an explosion). Returns the finding told, or ``None``."""
        self.start()
        first = self._scaler_skipped == 0
        self._scaler_skipped += count
        if not first or count <= 0:
            return None
        finding = Finding(
            kind="nonfinite", step=step, layer=None, value=math.nan, threshold=math.inf,
            message=(f"step {step}: the AMP loss scaler skipped an optimizer step (its scaled "
                     f"gradients overflowed to inf/NaN, so it lowered the loss scale and did "
                     f"not apply them). This is normal while a scaler finds its scale and is "
                     f"said once; the report counts every such step."),
            severity="info", evidence={"scaler_skipped": True})
        self.findings.append(finding)
        self._call("gradwatch_finding", run=self.run_info, finding=finding)
        return finding

    def _judge(self, stats: StepStats,
               results: list[tuple[Detector, list[Finding]]]) -> list[tuple[Detector, list[Finding]]]:
        """Give each finding of this check its severity from the run as a whole."""
        model = self.context.model
        self._trend.add(stats, model.learning_rates)
        flat = [f for _, result in results for f in result]
        if not flat:
            return results
        seen = frozenset(f.kind for f in self.findings if f.is_warning)
        evidence = self._trend.evidence(stats.step, seen=seen, clipping=bool(model.clipping))
        # The rules weigh the built-in detectors' findings; a third-party detector sets the
        # severity of its own.
        ruled = [type(det).__module__ == Detector.__module__
                 for det, result in results for _ in result]
        judged = iter(judge_all(flat, evidence, ruled))
        return [(det, [next(judged) for _ in result]) for det, result in results]

    def _transition(self, det: Detector, result: list[Finding],
                    started: list[tuple[int, Finding]], cleared: list[Finding]) -> None:
        before = self._active.get(id(det), {})
        now: dict[tuple[str, str | None], Finding] = {}
        for f in result:
            key = (f.kind, f.layer)
            if key in before and not (f.is_warning and not before[key].is_warning):
                now[key] = before[key]
            elif key not in now:
                now[key] = f
                started.append((id(det), f))
        cleared.extend(f for key, f in before.items() if key not in now)
        self._active[id(det)] = now

    # -- failures ----------------------------------------------------------------------------

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Report a failure of gradwatch itself once per place; training goes on."""
        if where in self._errors:
            return
        text = f"{type(exc).__name__}: {exc}"
        self._errors[where] = text
        logger.error("gradwatch: %s failed and is skipped from now on where possible; training "
                     "continues.\n%s", where, "".join(traceback.format_exception(exc)))
        warnings.warn(f"gradwatch: {where} failed ({text}); training continues",
                      GradWatchInternalWarning, stacklevel=3)

    def _call(self, hook: str, **kwargs: Any) -> list[Any]:
        return _manager.call_each(self.pm, hook, self.internal_error, **kwargs)

    # -- results -----------------------------------------------------------------------------

    def note_steps(self, step: int) -> None:
        """The adapter tells the monitor how many optimizer steps have completed."""
        self._steps = max(self._steps, step)

    def report(self) -> Report:
        agg = self._aggregate
        flags: dict[str, list[str]] = {}
        for f in self.findings:
            if not f.is_warning:
                continue  # a fact, not a problem: the layer's row still says "ok"
            names = [f.layer] if f.layer is not None else []
            names += list(f.evidence.get("layers", [])) if isinstance(f.evidence, dict) else []
            for n in names:
                flags.setdefault(n, [])
                if f.kind not in flags[n]:
                    flags[n].append(f.kind)
        typical = agg.typical()
        rows = tuple(
            LayerRow(name=layer.name, type=layer.type, num_params=layer.num_params,
                     grad_norm=float(agg.last_grad[i]), grad_norm_typical=float(typical[i]),
                     update_ratio=float(agg.update_ratio[i]),
                     weight_change=float(agg.weight_change[i]),
                     flags=tuple(flags.get(layer.name, ())))
            for i, layer in enumerate(self.context.layers)
        )
        return Report(framework=self.context.model.framework, steps=self._steps,
                      checks=self._checks, layers=rows, findings=tuple(self.findings),
                      suppressed=self._suppressed,
                      internal_errors=tuple(f"{k}: {e}" for k, e in self._errors.items()),
                      loss_first=self._loss_first, loss_last=self._loss_last,
                      skipped_steps=self._skipped, scaler_skipped_steps=self._scaler_skipped,
                      grad_norms=self._norms.summary())

    def end(self) -> Report:
        """Finish the run: the summary goes to the log and the event file (once)."""
        report = self.report()
        if not self._ended:
            self.start()
            self._ended = True
            self._call("gradwatch_run_end", run=self.run_info, report=report)
        return report


class _RunTrend:
    """The run-wide signals the severity rules read: where the loss started and where it is
    going, and how far the learning rate has come down from its peak."""

    #: Losses kept for the trend (the recent and the earlier median).
    KEEP = 60
    RECENT = 20

    def __init__(self) -> None:
        self.start: list[float] = []
        self.losses: collections.deque[float] = collections.deque(maxlen=self.KEEP)
        self.peak_lr = math.nan
        self.lr = math.nan

    def add(self, stats: StepStats, learning_rates: Sequence[float]) -> None:
        finite = stats.loss[stats.has_loss & np.isfinite(stats.loss)].tolist()
        if len(self.start) < 3:
            self.start.extend(finite[:3 - len(self.start)])
        self.losses.extend(finite)
        lrs = [x for x in learning_rates if math.isfinite(x)]  # one per parameter group
        if lrs:
            self.lr = max(lrs)
            self.peak_lr = self.lr if math.isnan(self.peak_lr) else max(self.peak_lr, self.lr)

    def evidence(self, step: int, *, seen: frozenset[str], clipping: bool) -> RunEvidence:
        losses = list(self.losses)
        recent = statistics.median(losses[-self.RECENT:]) if losses else math.nan
        older = losses[:-2 * self.RECENT]
        before = statistics.median(older) if older else math.nan
        fraction = (self.lr / self.peak_lr if math.isfinite(self.lr) and self.peak_lr > 0
                    else None)
        return RunEvidence(
            step=step, seen=seen, lr_fraction=fraction, clipping=clipping,
            loss_start=statistics.median(self.start) if self.start else math.nan,
            loss_recent=recent, loss_before=before)
