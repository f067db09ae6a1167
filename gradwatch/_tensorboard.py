"""The TensorBoard sink: per-layer statistics as scalars and findings as text, from each check.

Framework-free: the sink writes through a writer object the adapter hands it (PyTorch's
``SummaryWriter``, tensorboardX's, or the Keras adapter's ``tf.summary`` writer); turning a log
directory into a writer is the adapter's job.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from ._findings import Finding
from ._hookspecs import hookimpl
from ._report import plain

#: What a writer must have: ``add_scalar(tag, value, global_step)``,
#: ``add_text(tag, text, global_step)`` and ``flush()``.
WRITER_METHODS = ("add_scalar", "add_text", "flush")
#: Every tag gradwatch writes starts with this.
PREFIX = "gradwatch/"
#: What to install for a log directory to become a writer.
INSTALL_HINT = "pip install tensorboard"


def is_writer(obj: Any) -> bool:
    """Whether ``obj`` can be written to like a ``SummaryWriter``."""
    return all(callable(getattr(obj, name, None)) for name in WRITER_METHODS)


def tensorboard_option(value: Any) -> str | Any | None:
    """Validate ``tensorboard=``: ``None``, a log directory (str or os.PathLike, returned as a
    str) or a writer (returned as it is)."""
    if value is None or is_writer(value):
        return value
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        path = os.fspath(value)
        if not isinstance(path, str) or not path:
            raise ValueError(f"tensorboard must be a non-empty log directory, got {value!r}")
        return path
    raise TypeError(
        "tensorboard must be a log directory (str or os.PathLike) or a writer with "
        f"{', '.join(WRITER_METHODS)} (torch.utils.tensorboard.SummaryWriter, tensorboardX), "
        f"got {type(value).__name__}")


def tensorboard_sink(value: Any, opener: Callable[[str], Callable[[], Any]], *,
                     write: bool = True) -> TensorBoardSink | None:
    """The sink for an adapter's ``tensorboard=`` option, validated (a TypeError names it).

    For a log directory, ``opener(logdir)`` is called now (it imports what it needs, so a
    missing package is an ImportError at watch time) and returns a function making the writer;
    that runs at the first write (a watcher that fails to start or a callback never fitted
    leaves no event file) and the sink closes the writer at the end of the run. A writer the
    user passed is flushed there, never closed. ``write=False`` (a distributed rank that does
    not write) only validates, and returns ``None``.
    """
    value = tensorboard_option(value)
    if value is None or not write:
        return None
    if isinstance(value, str):
        return TensorBoardSink(open=opener(value))
    return TensorBoardSink(value)


class TensorBoardSink:
    """Writes each check's statistics and each finding to a TensorBoard writer.

    On every check step (never in between): ``gradwatch/grad_norm/<layer>`` (the check step's
    gradient L2 norm, for layers that had a gradient), ``gradwatch/update_ratio/<layer>`` and
    ``gradwatch/weight_change/<layer>`` where measured, and ``gradwatch/loss`` (the check step's
    loss, when one was observed). Each finding is a text summary ``gradwatch/findings`` at its
    step. Flushed at the end of the run.

    Args:
        writer: A writer of the user's (``add_scalar``, ``add_text``, ``flush``): flushed at
            the end of a run, never closed.
        open: Instead of ``writer``, a function returning a writer, called at the first write
            of a run; that writer is closed at the end of the run (the next run opens another).

    A writer that fails is reported once by the monitor (a ``GradWatchInternalWarning``) and
    not written to again in this run; training goes on.
    """

    def __init__(self, writer: Any = None, *, open: Callable[[], Any] | None = None) -> None:
        if (writer is None) == (open is None):
            raise TypeError("TensorBoardSink takes a writer or open=, not both or neither")
        if writer is not None and not is_writer(writer):
            raise TypeError(f"writer must have {', '.join(WRITER_METHODS)}, got "
                            f"{type(writer).__name__}")
        if open is not None and not callable(open):
            raise TypeError(f"open must be callable, got {type(open).__name__}")
        #: The writer (``add_scalar``, ``add_text``, ``flush``); ``None`` until ``open`` made it.
        self.writer = writer
        #: Makes the writer of a run (gradwatch's own, closed at the end), or ``None``.
        self.open = open
        self._broken = False

    def _guarded(self, write: Callable[[Any], None]) -> None:
        if self._broken:
            return
        try:
            if self.writer is None:
                self.writer = self.open()
                if not is_writer(self.writer):
                    raise TypeError(f"the TensorBoard writer made has no "
                                    f"{', '.join(WRITER_METHODS)}: {type(self.writer).__name__}")
            write(self.writer)
        except Exception:
            # Reported once by the monitor; from now on this run writes nothing more, so the
            # failure is not reported again at every check.
            self._broken = True
            raise

    @hookimpl
    def gradwatch_run_start(self, run) -> None:
        self._broken = False  # a new run (Keras: another fit) gives the writer a new chance

    @hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        self._guarded(lambda writer: _write_stats(writer, stats))

    @hookimpl
    def gradwatch_finding(self, finding: Finding) -> None:
        self._guarded(lambda writer: writer.add_text(PREFIX + "findings", finding_text(finding),
                                                     int(finding.step)))

    @hookimpl
    def gradwatch_run_end(self, report) -> None:
        if self.writer is None:
            return  # nothing written (or the writer could not be made)
        try:
            if not self._broken:
                self.writer.flush()
        finally:
            if self.open is not None:
                writer, self.writer = self.writer, None
                try:
                    writer.close()
                except Exception:
                    if not self._broken:
                        raise
                    # already reported; nothing more to say


def _write_stats(writer: Any, stats) -> None:
    step = int(stats.step)
    add = writer.add_scalar
    if bool(stats.has_loss[-1]):
        add(PREFIX + "loss", float(stats.loss[-1]), step)
    grads, had = stats.grad_norm[-1], stats.has_grad[-1]
    for i, layer in enumerate(stats.layers):
        if had[i]:
            add(f"{PREFIX}grad_norm/{layer}", float(grads[i]), step)
    for name in ("update_ratio", "weight_change"):
        values = getattr(stats, name)
        if values is None:
            continue
        for layer, value in zip(stats.layers, values):
            if not math.isnan(value):  # NaN: not measured for this layer
                add(f"{PREFIX}{name}/{layer}", float(value), step)


def finding_text(finding: Finding) -> str:
    """A finding as TensorBoard's text plugin shows it (markdown)."""
    where = f" in layer `{plain(finding.layer)}`" if finding.layer is not None else ""
    text = f"**{plain(finding.kind)}** ({finding.severity}){where} at step {finding.step}: "
    text += plain(finding.message)
    if finding.advice:
        text += "\n\nTry: " + "; ".join(plain(a) for a in finding.advice) + "."
    return text
