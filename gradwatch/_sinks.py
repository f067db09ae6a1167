"""Built-in sinks: Python warnings, the ``gradwatch`` logger, and a JSONL event file."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from ._findings import Finding, GradientHealthError, to_json_ready
from ._hookspecs import hookimpl
from ._report import plain

logger = logging.getLogger("gradwatch")
# A library logs; the application decides where it goes. Without this, logging's last-resort
# handler would print every record a second time next to the warning.
logger.addHandler(logging.NullHandler())

ON_FINDING = ("warn", "log", "raise")

# Frames from these packages are skipped so a warning points at the user's line (the
# `optimizer.step()` or `loss.backward()` that triggered the check), not at gradwatch internals.
_INTERNAL = ("gradwatch", "pluggy", "torch", "keras", "tensorflow", "jax", "contextlib")


def _user_stacklevel() -> int:
    level, frame = 1, sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        root = module.split(".")[0]
        if root not in _INTERNAL and not root.startswith("gradwatch"):
            return level
        frame = frame.f_back
        level += 1
    return 1


class FindingSink:
    """Turns a new finding into a warning, a log record, an exception or a callback.

    ``quiet``: a run that keeps its findings but says nothing (a distributed rank that does not
    emit); strict mode still stops it, so every rank stops together.
    """

    def __init__(self, on_finding: str | Callable[[Finding], Any] = "warn", *,
                 quiet: bool = False) -> None:
        if not callable(on_finding) and on_finding not in ON_FINDING:
            raise ValueError(
                f"on_finding must be one of {', '.join(map(repr, ON_FINDING))} or a callable "
                f"taking a Finding; got {on_finding!r}"
            )
        #: "warn", "log", "raise" or a callable.
        self.on_finding = on_finding
        #: Nothing is told; only strict mode acts.
        self.quiet = quiet

    @hookimpl
    def gradwatch_finding(self, finding: Finding) -> None:
        # Layer names are the model's own strings: no escape sequence or line break reaches the
        # terminal through them.
        mode = self.on_finding
        if self.quiet:
            if mode == "raise" and finding.is_warning:
                raise GradientHealthError(finding)
            return
        text = plain(finding.render())
        if not finding.is_warning:
            # A fact, not a problem: the log and the findings list have it; no Python warning,
            # no strict-mode stop, no callback (which is there to act on problems).
            logger.info("%s (info): %s", finding.category.__name__, text)
            return
        if mode == "warn":
            logger.info("%s: %s", finding.category.__name__, text)
            warnings.warn(text, finding.category, stacklevel=_user_stacklevel())
        elif mode == "log":
            logger.warning("%s: %s", finding.category.__name__, text)
        elif mode == "raise":
            logger.error("%s: %s", finding.category.__name__, text)
            raise GradientHealthError(finding)
        else:
            logger.info("%s: %s", finding.category.__name__, text)
            mode(finding)

    @hookimpl
    def gradwatch_finding_cleared(self, finding: Finding, step: int) -> None:
        if self.quiet:
            return
        where = f" in layer '{plain(finding.layer)}'" if finding.layer is not None else ""
        logger.info("step %d: %s%s (reported at step %d) has cleared.", step, plain(finding.kind),
                    where, finding.step)

    @hookimpl
    def gradwatch_run_end(self, report) -> None:
        if self.quiet:
            return
        logger.info("gradwatch summary:\n%s", report)


class JsonlSink:
    """Appends one JSON object per line to ``path``, flushed per event.

    Every complete line is valid JSON on its own, so a run killed mid-write leaves a readable
    file with at most a truncated last line. Non-finite numbers are written as the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"events must be a path (str or os.PathLike), got {type(path).__name__}")
        #: Where events go.
        self.path = os.fspath(path)
        self._file = None
        self._broken = False
        self._last_stats = None  # the last check's StepStats: the window a warning follows

    def _write(self, event: dict[str, Any]) -> None:
        if self._broken:
            return
        try:
            self._write_line(event)
        except Exception:
            # Reported once by the monitor; the other sinks and training carry on. The file is
            # let go now: closing it at the end would fail again (a full disk still cannot take
            # the buffered bytes) and be reported a second time.
            self._broken = True
            self._drop()
            raise

    def _write_line(self, event: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            torn = _ends_mid_line(self.path)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run
            if torn:
                # An earlier run was killed mid-line: end that line, so this run's first event
                # is a line of its own and the reader can drop just the torn one.
                self._file.write("\n")
        event = {"event": event.pop("event"), "time": round(time.time(), 3), **event}
        self._file.write(json.dumps(to_json_ready(event), allow_nan=False) + "\n")
        self._file.flush()

    @hookimpl
    def gradwatch_run_start(self, run) -> None:
        self._write({
            "event": "start", "run": run.name, "framework": run.framework,
            "layers": [vars(layer) for layer in run.layers],
            "model": {k: sorted(x) if isinstance(x, frozenset) else x
                      for k, x in vars(run.model).items()},
            "check_every": run.check_every,
        })

    @hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        self._last_stats = stats
        event = {"event": "stats", "step": stats.step, "steps": stats.steps,
                 "loss": stats.loss, "has_loss": stats.has_loss, "grad_norm": stats.grad_norm[-1],
                 "has_grad": stats.has_grad[-1]}
        for name in ("grad_max", "grad_nonfinite", "grad_zero_fraction", "weight_norm",
                     "update_ratio", "weight_change", "grad_norm_orthogonal"):
            value = getattr(stats, name)
            if value is not None:
                event[name] = value
        if stats.activations:
            event["activations"] = {k: vars(a) for k, a in stats.activations.items()}
        self._write(event)

    @hookimpl
    def gradwatch_finding(self, finding: Finding) -> None:
        self._write({"event": "finding", **finding.to_dict()})
        last = self._last_stats
        if finding.is_warning and last is not None:
            # Forensics: what every layer did step by step in the window before the warning
            # (the check's per-step rows; the stats event keeps only the check step's).
            self._write({"event": "window", "step": finding.step, "kind": finding.kind,
                         "layer": finding.layer, "steps": last.steps,
                         "grad_norm": last.grad_norm, "has_grad": last.has_grad,
                         "loss": last.loss,
                         **({"batch_ids": list(last.batch_ids)}
                            if last.batch_ids is not None else {})})

    @hookimpl
    def gradwatch_finding_cleared(self, finding: Finding, step: int) -> None:
        self._write({"event": "cleared", "step": step, "kind": finding.kind,
                     "layer": finding.layer, "since": finding.step})

    @hookimpl
    def gradwatch_run_end(self, report) -> None:
        self._write({"event": "end", "step": report.steps, "summary": report.summary()})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drop(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except Exception:  # already reported; nothing more to say
                pass


def _ends_mid_line(path: str) -> bool:
    """The file exists, is not empty and its last byte is not a newline."""
    try:
        with open(path, "rb") as fh:
            if fh.seek(0, os.SEEK_END) == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False  # not there yet (or unreadable: the append will say so)
