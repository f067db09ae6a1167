"""Reads a JSONL event file (``events=``) back into runs: the input of plots and reports.

Strict by design: a line that is not a JSON object with an ``"event"`` name is an error naming
the file and the 1-based line number, with one exception — a line cut off by a run killed
mid-write is dropped: the last line of the file, or the last line before a later run's ``start``
event (the writer ends a torn line before it appends). Content is only ever parsed with ``json.loads``;
nothing in the file is evaluated. The strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` that
the writer uses for non-finite numbers become floats again, in numeric fields only (a layer
that is really called ``"NaN"`` keeps its name).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._findings import Finding, from_json_number

#: Numeric fields per event type: a number (or a list of numbers) where the writer may have
#: spelled a non-finite value as a string.
_NUMERIC: dict[str, tuple[str, ...]] = {
    "stats": ("loss", "grad_norm", "grad_max", "grad_nonfinite", "grad_zero_fraction",
              "weight_norm", "update_ratio", "weight_change", "grad_norm_orthogonal"),
    "finding": ("value", "threshold"),
    "window": ("grad_norm", "loss"),
}
_ACTIVATION_NUMERIC = ("dead_fraction", "saturated_fraction")


class EventFileError(ValueError):
    """A malformed line in an event file; the message names the file and the line."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}, line {line}: {problem}")
        #: The file that was read.
        self.path = path
        #: 1-based number of the offending line.
        self.line = line


@dataclasses.dataclass
class EventLog:
    """The events of one file, in order, with non-finite numbers restored."""

    path: str
    #: One dict per line; each has ``"event"`` and a 1-based ``"_line"``.
    events: list[dict[str, Any]]
    #: The last line was cut off (and dropped): the writing process probably died.
    truncated: bool = False
    #: 1-based numbers of every dropped torn line (the last line's included).
    cut: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunLog:
    """One run of an event file (from a ``start`` event to the next), as arrays."""

    path: str
    name: str | None
    framework: str
    #: Layer names, input side first.
    layers: tuple[str, ...]
    #: Layer types (``"Linear"``, ``"Dense"``), parallel to ``layers``.
    layer_types: tuple[str, ...]
    check_every: int | None
    #: Check steps ``[C]`` and the gradient L2 norm per layer at each ``[C, L]``.
    check_steps: np.ndarray
    grad_norm: np.ndarray
    #: Every step that observed a loss ``[S]`` and that loss ``[S]``.
    loss_steps: np.ndarray
    loss: np.ndarray
    #: Relative weight change since the start per layer at the last check that measured it
    #: (0.05 = 5 %), or ``None``.
    weight_change: np.ndarray | None
    #: Update/weight ratio per layer at the last check that measured it, or ``None``.
    update_ratio: np.ndarray | None
    findings: list[Finding]
    #: ``{"step", "kind", "layer", "since"}`` per condition that cleared.
    cleared: list[dict[str, Any]]
    #: The ``end`` event's summary, or ``None`` if the run did not end cleanly.
    summary: dict[str, Any] | None
    truncated: bool = False
    #: Per warning, the window of steps before it: ``{"step", "kind", "layer", "steps" [W],
    #: "grad_norm" [W, L], "has_grad" [W, L], "loss" [W]}`` (numpy arrays), and "batch_ids"
    #: (a list ``[W]``, or ``None`` where the adapter knew no batch).
    windows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def ended(self) -> bool:
        return self.summary is not None

    @property
    def steps(self) -> int:
        """Optimizer steps the file shows (the end event's count, else the last check)."""
        if self.summary is not None and isinstance(self.summary.get("steps"), int):
            return self.summary["steps"]
        last = [self.check_steps[-1]] if self.check_steps.size else []
        last += [self.loss_steps[-1]] if self.loss_steps.size else []
        return int(max(last)) if last else 0

    @property
    def kinds(self) -> list[str]:
        """Distinct finding kinds, in order of first occurrence."""
        return list(dict.fromkeys(f.kind for f in self.findings))


def _number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, (int, float)) or value is None or isinstance(value, str):
        try:
            return from_json_number(value)
        except OverflowError:  # an integer literal beyond the float range
            raise ValueError("number out of range") from None
    raise ValueError(f"expected a number, got {type(value).__name__}")


def _numbers(value: Any) -> Any:
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return _number(value)


def _restore(event: dict[str, Any]) -> None:
    for key in _NUMERIC.get(event["event"], ()):
        if key in event:
            try:
                event[key] = _numbers(event[key])
            except ValueError as exc:
                raise ValueError(f"field {key!r}: {exc}") from None
    acts = event.get("activations") if event["event"] == "stats" else None
    if acts is not None:
        if not isinstance(acts, Mapping):
            raise ValueError("field 'activations' must be an object")
        for site, a in acts.items():
            if not isinstance(a, Mapping):
                raise ValueError(f"activation site {site!r} must be an object")
            for key in _ACTIVATION_NUMERIC:
                if key in a:
                    a[key] = _number(a[key])


