"""The Lightning callback: the torch watcher on the LightningModule for each ``fit``, its check-step
numbers handed to the trainer's own loggers.

One class serves both ``lightning.pytorch`` and ``pytorch_lightning``: it subclasses the
``Callback`` of each one installed. Neither Trainer type-checks its callbacks (each calls the hook
methods by name), but a subclass of both is what ``isinstance`` checks, type hints and a reader
expect of a callback, whichever package the Trainer comes from.

Steps: the watcher hooks the real torch optimizers' ``step()``, which Lightning's
``LightningOptimizer`` calls. Under automatic optimization the closure (``training_step``,
``zero_grad``, ``backward``, clipping) runs inside that ``step()``: the backward pass is read at
its end, as usual, and the step is filed at the optimizer's post-step hook. A micro-batch that
Lightning accumulates runs the closure without ``step()``: its backward adds to the gradients,
it is no step. So each optimizer step is one step, exactly as ``trainer.global_step`` counts
them, several optimizers included (manual optimization): each one's steps are steps.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import Any

from ._model import real_optimizer
from ._trainers import PREFIX, CheckCollector, Collected, WatchedRuns, validate_options
from ._watcher import TorchWatcher

logger = logging.getLogger("gradwatch")

#: The Lightning packages whose ``Trainer`` takes the callback, in the order tried.
PACKAGES = ("lightning.pytorch", "pytorch_lightning")


def _callback_bases() -> tuple[type, ...]:
    bases = []
    for name in PACKAGES:
        if importlib.util.find_spec(name.split(".")[0]) is None:
            continue
        try:
            bases.append(importlib.import_module(name).Callback)
        except ImportError:  # a broken or partial install of one package: the other may do
            continue
    if not bases:
        raise ImportError("gradwatch.lightning needs PyTorch Lightning: pip install "
                          "'gradwatch[lightning]' (or lightning, or pytorch_lightning)")
    return tuple(bases)


def _log(trainer: Any, kept: Collected) -> None:
    for lg in trainer.loggers:
        for step, metrics in kept.scalars:
            lg.log_metrics(dict(metrics), step=step)
        if kept.texts:
            # TensorBoardLogger's experiment is a SummaryWriter; CSV and others take no text.
            add_text = getattr(getattr(lg, "experiment", None), "add_text", None)
            if callable(add_text):
                for step, text in kept.texts:
                    add_text(PREFIX + "findings_text", text, global_step=step)


class GradWatchCallback(WatchedRuns, *_callback_bases()):  # type: ignore[misc]
    """Watches a Lightning ``fit``: the torch watcher on the LightningModule, attached at
    ``on_fit_start``, removed at ``on_fit_end`` (or ``teardown``, or when ``fit`` fails).

    Args:
        **options: The options of :func:`gradwatch.torch.watch` (``check_every``,
            ``on_finding``, ``events``, ``update_ratio``, ``tensorboard``, ``ranks``, ...),
            checked here: an unknown one is a TypeError naming it. No ``optimizer``: the
            trainer's optimizers are watched. ``scaler`` defaults to the precision plugin's
            GradScaler (``precision="16-mixed"``).

    Example::

        cb = GradWatchCallback(check_every=10)
        Trainer(max_steps=200, callbacks=[cb]).fit(model, loader)
        print(cb.report())

    Steps are optimizer steps and equal ``trainer.global_step``. On each check step the
    per-layer numbers go to ``trainer.loggers`` under ``gradwatch/`` (see
    docs/integrations/lightning.md).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        self._idle = validate_options(options, "the trainer's optimizers (trainer.optimizers)")
        self._options = dict(options)
        self._sink: CheckCollector | None = None
        #: The watcher of the current (or last) fit; ``None`` before the first.
        self.watcher: TorchWatcher | None = None
        self._attached = False
        self._automatic = True
        self._observe = False

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn (and any strategy that starts processes with multiprocessing's spawn)
        # pickles the callbacks into each process: what travels is the options; a process
        # starts with no watcher, as a fresh callback would.
        return {"options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["options"])

    # -- attach and detach ---------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._detach(trainer)  # a previous fit that ended without on_fit_end
        optimizers = [real_optimizer(o) for o in trainer.optimizers]
        if not optimizers:
            logger.warning("gradwatch: the LightningModule has no optimizer "
                           "(configure_optimizers returned none); GradWatchCallback watches "
                           "nothing in this fit.")
            return
        options = dict(self._options)
        if options.get("scaler") is None:
            precision = getattr(trainer.strategy, "precision_plugin", None)
            options["scaler"] = getattr(precision, "scaler", None)  # "16-mixed": a GradScaler
        self._sink = CheckCollector()
        options["plugins"] = (*options.get("plugins", ()), self._sink)
        self.watcher = TorchWatcher(pl_module, optimizer=optimizers[0], **options)
        self._attached = True
        for extra in optimizers[1:]:
            self.watcher._add_optimizer(extra)  # each optimizer's steps are steps
        self._automatic = bool(pl_module.automatic_optimization)
        # Several optimizers take turns (a GAN's generator and discriminator): their losses
        # are not one series, so none is observed.
        self._observe = len(optimizers) == 1

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        if self._attached and trainer.global_step and self.watcher is not None:
            logger.warning(
                "gradwatch: this fit resumes at global step %d; gradwatch counts its steps "
                "from 0 (report().steps, finding and logged steps are this fit's own).",
                trainer.global_step)

    def _detach(self, trainer: Any) -> None:
        if not self._attached or self.watcher is None:
            return
        self._attached = False
        self.watcher.remove()  # the run's end: the last findings arrive now
        self._publish(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach(trainer)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._detach(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._detach(trainer)

    # -- during the fit ------------------------------------------------------------------------

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Any) -> None:
        if not (self._attached and self._observe) or self.watcher is None:
            return
        watcher = self.watcher

        def observe() -> None:
            value = loss.detach()
            if self._automatic and trainer.accumulate_grad_batches > 1:
                # Lightning divides the loss it backpropagates by accumulate_grad_batches; the
                # step's loss is the micro-batches' mean, as training_step returned them.
                value = value * trainer.accumulate_grad_batches
            watcher.observe_loss(value)

        watcher.monitor.guard("lightning callback (on_before_backward)", observe)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._sink is not None and self._sink.pending():
            self._publish(trainer)

    def _publish(self, trainer: Any) -> None:
        """Hand what the checks found to the trainer's loggers (rank zero only, as Lightning's
        loggers themselves write)."""
        sink, watcher = self._sink, self.watcher
        if sink is None or watcher is None:
            return
        kept = sink.take()
        if not trainer.is_global_zero or not kept:
            return
        watcher.monitor.guard("lightning callback (trainer loggers)", _log, trainer, kept)
