"""Keras 3 callback that sees the gradients the optimizer applies, inside compiled ``fit``.

Keras callbacks only see ``logs``, so for the duration of ``fit`` gradwatch wraps the model's
optimizer (:mod:`._optimizer`): the batch loss and the gradients the optimizer applies reach it
there, and per-variable statistics are computed with the backend's ops (:mod:`._ops`), written
to one state variable in graph mode (:mod:`._graph`; on JAX an optimizer variable for the fit,
:mod:`._jaxgraph`) or kept as device tensors in eager mode (:mod:`._eager`). The host reads them in one transfer per check (:mod:`._readout`) and the core
sums them into layers (:func:`gradwatch.kit.step_stats`). :mod:`._fit` wires one fit together;
this class is what Keras calls.
"""

from __future__ import annotations

import logging
from typing import Any

import keras

from gradwatch import kit

from ._fit import FitWatch
from ._logs import EpochLogs
from .plugin import BACKENDS, tensorboard_opener

logger = logging.getLogger("gradwatch")

#: The options of this adapter, beside the core's.
KERAS_OPTIONS = ("update_ratio", "sample_fraction", "tensorboard", "guard")


class GradWatchCallback(keras.callbacks.Callback):
    """Watches ``model.fit`` for unhealthy gradients, updates, losses and activations.

    Args:
        update_ratio: ``"sampled"`` (default) estimates update/weight ratios from a fixed
            strided sample of every variable (about ``sample_fraction`` of its entries, at least
            32); ``"exact"`` uses every entry; ``"off"`` skips them.
        sample_fraction: Defaults to ``0.02``.
        tensorboard: A log directory (str or os.PathLike: written with ``tf.summary`` on
            TensorFlow, ``torch.utils.tensorboard.SummaryWriter`` on the torch backend, opened
            at the first check of each fit and closed at its end) or a writer of the user's
            (``add_scalar``/``add_text``/``flush``: flushed, not closed). Per-layer scalars
            under ``gradwatch/`` on check steps, findings as text. Defaults to ``None``.
        guard: ``"skip"``: an optimizer step whose gradients are not finite is not applied
            (the variables, the optimizer's slots and ``iterations`` stay as they were); the
            ``nonfinite`` warning names the step and ``report().skipped_steps`` counts it.
            TensorFlow (compiled, XLA, ``run_eagerly``), PyTorch and JAX backends. Defaults
            to ``"off"`` (or ``None``).
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``activation_every``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.

    Example:

    ```python
    cb = GradWatchCallback()
    model.fit(x, y, epochs=20, callbacks=[cb])
    print(cb.report())
    ```
    """

    #: Batch-end work is a lock-protected read of the recorded steps; every step's numbers
    #: carry their own step id, and eager mode checks in the training thread (JAX reads at batch
    #: begins, in the training thread), so Keras may dispatch batch ends asynchronously, in any
    #: order.
    async_safe = True

    def __init__(self, *, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 tensorboard: Any = None, guard: str | None = "off", **options: Any) -> None:
        super().__init__()
        kit.check_options("GradWatchCallback", options, KERAS_OPTIONS)
        self.guard = kit.guard_mode(guard)
        self.update_ratio = kit.choice("update_ratio", update_ratio, kit.UPDATE_RATIO_MODES)
        self.sample_fraction = kit.fraction("sample_fraction", sample_fraction)
        self._epoch_logs = EpochLogs()
        plugins = options.pop("plugins", ())
        if not isinstance(plugins, (list, tuple)):
            raise TypeError(f"plugins must be a list of plugin objects, got "
                            f"{type(plugins).__name__}")
        plugins = (*plugins, self._epoch_logs)
        #: The framework-neutral engine (findings, report, sinks).
        self.monitor = kit.Monitor(kit.empty_context(),
                                   tensorboard=kit.tensorboard_sink(tensorboard,
                                                                    tensorboard_opener),
                                   plugins=plugins, **options)
        self._fit: FitWatch | None = None
        #: Activation sites of the fitted model by kind (set in ``on_train_begin``).
        self._activation_counts: dict[str, int] = {}
        self._reset_steps()

    def _reset_steps(self) -> None:
        #: Batches seen before this epoch, the last batch seen, the last batch checked at.
        self._epoch_base = self._last_batch = self._checked_upto = 0

    @property
    def _active(self) -> bool:
        return self._fit is not None and self._fit.active

    # -- Keras hooks -------------------------------------------------------------------------

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        # A train function traced before our wrappers existed would never call them.
        if getattr(model, "train_function", None) is not None and not self._active:
            model.train_function = None

    def on_train_begin(self, logs: Any = None) -> None:
        self._close()
        self._reset_steps()
        try:
            if getattr(self.model, "optimizer", None) is None:
                raise TypeError("GradWatchCallback needs a compiled model (model.optimizer is "
                                "None)")
            if keras.backend.backend() not in BACKENDS:
                self._unsupported_backend()
                return
            self._fit = FitWatch(self.model, self.monitor, update_ratio=self.update_ratio,
                                 sample_fraction=self.sample_fraction, guard=self.guard)
            self._activation_counts = dict(self._fit.facts.counts)
        except (kit.GradientHealthError, Warning):
            raise
        except Exception as exc:
            self._close()
            self.monitor.internal_error("keras adapter (on_train_begin)", exc)

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        fit = self._fit
        if fit is None or not fit.active or not fit.jax:
            return
        # JAX: the steps before this batch are read here, in the training thread, from the
        # state the trainer holds; the next step donates that state.
        with fit.lock:
            self._poll(fit)
            self._check_due(fit, fit.steps_before(int(batch)))

    def _poll(self, fit: FitWatch) -> None:
        if fit.guard is not None and fit.traced:
            self.monitor.guard("keras adapter (guard)", fit.guard.poll)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        fit = self._fit
        if fit is None or not fit.active:
            return
        with fit.lock:
            # (With asynchronous dispatch batch ends may run in any order.)
            step = self._epoch_base + int(batch) + 1
            self._last_batch = max(self._last_batch, step)
            if fit.jax:
                return  # (the state this batch end could read may be donated already)
            self._poll(fit)
            if fit.traced:  # (eager mode checks inside the training step itself)
                self._check_due(fit, step)

    def _check_due(self, fit: FitWatch, step: int) -> None:
        """Checks when ``step`` (steps of this fit so far) is in a check window not yet read.
        The caller holds ``fit.lock``."""
        every = self.monitor.check_every
        if step // every <= self._checked_upto // every:
            return
        self._checked_upto = step
        try:
            self.monitor.guard("keras adapter (check)", fit.check)
        except BaseException:
            # Strict mode (or a warning turned error) ends fit() here, and Keras will not
            # call on_train_end: leave the model as it was before raising.
            self._teardown()
            raise

    def _unsupported_backend(self) -> None:
        """Said once per callback: watching nothing in silence is the worst failure."""
        if getattr(self, "_told_backend", False):
            return
        self._told_backend = True
        message = (f"gradwatch does not watch Keras on the {keras.backend.backend()!r} backend "
                   f"yet (TensorFlow, PyTorch and JAX are supported): this fit is not watched, and "
                   f"no finding will be reported for it.")
        logger.warning(message)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if self._active:
            self.monitor.guard("keras adapter (epoch begin)", self._fit.epoch_begins)

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._active:
            self._epoch_base = self._last_batch  # (Keras waits for the batch ends first)
            fit = self._fit
            if fit.jax:  # the epoch's last steps, before its logs take the findings
                with fit.lock:
                    self._poll(fit)
                    self._check_due(fit, fit.steps_before(None))
            # For the callbacks after this one (CSVLogger, TensorBoard, EarlyStopping, History)
            self.monitor.guard("keras adapter (epoch logs)", self._epoch_logs.add, logs,
                               self.monitor.findings)

    def on_train_end(self, logs: Any = None) -> None:
        fit = self._fit
        if fit is None or not fit.active:
            return
        with fit.lock:
            if fit.jax:
                self._poll(fit)
            self.monitor.guard("keras adapter (check)", fit.check_all)  # the last steps
        if self._last_batch and not self.monitor.report().steps and len(fit.variables):
            logger.warning(
                "gradwatch saw none of the %d training batches: the model's train_step did not "
                "call optimizer.apply (a custom train_step?), so no gradient was observed.",
                self._last_batch)
        self._teardown()
        self.monitor.end()

    # Validation and predict batches run the same layers; they are not training steps.

    def on_test_begin(self, logs: Any = None) -> None:
        self._set_in_test(True)

    def on_test_end(self, logs: Any = None) -> None:
        self._set_in_test(False)

    def on_predict_begin(self, logs: Any = None) -> None:
        self._set_in_test(True)

    def on_predict_end(self, logs: Any = None) -> None:
        self._set_in_test(False)

    def _set_in_test(self, value: bool) -> None:
        if self._fit is not None:
            self._fit.activations.in_test = value

    def _close(self) -> None:
        if self._fit is not None:
            self._fit.close()

    def _teardown(self) -> None:
        self._close()
        if self.model is not None:
            self.model.train_function = None  # next fit traces without our wrappers
        # The callback outlives the fit (``print(cb.report())``); the model and its variables
        # need not: keep the report and findings, drop every reference to the model.
        self._fit = None
        self._model = None

    # -- public API --------------------------------------------------------------------------

    @property
    def findings(self) -> list[kit.Finding]:
        """Findings of the current (or last) ``fit``, in order of occurrence."""
        return self.monitor.findings

    def report(self) -> kit.Report:
        """Per-layer table and findings; ``str()`` renders it."""
        return self.monitor.report()

    def extra_memory_bytes(self) -> int:
        """Bytes held between steps: start-of-run weight samples and the state variables (0
        once ``fit`` has ended: the callback then holds nothing of the model)."""
        return self._fit.nbytes() if self._fit is not None else 0