def read_events(path: str | os.PathLike) -> EventLog:
    """Read every event of ``path``.

    Raises :class:`EventFileError` (a ``ValueError``) naming the file and the 1-based line for
    any malformed line but a truncated last one; blank lines are skipped.
    """
    path = os.fspath(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last complete line
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    events: list[dict[str, Any]] = []
    truncated = False
    cut: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            event = _parse(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == last:
                truncated = True  # a run killed mid-write: keep what was complete
                cut.append(i + 1)
                break
            if _starts_run(lines, i + 1):
                cut.append(i + 1)  # killed mid-write, then a new run appended to the file
                continue
            raise EventFileError(path, i + 1, _short(exc)) from None
        try:
            _restore(event)
        except (ValueError, RecursionError) as exc:
            raise EventFileError(path, i + 1, _short(exc)) from None
        event["_line"] = i + 1
        events.append(event)
    return EventLog(path=path, events=events, truncated=truncated, cut=cut)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(event, dict):
        raise ValueError(f"expected a JSON object, got {type(event).__name__}")
    if not isinstance(event.get("event"), str):
        raise ValueError('the object has no "event" name')
    return event


def _starts_run(lines: list[bytes], j: int) -> bool:
    """The first non-blank line from ``j`` on is a run's ``start`` event."""
    for line in lines[j:]:
        if line.strip():
            try:
                return _parse(line)["event"] == "start"
            except ValueError:
                return False
    return False


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _list_of(values: Any, n: int, what: str) -> np.ndarray:
    nested = isinstance(values, list) and any(isinstance(v, list) for v in values)
    if not isinstance(values, list) or len(values) != n or nested:
        got = ("nested lists" if nested else len(values)) if isinstance(values, list) \
            else type(values).__name__
        raise ValueError(f"{what} must be a list of {n} numbers (one per layer), got {got}")
    return np.asarray(values, dtype=float)


class _RunBuilder:
    def __init__(self, path: str, start: Mapping[str, Any] | None) -> None:
        self.path = path
        #: Line of the start event (0 for events before any start).
        self.first_line = start["_line"] if start else 0
        start = start or {}
        layers = start.get("layers") or []
        if not isinstance(layers, list):
            raise ValueError("field 'layers' must be a list")
        self.layers = tuple(str(layer.get("name", i)) if isinstance(layer, Mapping) else str(layer)
                            for i, layer in enumerate(layers))
        self.types = tuple(str(layer.get("type", "")) if isinstance(layer, Mapping) else ""
                           for layer in layers)
        name = start.get("run")
        self.name = name if isinstance(name, str) else None
        self.framework = str(start.get("framework") or "unknown")
        every = start.get("check_every")
        self.check_every = every if isinstance(every, int) and not isinstance(every, bool) else None
        self.check_steps: list[int] = []
        self.grads: list[np.ndarray] = []
        self.loss_steps: list[int] = []
        self.loss: list[float] = []
        self.weight_change: np.ndarray | None = None
        self.update_ratio: np.ndarray | None = None
        self.findings: list[Finding] = []
        self.cleared: list[dict[str, Any]] = []
        self.windows: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None

    def add(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "stats":
            self._stats(event)
        elif kind == "finding":
            self.findings.append(Finding.from_dict(event))
        elif kind == "cleared":
            self.cleared.append({k: event.get(k) for k in ("step", "kind", "layer", "since")})
        elif kind == "window":
            self.windows.append(self._window(event))
        elif kind == "end":
            summary = event.get("summary")
            self.summary = dict(summary) if isinstance(summary, Mapping) else {}
        # Other event types (from newer writers or plugins) are kept out of the run, not errors.

    def _stats(self, event: dict[str, Any]) -> None:
        grad = event.get("grad_norm")
        if not self.layers and isinstance(grad, list):
            # A file without its start event: name layers by position.
            self.layers = tuple(str(i) for i in range(len(grad)))
            self.types = ("",) * len(grad)
        n = len(self.layers)
        step = event.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"field 'step' must be an int, got {step!r}")
        self.check_steps.append(step)
        self.grads.append(_list_of(grad, n, "field 'grad_norm'"))
        steps, loss = event.get("steps"), event.get("loss")
        has_loss = event.get("has_loss")
        if steps is not None or loss is not None:
            if not isinstance(steps, list) or not isinstance(loss, list) or len(steps) != len(loss):
                raise ValueError("fields 'steps' and 'loss' must be lists of the same length")
            if not isinstance(has_loss, list) or len(has_loss) != len(loss):
                has_loss = [not math.isnan(x) for x in loss]
            for s, x, h in zip(steps, loss, has_loss):
                if h:
                    self.loss_steps.append(int(s))
                    self.loss.append(float(x))
        for key in ("weight_change", "update_ratio"):
            if event.get(key) is not None:
                setattr(self, key, _list_of(event[key], n, f"field {key!r}"))

    def _window(self, event: dict[str, Any]) -> dict[str, Any]:
        steps, grad, has = event.get("steps"), event.get("grad_norm"), event.get("has_grad")
        if not isinstance(steps, list) or not isinstance(grad, list) or len(grad) != len(steps):
            raise ValueError("fields 'steps' and 'grad_norm' must be lists of the same length")
        n = len(self.layers)
        rows = np.array([_list_of(row, n, "field 'grad_norm'") for row in grad],
                        dtype=float).reshape(len(steps), n)
        mask = np.ones(rows.shape, dtype=bool)
        if isinstance(has, list) and len(has) == len(steps):
            mask = np.array([_list_of(h, n, "field 'has_grad'") for h in has],
                            dtype=bool).reshape(rows.shape)
        loss = event.get("loss")
        batches = event.get("batch_ids")
        if batches is not None and (not isinstance(batches, list) or len(batches) != len(steps)):
            raise ValueError("field 'batch_ids' must be a list with one entry per step")
        return {"step": event.get("step"), "kind": event.get("kind"), "layer": event.get("layer"),
                "batch_ids": batches,
                "steps": np.asarray(steps, dtype=int), "grad_norm": rows, "has_grad": mask,
                "loss": np.asarray(loss if isinstance(loss, list) and len(loss) == len(steps)
                                   else [math.nan] * len(steps), dtype=float)}

    def build(self, truncated: bool) -> RunLog:
        n = len(self.layers)
        return RunLog(
            path=self.path, name=self.name, framework=self.framework, layers=self.layers,
            layer_types=self.types, check_every=self.check_every,
            check_steps=np.asarray(self.check_steps, dtype=int),
            grad_norm=np.array(self.grads, dtype=float).reshape(len(self.grads), n),
            loss_steps=np.asarray(self.loss_steps, dtype=int),
            loss=np.asarray(self.loss, dtype=float),
            weight_change=self.weight_change, update_ratio=self.update_ratio,
            findings=self.findings, cleared=self.cleared, summary=self.summary,
            truncated=truncated, windows=self.windows,
        )


def runs_from_events(log: EventLog) -> list[RunLog]:
    """Split an event log into runs: each ``start`` event begins one (a file that was appended
    to by several runs holds several)."""
    builders: list[_RunBuilder] = []
    for event in log.events:
        try:
            if event["event"] == "start":
                builders.append(_RunBuilder(log.path, event))
                continue
            if not builders:
                builders.append(_RunBuilder(log.path, None))
            builders[-1].add(event)
        except (ValueError, KeyError, TypeError, OverflowError) as exc:
            raise EventFileError(log.path, event["_line"], _short(exc)) from None
    # A run is truncated when a torn line was dropped between its start and the next run's.
    bounds = [b.first_line for b in builders] + [math.inf]
    return [b.build(truncated=any(bounds[i] < c < bounds[i + 1] for c in log.cut))
            for i, b in enumerate(builders)]


def read_runs(path: str | os.PathLike) -> list[RunLog]:
    """:func:`read_events` then :func:`runs_from_events`."""
    return runs_from_events(read_events(path))


def first_last_ratio(run: RunLog) -> float:
    """Median over the checks of (first layer's gradient norm / last layer's): ~1 when gradient
    reaches the input side, tiny when it vanishes on the way. NaN when it cannot be computed."""
    if run.grad_norm.shape[0] == 0 or run.grad_norm.shape[1] < 2:
        return math.nan
    first, last = run.grad_norm[:, 0], run.grad_norm[:, -1]
    ok = np.isfinite(first) & np.isfinite(last) & (last > 0)
    if not ok.any():
        return math.nan
    return float(np.median(first[ok] / last[ok]))


def weight_change_percent(run: RunLog) -> dict[str, float]:
    """Per-layer weight change since the start, in percent, at the last check measuring it."""
    if run.weight_change is None:
        return {}
    return {name: float(100 * x) for name, x in zip(run.layers, run.weight_change)}


def finding_rows(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """``{"kind", "step", "layer"}`` of each finding, in order."""
    return [{"kind": f.kind, "step": f.step, "layer": f.layer} for f in findings]
