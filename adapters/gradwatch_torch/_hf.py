"""The Hugging Face ``Trainer`` callback: the torch watcher on the trainer's model for each
``train()``, its check-step numbers handed to the trainer's reporting integrations.

Steps: the watcher hooks the real torch optimizer behind accelerate's ``AcceleratedOptimizer``;
a step is one ``optimizer.step()``, exactly as ``state.global_step`` counts them (micro-batches
of gradient accumulation add to the gradients, they are no step). Gradients are read at the end
of each backward pass, so before the Trainer clips them (``max_grad_norm``).

Loss: the Trainer hands callbacks no loss per step. A forward hook on the model keeps the
``loss`` of each training forward (a dict output, the model in training mode, grad enabled); at
``on_pre_optimizer_step`` the step's micro-batch losses are averaged, or summed when the model
was given ``num_items_in_batch`` (then each is its share of the step's mean already).

Reporting: user callbacks run after the integrations (``default_callbacks + callbacks``), and
a callback gets no reference to the trainer, so changing ``logs`` in ``on_log`` is too late.
At ``on_train_begin`` the callback finds the ``CallbackHandler.callbacks`` list that holds it
(``gc.get_referrers``); on each check step it calls the ``on_log`` of the integrations in it
(``INTEGRATION_TO_CALLBACK``) with gradwatch's numbers, and appends them to
``state.log_history``. Without that list the numbers go to ``state.log_history`` only.
"""

from __future__ import annotations

import gc
import logging
import weakref
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from gradwatch import kit

from ._hooks import is_compiling
from ._model import real_optimizer
from ._trainers import PREFIX, CheckCollector, WatchedRuns, validate_options
from ._watcher import TorchWatcher

logger = logging.getLogger("gradwatch")



def _reporter_types() -> tuple[type, ...]:
    try:
        from transformers.integrations import INTEGRATION_TO_CALLBACK
    except ImportError:  # moved: the module that defines it
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    return tuple(INTEGRATION_TO_CALLBACK.values())


def finding_line(finding: kit.Finding) -> str:
    where = f" in {finding.layer}" if finding.layer is not None else ""
    return f"{finding.kind}{where}: {finding.message}"


def find_callbacks(callback: Any, model: Any) -> list[Any] | None:
    """The ``CallbackHandler.callbacks`` list holding ``callback`` (the one whose handler holds
    ``model`` when the callback is in several trainers), or ``None``."""
    lists = [r for r in gc.get_referrers(callback) if isinstance(r, list)
             and any(c is callback for c in r)
             and any(isinstance(c, DefaultFlowCallback) for c in r)]
    if len(lists) > 1:
        for lst in lists:
            for owner in gc.get_referrers(lst):
                attrs = vars(owner) if isinstance(owner, CallbackHandler) else owner
                if (isinstance(attrs, dict) and attrs.get("callbacks") is lst
                        and attrs.get("model") is model):
                    return lst
    return lists[0] if lists else None


