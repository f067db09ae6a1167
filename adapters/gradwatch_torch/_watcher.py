"""PyTorch watcher: per-layer statistics from hooks, computed on the device, one transfer a check.

Where gradients are read: at the end of each backward pass (``_hooks``), so they are accumulated
over micro-batches and not yet clipped. The statistics of the last backward before an optimizer
step belong to that step; they are unscaled by the GradScaler's scale at the optimizer's pre-step
hook (``_amp``), and a step the scaler skips (overflow) is not a step. Without an optimizer every
backward is a step.

Per step the cost is one batched norm over the gradients (``_recorder``, ``_reduce``); check
steps (every ``check_every``) add max/zero counts, weight norms and update ratios (``_samples``),
then move everything to the host in one transfer (``_readout``), summed over the ranks first when
parameters are sharded (``_distributed``); the core turns that into per-layer statistics. The
model's description is ``_model``, its changes ``_rescan``, dead and saturated units
``_activations``, skip connections ``_structure``.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from gradwatch import kit

from ._activations import ActivationSampler
from ._amp import LossScale, ScalerSteps
from ._distributed import RANKS, compiled, emitting, is_sharded, rank_and_world, unwrap
from ._guard import StepGuard, check_guard, guard_steps
from ._hooks import BackwardTrigger, HookSet, is_compiling
from ._model import Layer, collect_layers, layer_infos, learning_rates, model_info, real_optimizer
from ._readout import StepWindow, read
from ._rescan import RescanSchedule, outside_tensors, rescan
from ._structure import probe_residual
from ._tensors import WatchedTensors, unmeasured_updates
from .plugin import tensorboard_opener

logger = logging.getLogger("gradwatch")

TORCH_OPTIONS = ("scaler", "update_ratio", "sample_fraction", "ranks", "tensorboard", "guard")


class TorchWatcher:
    """Watches a ``torch.nn.Module`` through hooks; see :func:`gradwatch.torch.watch`.

    Args:
        model: The module to watch. Layers are its submodules that own parameters, named as
            ``named_modules()`` names them; a parameter shared by several modules (tied
            weights) belongs to the first.
        optimizer: When given, steps are its steps (gradient accumulation counts once) and
            update ratios are measured around them. Defaults to ``None``: every backward pass
            is a step.
        scaler: A ``torch.amp.GradScaler`` to unscale gradients with. Defaults to ``None``:
            with an optimizer, a GradScaler driving ``scaler.step(optimizer)`` is found by
            itself; without one, pass it here.
        update_ratio: ``"sampled"`` keeps a fixed strided sample of every parameter (about
            ``sample_fraction`` of the elements, at least 32 per tensor) to estimate update and
            weight-change ratios; ``"exact"`` keeps a full copy on check steps (memory: one copy
            of the parameters, transiently, plus one persistent copy for the change since the
            start); ``"off"`` measures neither. Defaults to ``"sampled"``.
        sample_fraction: Fraction of elements sampled per tensor. Defaults to ``0.02``.
        ranks: Under ``torch.distributed``, which ranks emit findings (warnings, log records,
            the ``on_finding`` callable and the event file): ``"zero"`` (rank 0 only) or
            ``"all"`` (rank N > 0 writes its events to ``<name>.rank<N><ext>``). Every rank
            measures and keeps ``findings``; strict mode raises on every rank. Defaults to
            ``"zero"``.
        guard: ``"skip"``: an optimizer step whose gradients are not all finite is not
            applied (the weights and the optimizer state stay as they were), a ``nonfinite``
            warning names the layers at that step, and ``report().skipped_steps`` counts it.
            Costs one host synchronisation a step (docs/guard.md). Needs ``optimizer``; not
            with LBFGS. Defaults to ``None`` (off).
        tensorboard: A log directory (str or os.PathLike: gradwatch opens a
            ``torch.utils.tensorboard.SummaryWriter`` there and closes it at ``remove()``) or a
            writer of the user's (``add_scalar``/``add_text``/``flush``: flushed, not closed).
            Per-layer scalars under ``gradwatch/`` on check steps, findings as text. Only rank
            0 writes under ``torch.distributed``. Defaults to ``None``.
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``activation_every``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scaler: Any = None, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 ranks: str = "zero", tensorboard: Any = None, guard: str | None = None,
                 **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = real_optimizer(optimizer)
        #: ``"skip"``: optimizer steps with non-finite gradients are not applied.
        self.guard = check_guard(guard, optimizer)
        kit.check_options("gradwatch.torch.watch", options, ("optimizer",) + TORCH_OPTIONS)
        self._scale = LossScale(scaler)
        ref_ = weakref.ref(self)
        self._scaler_steps = ScalerSteps(lambda: getattr(ref_(), "_stepped", 0),
                                         _call(ref_, "_scaler_step_returned"))
        self._scaler_steps.install(scaler)
        self.update_ratio = kit.choice("update_ratio", update_ratio, kit.UPDATE_RATIO_MODES)
        self.sample_fraction = kit.fraction("sample_fraction", sample_fraction)
        self.ranks = kit.choice("ranks", ranks, RANKS)
        #: This process's rank and the world size (0 and 1 without torch.distributed).
        self.rank, self.world_size = rank_and_world()
        emits = emitting(self.rank, self.ranks, options)
        # One event stream per run: rank 0's, whatever ``ranks`` says.
        board = kit.tensorboard_sink(tensorboard, tensorboard_opener, write=self.rank == 0)
        was_compiled = compiled(model)
        model = unwrap(model)  # DDP / DataParallel / torch.compile: the user's own module
        self._model_ref = weakref.ref(model)
        self._opt_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._layers = collect_layers(model)
        # A rank that does not emit still keeps findings, and strict mode still stops it.
        self.monitor = kit.Monitor(kit.RunContext(model=model_info(model, optimizer),
                                                  layers=layer_infos(self._layers)),
                                   emit=emits, tensorboard=board, **options)
        self._hooks = HookSet()
        self._removed = False
        self._step = 0  # completed optimizer steps
        self._clipping_seen = False
        #: (the scaler's scale tensor, its in-place version expected next) after the last
        #: optimizer step: a later version means ``scaler.update()`` ran with no step (skipped).
        self._scale_seen: tuple[int, int] | None = None
        #: Optimizer steps that ended (applied, or skipped by the guard): a ``scaler.step``
        #: that returns with it unchanged was skipped by the scaler.
        self._stepped = 0
        self._residual_graph: bool | None = None
        self._window = StepWindow(self.monitor.check_every)
        self._rescan = RescanSchedule(optimizer)
        self._outside = outside_tensors(model, optimizer)
        ref = weakref.ref(self)
        sharded = any(is_sharded(p) for layer in self._layers for p in layer.params)
        self._trigger = BackwardTrigger(
            self._hooks, _call(ref, "_record_backward"),
            output_hook=optimizer is not None and not was_compiled and not sharded)
        self._sampler = ActivationSampler(self._hooks, self.monitor.guard)
        self._build(model)
        #: The optimizers whose steps are this run's steps (several: see ``_add_optimizer``).
        self._optimizers: list[weakref.ref] = []
        #: The optimizer taking the step in progress (``None``: not known, or no optimizer).
        self._stepping: weakref.ref | None = None
        #: The guards on the optimizers' steps (``guard="skip"``).
        self._guards: list[StepGuard] = []
        if optimizer is not None:
            self._add_optimizer(optimizer)
        for handle in probe_residual(model, _call(ref, "_on_residual"), is_compiling):
            self._hooks.add(handle)
        self.monitor.start()
        # A watcher dropped without remove() takes its hooks with it when collected.
        weakref.finalize(self, _release, self._hooks, self._guards)

    def _optimizer(self) -> torch.optim.Optimizer | None:
        return self._opt_ref() if self._opt_ref is not None else None

    def _add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Count ``optimizer``'s steps as this run's steps. Beside the one given to the watcher,
        another optimizer of the same model (Lightning's several optimizers, a GAN's generator
        and discriminator taking turns): a check step's update ratios are then those of the
        parameters the optimizer taking that step holds; the others did not move in it, and a
        ratio of 0 would read as stalled weights."""
        ref = weakref.ref(self)
        self._optimizers.append(weakref.ref(optimizer))
        pre, post = _call(ref, "_on_pre_step"), _call(ref, "_on_post_step")
        self._hooks.add(optimizer.register_step_pre_hook(lambda opt, args, kwargs: pre(opt)))
        self._hooks.add(optimizer.register_step_post_hook(lambda opt, args, kwargs: post()))
        if self.guard == "skip":
            check_guard(self.guard, optimizer)  # LBFGS is refused by name
            self._guards.append(guard_steps(weakref.ref(self), optimizer, self.world_size > 1))

    def _on_skipped(self, layers: list[int]) -> None:
        """The guard did not apply the step in progress: it is no step. Its losses are dropped
        and its backward forgotten (the next one fills the same slot); the monitor tells the
        finding now."""
        batch = self._window.pending_batch
        self._window.drop_pending()
        self._tensors.recorder.seen = False
        self._stepped += 1  # the scaler's update() after it is not a scaler skip
        self.monitor.step_skipped(self._step + 1, layers, batch_id=batch)

    def _build(self, model: nn.Module) -> None:
        """What depends on the layer list (at watch time, and after the model changed); the
        step count and what was learnt about the run are kept."""
        self._tensors = WatchedTensors(self._layers, self.monitor.check_every, self.update_ratio,
                                       self.sample_fraction, self.world_size)
        self._trigger.attach(model, self._tensors.params)
        self._sampler.find(model, self._tensors.device)
        self._sampler.set_active(self.monitor.is_activation_step(self._step + 1))

    # -- hooks ---------------------------------------------------------------------------------

    def _record_backward(self) -> None:
        slot = self._step % self._window.size
        step = self._step + 1
        recorded = self._tensors.recorder.record(slot, self.monitor.is_check_step(step),
                                                 self.monitor.is_detail_step(step))
        if self._opt_ref is None:
            if recorded:
                self._window.inv_scale[slot] = LossScale.inverse(self._scale.known())
            self._commit()

    def _drop_skipped(self) -> None:
        """Losses observed in a step the GradScaler skipped (``scaler.step`` found inf/NaN and
        did not run the optimizer, then ``scaler.update()`` lowered the scale) are not the
        next step's: dropped. Seen from the scale tensor's in-place version counter (no sync):
        each ``update()`` bumps it once, after the step's post-step hook."""
        now = self._scale.updates()
        if now is None:
            return
        seen = self._scale_seen
        if seen is not None and seen[0] == now[0] and now[1] > seen[1]:
            self._window.drop_pending()
        self._scale_seen = now

    def _scaler_step_returned(self, optimizer: Any, before: int) -> None:
        """``scaler.step(optimizer)`` returned without an optimizer step ending: the scaler
        skipped it itself (overflow). Normal under AMP: said once as info, and counted
        (``report().scaler_skipped_steps``), never a warning."""
        if self._stepped == before and any(r() is optimizer for r in self._optimizers):
            self.monitor.scaler_skipped(self._step + 1)

    def _on_pre_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._stepping = weakref.ref(optimizer) if optimizer is not None else None
        slot = self._step % self._window.size
        scaler = self._scale.find()
        self._scaler_steps.install(scaler)  # a scaler found on the stack: from now on
        self._drop_skipped()
        self._window.inv_scale[slot] = LossScale.inverse(scaler)
        recorder = self._tensors.recorder
        if (not recorder.seen and self._trigger.mode == BackwardTrigger.OUTPUT
                and recorder.missed(self._trigger.params)):
            # A backward pass that bypassed the model's output (a compiled forward, a submodule
            # called directly): read its gradients now, hook the parameters from now on.
            model = self._model_ref()
            if model is not None:
                self._trigger.fall_back(model)
            if LossScale.unscaled(scaler, self._optimizer()):
                self._window.inv_scale[slot] = None
            self._record_backward()
        if not self.monitor.is_check_step(self._step + 1):
            return
        self._tensors.snapshot()
        # The gradients the optimizer is about to apply (after any clipping, unscaled):
        # compared with the end of backward, they tell whether the user clips. Not when the
        # backward runs inside step() (a closure: LBFGS, Lightning): they are stale.
        if recorder.seen:
            recorder.pre_step()

    def _on_post_step(self) -> None:
        slot = self._step % self._window.size
        if self._tensors.recorder.clipped(self._window.inv_scale[slot] is not None):
            self._clipping_seen = True
        self._commit()
        now = self._scale.updates()
        if now is not None:  # the scaler.update() that follows this step bumps it once
            self._scale_seen = (now[0], now[1] + 1)

    def _on_residual(self, found: bool) -> None:
        """The first forward pass has shown whether the model has skip connections."""
        self._residual_graph = found
        self.monitor.update_model(residual=bool(found or self.monitor.context.model.residual))

    def observe_loss(self, loss: Any, batch_id: int | str | None = None) -> None:
        """Record the loss of the step in progress (a tensor or a float); never syncs.

        Call it before ``optimizer.step()`` (without an optimizer: before ``backward()``).
        Several calls in one step (micro-batches) are averaged. The losses of a step that the
        GradScaler skipped are dropped, not averaged into the next step's. ``batch_id`` (an int
        or a string: an index into your data set, a file name) names the batch the step trained
        on: a warning's window in the event file and the guard's skip finding say which batch
        each step had.
        """
        if self._opt_ref is not None:
            self._drop_skipped()
        self._window.observe(loss, batch_id)

    def _commit(self) -> None:
        """One optimizer step completed: file its loss, then check if it is a check step."""
        recorder = self._tensors.recorder
        if not recorder.seen:
            # An optimizer step with no backward since the last one: no gradient to report
            # (the slot still holds a value from check_every steps ago).
            recorder.no_gradient(self._step % self._window.size)
        recorder.seen = False
        self._step += 1
        self._stepped += 1
        self._window.commit(self._step)
        self.monitor.note_steps(self._step)
        if self.monitor.is_check_step(self._step):
            # gradwatch's own failures are reported once and training goes on
            self.monitor.guard("torch adapter (_check)", self._check)
            self._window.reset()
            self.monitor.guard("torch adapter (_structure_check)", self._structure_check)
        self._sampler.set_active(self.monitor.is_activation_step(self._step + 1))

    # -- the check -----------------------------------------------------------------------------

    def _check(self) -> None:
        recorder = self._tensors.recorder
        compared, recorder.compared = recorder.compared, False
        measured = self._tensors.measure(self.rank, self.monitor.is_detail_step(self._step))
        record, totals = read(measured, self._window, recorder.had_grad(),
                              self._sampler.take(), self._tensors.device)
        self._clipping_seen = self._clipping_seen or totals.clipped
        if compared:
            record = dataclasses.replace(record, clipped=totals.clipped)
        if len(self._optimizers) > 1 and self._stepping is not None:
            # Several optimizers: the others' parameters did not move in this step.
            record = unmeasured_updates(record, self._tensors.params, self._stepping())
        self.monitor.update_model(
            learning_rates=learning_rates(self._optimizer())
            or self.monitor.context.model.learning_rates,
            clipping=self._clipping_seen or None)
        self.monitor.check(kit.step_stats(record, self._tensors.layout, step=self._step))

    # -- structure changes ---------------------------------------------------------------------

    def _structure_check(self) -> None:
        """After a check: has the model changed since watch()? (see ``_rescan``)"""
        opt, model = self._optimizer(), self._model_ref()
        if not self._rescan.due(opt) or model is None:
            return
        found = rescan(model, self._layers, self._trigger.hooked, self._outside, opt)
        if found.layers is not None:
            self._restructure(model, found.layers)
        elif found.rehook:
            self._trigger.attach(model, self._tensors.params)
        self._outside = found.outside
        if found.messages and self.monitor.emits:
            logger.info("gradwatch: the model changed at step %d (%s); watching %d layers from "
                        "now on.", self._step, "; ".join(found.messages), len(self._layers))

    def _restructure(self, model: nn.Module, layers: list[Layer]) -> None:
        """New layer list: hooks moved to the current parameters, buffers and per-layer
        statistics restarted, detectors rebound. Runs right after a check (an empty window)."""
        self._layers = layers
        self._window.clear_losses()
        self._build(model)
        info = dataclasses.replace(model_info(model, self._optimizer()),
                                   clipping=self._clipping_seen or None)
        if self._residual_graph is not None:
            info = dataclasses.replace(info, residual=bool(self._residual_graph or info.residual))
        self.monitor.set_context(kit.RunContext(model=info, layers=layer_infos(layers)))

    # -- public API ----------------------------------------------------------------------------

    @property
    def findings(self) -> list[kit.Finding]:
        """Findings so far, in order of occurrence."""
        return self.monitor.findings

    @property
    def step(self) -> int:
        """Optimizer steps observed so far."""
        return self._step

    def report(self) -> kit.Report:
        """Per-layer table and findings; ``str()`` renders it."""
        return self.monitor.report()

    def extra_memory_bytes(self) -> int:
        """Bytes gradwatch holds on the device between steps (start-of-run samples and the
        per-step history), excluding transient check-step buffers."""
        return self._tensors.held_bytes()

    def remove(self) -> kit.Report:
        """Detach every hook gradwatch added and release the model; returns the final report.

        The model is left exactly as it was: no hook, no reference from gradwatch.
        """
        if not self._removed:
            self._removed = True
            self._hooks.clear()
            for guard in self._guards:
                guard.remove()
            self._guards = []
            # Every tensor of the model's (parameters, through the layer list too, and their
            # gradients' samples) goes: the report, kept by the watcher, needs none of them.
            for layer in self._layers:
                layer.params = []
            self._tensors.clear()
            self._trigger.clear()
            self._sampler.clear()
            self._window.clear_losses()
            self._scale.clear()
            self._scaler_steps.remove()
            self._model_ref = lambda: None
            self._opt_ref = None
            self._final = self.monitor.end()
        return self._final

    @property
    def removed(self) -> bool:
        return self._removed

    def __enter__(self) -> TorchWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else f"{len(self._hooks)} hooks"
        return (f"TorchWatcher({len(self._layers)} layers, step {self._step}, "
                f"{len(self.findings)} findings, {state})")

    def layers(self) -> Iterator[str]:
        """Names of the watched layers in depth order."""
        return (layer.name for layer in self._layers)


def _release(hooks: HookSet, guards: list[StepGuard]) -> None:
    """What a watcher dropped without ``remove()`` leaves behind goes with it."""
    hooks.clear()
    for guard in guards:
        guard.remove()


def _call(ref: weakref.ref, method: str) -> Callable[..., None]:
    """A hook's body: the watcher's ``method``, guarded, while the watcher lives (hooks live on
    the model; they must not keep the watcher alive)."""
    where = f"torch adapter ({method})"

    def call(*args: Any) -> None:
        watcher = ref()
        if watcher is not None:
            watcher.monitor.guard(where, getattr(watcher, method), *args)

    return call