class GradWatchCallback(WatchedRuns, TrainerCallback):
    """Watches a Hugging Face ``Trainer``: the torch watcher on the model, attached at
    ``on_train_begin``, removed at ``on_train_end``; each ``train()`` has a watcher of its own.

    Args:
        **options: The options of :func:`gradwatch.torch.watch` (``check_every``,
            ``on_finding``, ``events``, ``update_ratio``, ``tensorboard``, ...), checked here:
            a bad one is a TypeError or ValueError naming it. No ``optimizer``: the Trainer's
            is watched.

    Example::

        cb = GradWatchCallback(check_every=10)
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()
        print(cb.report())

    Steps equal ``state.global_step``. On each check step the per-layer numbers go to the
    ``report_to`` integrations and ``state.log_history`` under ``gradwatch/`` (see
    docs/integrations/transformers.md).
    """

    def __init__(self, **options: Any) -> None:
        self._idle = validate_options(
            options, "the Trainer's own optimizer (the one behind accelerate's "
            "AcceleratedOptimizer)")
        self._options = dict(options)
        #: The watcher of the current (or last) ``train()``; ``None`` before the first.
        self.watcher: TorchWatcher | None = None
        self._sink: CheckCollector | None = None
        self._callbacks: list[Any] | None = None
        self._loss_hook: Any = None
        self._losses: list[torch.Tensor] = []
        self._summed = False
        self._warned = False

    # -- attach and detach ---------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        # A train() that ended by an exception (the Trainer has no event for it): its
        # watcher goes, and what it kept is not this train()'s to log.
        self._detach(args, state, control, model, publish=False)
        if not isinstance(model, torch.nn.Module) or optimizer is None:
            logger.warning("gradwatch: the Trainer gave its callbacks no torch model and "
                           "optimizer at on_train_begin; GradWatchCallback watches nothing in "
                           "this train().")
            return
        try:
            optimizer = real_optimizer(optimizer)
        except TypeError as exc:  # DeepSpeed's, or another optimizer with no step hooks
            logger.warning("gradwatch: GradWatchCallback watches nothing in this train(): %s",
                           exc)
            return
        self._sink = CheckCollector()
        options = dict(self._options)
        options["plugins"] = (*options.get("plugins", ()), self._sink)
        self.watcher = TorchWatcher(model, optimizer=optimizer, **options)
        self._losses, self._summed = [], False
        ref = weakref.ref(self)

        def on_forward(module: Any, inputs: Any, kwargs: Any, output: Any) -> None:
            cb = ref()
            if (cb is None or not module.training or not torch.is_grad_enabled()
                    or is_compiling() or not isinstance(output, dict)):
                return
            loss = output.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                cb._losses.append(loss.detach().float().reshape(()))
                cb._summed = cb._summed or kwargs.get("num_items_in_batch") is not None

        self._loss_hook = model.register_forward_hook(on_forward, with_kwargs=True)
        if state.global_step:
            logger.info("gradwatch: this train() resumes at global step %d; report().steps "
                        "and the findings' steps count this train()'s own steps from 0, the "
                        "logged steps are the Trainer's.", state.global_step)
        self._callbacks = None
        if state.is_world_process_zero:
            self._callbacks = find_callbacks(self, model)
            if self._callbacks is None and not self._warned:
                self._warned = True
                logger.warning("gradwatch: GradWatchCallback could not find the Trainer's "
                               "callback list, so its numbers go to trainer.state.log_history "
                               "only, not to the report_to integrations.")

    def _detach(self, args: Any, state: Any, control: Any, model: Any, *,
                publish: bool = True) -> None:
        watcher = self.watcher
        if watcher is None or watcher.removed:
            return
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        self._losses = []
        watcher.remove()  # the run's end: the last findings arrive now
        if not publish:
            return
        # The integrations have ended their run (TensorBoardCallback closed its writer) before
        # this callback's on_train_end: what comes now goes to log_history only.
        self._publish(args, state, control, model, report=False)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None,
                     **kwargs: Any) -> None:
        self._detach(args, state, control, model)

    # -- during train() ------------------------------------------------------------------------

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        losses, self._losses = self._losses, []
        watcher = self.watcher
        if not losses or watcher is None or watcher.removed:
            return
        summed, self._summed = self._summed, False
        stacked = torch.stack(losses) if len(losses) > 1 else losses[0]
        value = stacked.sum() if summed else stacked.mean()
        watcher.monitor.guard("transformers callback (loss)", watcher.observe_loss, value)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> None:
        # Losses left over are no step's (a Trainer that never calls on_pre_optimizer_step).
        self._losses, self._summed = [], False
        sink = self._sink
        if sink is not None and sink.pending():
            self._publish(args, state, control, model, report=True)

    def _publish(self, args: Any, state: Any, control: Any, model: Any, *, report: bool) -> None:
        sink, watcher = self._sink, self.watcher
        if sink is None or watcher is None:
            return
        kept = sink.take()
        scalars, findings = kept.scalars, kept.findings
        if not state.is_world_process_zero or not kept:
            return
        offset = state.global_step - watcher.step  # a resumed train() counts from 0
        for step, metrics in scalars:
            state.log_history.append({**metrics, "step": step + offset})
        for finding in findings:
            state.log_history.append({PREFIX + "finding": finding_line(finding),
                                      "step": finding.step + offset})
        if not report or not scalars or self._callbacks is None:
            return
        reporters = [c for c in self._callbacks if isinstance(c, _reporter_types())]
        for reporter in reporters:
            for _, metrics in scalars:  # one row: the check of the step just ended
                watcher.monitor.guard("transformers callback (report_to)", _log_to, reporter,
                                      args, state, control, dict(metrics), model)


def _log_to(reporter: Any, args: Any, state: Any, control: Any, logs: dict[str, float],
            model: Any) -> None:
    reporter.on_log(args, state, control, logs=logs, model=model)
