"""PyTorch watcher: per-layer statistics from hooks, computed on the device, one transfer a check.

Where gradients are read: at the end of each backward pass (an autograd-engine callback queued
by the parameters' post-accumulate-grad hooks), so they are accumulated over micro-batches and
not yet clipped. The statistics of the last backward before an optimizer step belong to that
step; they are unscaled by the GradScaler's scale at the optimizer's pre-step hook, and a step
the scaler skips (overflow) is not a step. Without an optimizer every backward is a step.

Per step the cost is one ``torch._foreach_norm`` over the gradients plus a few tiny kernels;
check steps (every ``check_every``) add max/zero counts, weight norms and update ratios, then
move everything to the host in one transfer.

The end-of-backward callback re-queues itself once, so it runs after callbacks that others
queued during the backward pass: DistributedDataParallel's gradient all-reduce and FSDP2's
reduce-scatter finish there. Sharded (DTensor) parameters are measured on their local shards
and summed over the ranks in one all-reduce per check; nothing else runs a collective.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from gradwatch import _validate as v
from gradwatch._context import RunContext
from gradwatch._detectors import SATURATION_DERIVATIVE
from gradwatch._findings import Finding, GradientHealthError
from gradwatch._monitor import CORE_OPTIONS, Monitor
from gradwatch._report import Report, plain
from gradwatch._stats import (
    ActivationStats,
    LayerInfo,
    ModelInfo,
    StepStats,
    orthogonal_norms,
    sample_stride,
)

from ._distributed import (
    RANKS,
    all_reduce_sum,
    is_sharded,
    local,
    module_type,
    rank_and_world,
    rank_path,
    replication,
    unwrap,
)
from ._structure import probe_residual

logger = logging.getLogger("gradwatch")

ACTIVATION_KINDS: dict[type, str] = {
    nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ReLU: "relu", nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu", nn.PReLU: "prelu", nn.ELU: "elu", nn.SELU: "selu",
    nn.GELU: "gelu", nn.SiLU: "silu", nn.Mish: "mish", nn.Softplus: "softplus",
    nn.Softsign: "softsign", nn.Hardtanh: "hardtanh", nn.Hardsigmoid: "hardsigmoid",
}
NORM_KINDS: dict[type, str] = {
    nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm", nn.BatchNorm3d: "batchnorm",
    nn.SyncBatchNorm: "batchnorm", nn.LayerNorm: "layernorm", nn.GroupNorm: "groupnorm",
    nn.InstanceNorm1d: "instancenorm", nn.InstanceNorm2d: "instancenorm",
    nn.InstanceNorm3d: "instancenorm",
}
if hasattr(nn, "RMSNorm"):
    NORM_KINDS[nn.RMSNorm] = "rmsnorm"
RECURRENT = (nn.RNNBase, nn.RNNCellBase)
# Activation sites whose forward outputs are sampled: ReLU for dead units, sigmoid/tanh for
# saturation.
SAMPLED = {"relu": "relu", "relu6": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_RESIDUAL_HINTS = ("residual", "resblock", "basicblock", "bottleneck", "skip", "shortcut")
# Activation modules of other libraries (transformers' GELUActivation, NewGELUActivation,
# QuickGELUActivation, ...), by what their class name says.
_ACTIVATION_NAMES = (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("mish", "mish"),
                     ("relu", "relu"), ("sigmoid", "sigmoid"), ("tanh", "tanh"))


def _activation_kind(module: nn.Module) -> str | None:
    cls = module_type(module)
    kind = ACTIVATION_KINDS.get(cls)
    if kind is None and not any(True for _ in module.parameters(recurse=False)):
        low = cls.__name__.lower()
        if "activation" in low or low.endswith(("gelu", "silu", "swish")):
            kind = next((k for hint, k in _ACTIVATION_NAMES if hint in low), None)
    return kind

TORCH_OPTIONS = ("scaler", "update_ratio", "sample_fraction", "ranks")
# Under torch.compile module hooks are traced; this tells a hook so (torch >= 2.3).
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: False)
# Checks between full rescans of the model's parameters (a changed optimizer parameter count
# triggers one at once): a replaced module is found within this many checks.
RESCAN_EVERY = 10


#: Dtypes that ``torch._foreach_norm(..., dtype=float32)`` refuses (it will not narrow them):
#: their norms are taken in their own precision and cast.
_WIDE = (torch.float64, torch.complex64, torch.complex128)


def _foreach_norm32(tensors: list[torch.Tensor], ord: float = 2,
                    wide: bool = False) -> list[torch.Tensor]:
    """Per-tensor norms as float32 scalars; ``wide`` when some tensor is float64/complex."""
    if wide:
        return [n.float() for n in torch._foreach_norm(tensors, ord)]
    return torch._foreach_norm(tensors, ord, dtype=torch.float32)


def _real_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` behind a known wrapper: accelerate's
    ``AcceleratedOptimizer`` (which never ran ``Optimizer.__init__``, so it has no hooks, and
    the Hugging Face ``Trainer`` hands it to callbacks) and Lightning's ``LightningOptimizer``.
    Their ``step()`` calls the real optimizer's, where the hooks fire."""
    for _ in range(4):
        name = type(optimizer).__name__
        if name == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer
        elif name == "LightningOptimizer" and hasattr(optimizer, "_optimizer"):
            optimizer = optimizer._optimizer
        else:
            break
    return optimizer


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


@dataclasses.dataclass
class _Layer:
    name: str
    module_type: str
    params: list[nn.Parameter]
    recurrent: bool = False


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
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``activation_every``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scaler: Any = None, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 ranks: str = "zero", **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        optimizer = _real_optimizer(optimizer)
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        if optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
            raise TypeError(
                f"optimizer: a {type(optimizer).__module__}.{type(optimizer).__qualname__} "
                "subclasses torch.optim.Optimizer without running Optimizer.__init__, so it "
                "takes no step hooks; pass the optimizer it wraps (gradwatch looks through "
                "accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer itself)")
        unknown = sorted(set(options) - set(CORE_OPTIONS))
        if unknown:
            raise TypeError(f"gradwatch.torch.watch got unexpected option(s) {', '.join(unknown)}; "
                            f"valid options: optimizer, {', '.join(TORCH_OPTIONS + CORE_OPTIONS)}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(scaler).__name__}")
        self.update_ratio = v.choice("update_ratio", update_ratio, ("sampled", "exact", "off"))
        self.sample_fraction = v.fraction("sample_fraction", sample_fraction)
        self.ranks = v.choice("ranks", ranks, RANKS)
        #: This process's rank and the world size (0 and 1 without torch.distributed).
        self.rank, self.world_size = rank_and_world()
        self._emits = self.rank == 0 or self.ranks == "all"
        events = options.get("events")
        if self.rank != 0 and isinstance(events, (str, os.PathLike)):
            options["events"] = rank_path(events, self.rank) if self._emits else None
        model = unwrap(model)  # DDP / DataParallel / torch.compile: the user's own module
        self._model_ref = weakref.ref(model)
        self._opt_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self._scaler_explicit = scaler is not None
        self._layers = self._collect_layers(model)
        context = RunContext(model=self._model_info(model, optimizer),
                             layers=self._layer_infos())
        # A rank that does not emit still keeps findings, and strict mode still stops it.
        self.monitor = Monitor(context, emit=self._emits, **options)
        self._handles: list[Any] = []
        self._structure_handles: list[Any] = []
        self._removed = False
        self._step = 0  # completed optimizer steps
        self._cb_queued = False
        self._requeued = False
        self._clipping_seen = False
        self._grad_versions: tuple[Any, ...] | None = None
        self._residual_hooks: list[Any] = []
        self._checks_since_scan = 0
        self._opt_count = self._opt_param_count()
        self._outside = self._outside_params(model)
        self._setup_buffers()
        self._attach(model, optimizer)
        self._residual_graph: bool | None = None
        ref = weakref.ref(self)
        self._handles.extend(probe_residual(
            model, lambda found: ref() and ref()._guard(ref()._on_residual, found),
            _is_compiling))
        self.monitor.start()
        # A watcher dropped without remove() takes its hooks with it when collected.
        weakref.finalize(self, _remove_handles, self._handles)

    # -- model structure ---------------------------------------------------------------------

    @staticmethod
    def _collect_layers(model: nn.Module) -> list[_Layer]:
        seen: set[int] = set()
        layers = []
        for name, module in model.named_modules():
            own = []
            for p in module.parameters(recurse=False):
                if id(p) not in seen:  # tied/shared parameters count once
                    seen.add(id(p))
                    own.append(p)
            if own:
                layers.append(_Layer(name or "(root)", module_type(module).__name__, own,
                                     isinstance(module, RECURRENT)))
        return layers

    def _layer_infos(self) -> tuple[LayerInfo, ...]:
        weights = []
        for layer in self._layers:
            w = next((p for p in layer.params if p.dim() >= 2), None)
            weights.append(w)
        gains: list[float | None] = [None] * len(weights)
        # A sharded weight's scale is estimated from this rank's shard: no collective here.
        present = [i for i, w in enumerate(weights) if w is not None and local(w).numel() > 1]
        if present:
            with torch.no_grad():
                vals = torch.stack([
                    (local(weights[i]).detach().float().std()
                     * math.sqrt(math.prod(weights[i].shape[1:]))).cpu()
                    for i in present]).tolist()  # one transfer, at watch time (or a rebuild)
            for i, g in zip(present, vals):
                gains[i] = float(g)
        return tuple(
            LayerInfo(name=layer.name, type=layer.module_type,
                      num_params=sum(p.numel() for p in layer.params), init_gain=gain,
                      recurrent=layer.recurrent, matrix=w is not None)
            for layer, gain, w in zip(self._layers, gains, weights))

    @staticmethod
    def _model_info(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> ModelInfo:
        acts: dict[str, int] = {}
        norms = set()
        residual = False
        recurrent = False
        depth = 0
        for name, m in model.named_modules():
            cls = module_type(m)
            kind = _activation_kind(m)
            if isinstance(m, nn.RNN):
                kind = "relu" if m.nonlinearity == "relu" else "tanh"
            if kind:
                acts[kind] = acts.get(kind, 0) + 1
            if cls in NORM_KINDS:
                norms.add(NORM_KINDS[cls])
            if isinstance(m, RECURRENT):
                recurrent = True
            low = (cls.__name__ + " " + name.rsplit(".", 1)[-1]).lower()
            if any(h in low for h in _RESIDUAL_HINTS):
                residual = True
            if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
                depth += 1
        return ModelInfo(
            framework="torch", activations=frozenset(acts), activation_counts=acts,
            normalization=frozenset(norms),
            depth=depth, residual=True if residual else None, recurrent=recurrent,
            learning_rates=TorchWatcher._learning_rates(optimizer),
            optimizer=type(optimizer).__name__ if optimizer is not None else None,
        )

    @staticmethod
    def _learning_rates(optimizer: torch.optim.Optimizer | None) -> tuple[float, ...]:
        if optimizer is None:
            return ()
        lrs = []
        for group in optimizer.param_groups:
            lr = group.get("lr")
            if isinstance(lr, (int, float)):
                lrs.append(float(lr))
            # A tensor learning rate would need a host sync to read; advice goes without it.
        return tuple(lrs)

    def _on_residual(self, found: bool) -> None:
        """The first forward pass has shown whether the model has skip connections."""
        self._residual_graph = found
        ctx = self.monitor.context
        residual = True if found or ctx.model.residual else False
        if residual != ctx.model.residual:
            ctx.model = dataclasses.replace(ctx.model, residual=residual)

    # -- buffers -----------------------------------------------------------------------------

    def _setup_buffers(self) -> None:
        """Everything that depends on the layer list (at watch time, and after a structure
        change); the step count and what was learnt about the run are kept."""
        params = [p for layer in self._layers for p in layer.params]
        self._params = params
        self._sharded = any(is_sharded(p) for p in params)
        self._param_ids = {id(p) for p in params}
        # Parameters are grouped by layer, in order: a layer is a contiguous run of them, so
        # per-layer sums on the host are one np.add.reduceat over these starts.
        counts = [len(layer.params) for layer in self._layers]
        self._seg_starts = np.cumsum([0] + counts[:-1]).astype(np.intp)
        self._param_layer = np.repeat(np.arange(len(self._layers)), counts)
        self._param_numel = np.array([p.numel() for p in params], dtype=float)
        self._device = params[0].device if params else torch.device("cpu")
        self._wide = any(p.dtype in _WIDE for p in params)
        self._one_device = all(p.device == self._device for p in params)
        n_layers = len(self._layers)
        window = self.monitor.check_every
        # Per step, per parameter tensor: the gradient's L2 norm (0 where there is none; the
        # host-side mask tells). Layers are summed at check time, on the host.
        self._hist = torch.zeros((window, len(params)), dtype=torch.float32, device=self._device)
        self._has_grad = np.zeros((window, n_layers), dtype=bool)
        self._all_layers = np.ones(n_layers, dtype=bool)
        self._inv_scale: list[torch.Tensor | None] = [None] * window
        self._loss_slot: list[Any] = [None] * window
        self._losses: list[Any] = []
        self._window_steps: list[int] = []
        self._grad_size = np.add.reduceat(self._param_numel, self._seg_starts) if params else \
            np.zeros(0)
        self._backward_seen = False
        self._index_cache: tuple[list[int], torch.Tensor, np.ndarray] | None = None
        self._check_extra: torch.Tensor | None = None  # [2, params]: max |g|, non-zeros
        self._dots: torch.Tensor | None = None  # [2, params]: g . W and ||W|| at the check step
        self._pre_norms: torch.Tensor | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._activations: dict[str, tuple[str, torch.Tensor, int]] = {}
        self._act_calls: dict[str, int] = {}
        self._sampling = False
        self._layer_names = tuple(layer.name for layer in self._layers)
        # Strided samples for update ratios: stride chosen per tensor, prime to avoid aliasing
        # with row lengths; the start-of-run sample gives the weight change since the start.
        self._strides: list[int] = []
        self._sample_scale = np.ones(len(params))
        self._w0: list[torch.Tensor] = []
        self._w0_sq = np.zeros(n_layers)
        # Sharded parameters: 1 / how many ranks hold each element, so that the sum of the
        # ranks' squares counts every element once.
        self._rep = None
        if self._sharded:
            self._rep = torch.tensor([1 / replication(p, self.world_size) for p in params],
                                     dtype=torch.float32, device=self._device)
        if self.update_ratio != "off" and params:
            scale = []
            for p in params:
                n = local(p).numel()
                stride = sample_stride(n, self.sample_fraction, self.update_ratio == "exact")
                self._strides.append(stride)
                k = len(range(0, n, stride))
                scale.append(n / max(k, 1))
            self._sample_scale = np.array(scale)
            with torch.no_grad():
                self._w0 = [s.clone() for s in self._samples()]
                if self._sharded:
                    # Each rank's samples are rescaled to its own shard before the ranks'
                    # squares are summed; the start-of-run total is summed at the first check.
                    self._scale_dev = torch.tensor(scale, dtype=torch.float32,
                                                   device=self._device) * self._rep
                    w0n = self._norms(self._w0)
                    self._w0_sq_dev = w0n * w0n * self._scale_dev
                    self._sample_scale = np.ones(len(params))
                    self._w0_sq = np.full(n_layers, math.nan)
                    return
                w0n = torch.stack([n.to(self._device) for n in _foreach_norm32(
                    self._w0, 2, self._wide)]).cpu().numpy().astype(float)
            self._w0_sq = self._layer_sum(w0n * w0n * self._sample_scale)

    def _samples(self) -> list[torch.Tensor]:
        if self._sharded:
            return [local(p.detach()).reshape(-1)[::s] for p, s in zip(self._params,
                                                                       self._strides)]
        return [p.detach().reshape(-1)[::s] for p, s in zip(self._params, self._strides)]

    def _grads(self) -> list[Any]:
        """The parameters' gradients (a sharded gradient's local shard)."""
        if self._sharded:
            return [local(p.grad) for p in self._params]
        return [p.grad for p in self._params]

    def _layer_sum(self, per_param: np.ndarray) -> np.ndarray:
        """Per-layer sums of a per-parameter array (last axis)."""
        if not self._params:
            return np.zeros(per_param.shape[:-1] + (len(self._layers),))
        return np.add.reduceat(per_param, self._seg_starts, axis=-1)

    def extra_memory_bytes(self) -> int:
        """Bytes gradwatch holds on the device between steps (start-of-run samples and the
        per-step history), excluding transient check-step buffers."""
        held = sum(t.numel() * t.element_size() for t in self._w0)
        held += self._hist.numel() * self._hist.element_size()
        return held

    # -- hooks -------------------------------------------------------------------------------

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        ref = weakref.ref(self)  # hooks live on the model; they must not keep the watcher alive
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: ref() and ref()._guard(ref()._on_pre_step)))
            self._handles.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: ref() and ref()._guard(ref()._on_post_step)))
        self._attach_params()
        self._attach_modules(model)

    def _hold(self, handle: Any) -> None:
        """Keep a hook that belongs to the model's current structure (redone when it changes)."""
        self._handles.append(handle)
        self._structure_handles.append(handle)

    def _detach_structure(self, params_only: bool = False) -> None:
        drop = self._param_handles if params_only else self._structure_handles
        gone = {id(h) for h in drop}
        for handle in drop:
            handle.remove()
        # In place: the finalizer holds this very list.
        self._handles[:] = [h for h in self._handles if id(h) not in gone]
        self._structure_handles[:] = [h for h in self._structure_handles if id(h) not in gone]
        self._param_handles = []

    def _attach_params(self) -> None:
        ref = weakref.ref(self)

        def on_grad(_param: torch.Tensor) -> None:
            w = ref()
            if w is not None and not w._cb_queued:
                w._cb_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(w._on_backward_end)

        self._param_handles = []
        self._hooked = set()
        for p in self._params:
            if p.requires_grad:  # a frozen tensor cannot take the hook; see _rescan
                handle = p.register_post_accumulate_grad_hook(on_grad)
                self._hold(handle)
                self._param_handles.append(handle)
                self._hooked.add(id(p))

    def _attach_modules(self, model: nn.Module) -> None:
        ref = weakref.ref(self)
        sites = [(name, SAMPLED[ACTIVATION_KINDS[module_type(m)]], m)
                 for name, m in model.named_modules()
                 if ACTIVATION_KINDS.get(module_type(m)) in SAMPLED]
        if sites and self.monitor.activation_every is not None:
            # Under torch.compile the hooks are traced: they return at once, so the compiled
            # graph holds no gradwatch op and no guard on the watcher's sampling flag (which
            # would recompile every time it flips). Sampling then happens in eager mode only.
            def on_forward_pre(mod, args):
                if _is_compiling():
                    return
                w = ref()
                if w is not None:
                    w._act_calls.clear()

            self._hold(model.register_forward_pre_hook(on_forward_pre))
            for name, kind, m in sites:
                def on_forward(mod, args, out, name=name, kind=kind):
                    if _is_compiling():
                        return
                    w = ref()
                    if w is not None and w._sampling and torch.is_grad_enabled():
                        w._guard(w._sample_activation, name, kind, out)
                self._hold(m.register_forward_hook(on_forward))
        self._sampling = self.monitor.is_activation_step(self._step + 1)

    def _guard(self, fn, *args) -> None:
        """Run a hook body; gradwatch's own failures are reported once and training goes on."""
        try:
            fn(*args)
        except (GradientHealthError, Warning):
            raise
        except Exception as exc:
            self.monitor.internal_error(f"torch adapter ({fn.__name__})", exc)

    def _on_backward_end(self) -> None:
        if not self._requeued:
            # Once more to the back of the queue: callbacks queued during the backward pass
            # (DDP's all-reduce, FSDP2's reduce-scatter) finish before gradients are read.
            self._requeued = True
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
                return
            except RuntimeError:  # not inside a backward pass after all: read them now
                pass
        self._requeued = False
        self._cb_queued = False
        self._guard(self._record_backward)

    # -- per-step work -----------------------------------------------------------------------

    def _present(self, grads: list[Any]) -> tuple[list[int], torch.Tensor, np.ndarray] | None:
        """Which parameters have a gradient: ``None`` when all do (the usual case), else their
        indices (list and device tensor) and the mask of layers with one. Cached: the set of
        parameters with gradients rarely changes."""
        missing = False
        for g in grads:
            if g is None:
                missing = True
                break
        if not missing:
            return None
        present = [i for i, g in enumerate(grads) if g is not None]
        cache = self._index_cache
        if cache is not None and cache[0] == present:
            return cache
        mask = np.zeros(len(self._layers), dtype=bool)
        mask[self._param_layer[present]] = True
        cache = (present, torch.tensor(present, dtype=torch.long, device=self._device), mask)
        self._index_cache = cache
        return cache

    def _norms(self, tensors: list[torch.Tensor], ord: float = 2) -> torch.Tensor:
        """One batched norm per tensor, stacked on the watcher's device."""
        norms = _foreach_norm32(tensors, ord, self._wide)
        if not self._one_device:
            norms = [n.to(self._device) for n in norms]
        return torch.stack(norms)

    def _record_backward(self) -> None:
        grads = self._grads()
        slot = self._step % self.monitor.check_every
        row = self._hist[slot]
        present = self._present(grads)
        check_next = self.monitor.is_check_step(self._step + 1)
        with torch.no_grad():
            if present is None and grads:
                if self._one_device:
                    torch.stack(_foreach_norm32(grads, 2, self._wide), out=row)
                else:
                    row.copy_(self._norms(grads))
                self._has_grad[slot] = self._all_layers
            elif present is None or not present[0]:
                self._has_grad[slot] = False
                if self._opt_ref is None:
                    self._commit()
                return
            else:
                grads = [grads[i] for i in present[0]]
                row.zero_().index_copy_(0, present[1], self._norms(grads))
                self._has_grad[slot] = present[2]
            self._backward_seen = True
            self._grad_versions = self._versions(grads, present)
            if check_next:
                self._dots = self._grad_dots(grads, present)
                if self._is_detail_step(self._step + 1):
                    self._check_extra = self._grad_extras(grads, present)
        if self._opt_ref is None:
            self._inv_scale[slot] = self._inv(self._scaler_ref() if self._scaler_ref else None)
            self._commit()

    def _versions(self, grads: list[torch.Tensor],
                  present: tuple[list[int], torch.Tensor, np.ndarray] | None) -> tuple | None:
        """The in-place version counters of the first and last gradient as the backward left
        them: anything that rescales gradients before the step (clip_grad_norm_ multiplies
        every gradient even when it does not need to clip, GradScaler.unscale_ divides them)
        moves them on. Two tensors read, whatever the model's size."""
        if not grads:
            return None
        # ``grads`` are those present, in parameter order.
        first, last = (0, len(grads) - 1) if present is None else (present[0][0], present[0][-1])
        a, b = grads[0], grads[-1]
        if a.is_sparse or b.is_sparse:
            return None
        return ((first, id(a), a._version), (last, id(b), b._version))

    def _note_clipping(self, scaled: bool) -> None:
        """At the end of a step: were the gradients rescaled in place after the backward?
        GradScaler's unscale is one rescale of its own (``scaled``); more is clipping."""
        record, self._grad_versions = self._grad_versions, None
        if record is None or self._clipping_seen:
            return
        bumps = []
        for index, ident, version in record:
            g = self._params[index].grad
            if g is not None and self._sharded:
                g = local(g)
            if g is None or id(g) != ident:
                return  # replaced, not rescaled: nothing to tell
            bumps.append(g._version - version)
        if min(bumps) > (1 if scaled else 0):
            self._clipping_seen = True

    def _grad_dots(self, grads: list[torch.Tensor],
                   present: tuple[list[int], torch.Tensor, np.ndarray] | None
                   ) -> torch.Tensor | None:
        """g . W and ||W|| per parameter at the check step, W as the gradient saw it (before
        the update; NaN where not measured): the gradient's component along its own weights is
        an L2 penalty's pull, not a data gradient."""
        if self._sharded:
            return None  # a shard's dot product would need its own all-reduce
        ids = present[0] if present is not None else range(len(grads))
        out = torch.full((2, len(self._params)), math.nan, device=self._device)
        dots, weights, keep = [], [], []
        for i, g in zip(ids, grads):
            w = self._params[i].detach()
            if g.is_sparse or g.shape != w.shape or g.dtype != w.dtype:
                continue
            dots.append(torch.dot(g.reshape(-1), w.reshape(-1)).float().to(self._device))
            weights.append(w)
            keep.append(i)
        if dots:
            index = torch.tensor(keep, dtype=torch.long, device=self._device)
            out[0].index_copy_(0, index, torch.stack(dots))
            out[1].index_copy_(0, index, self._norms(weights))
        return out

    def _grad_extras(self, grads: list[torch.Tensor],
                     present: tuple[list[int], torch.Tensor, np.ndarray] | None) -> torch.Tensor:
        """Check-step gradient statistics per parameter: max |g| and the number of non-zero
        entries (the L0 "norm"), laid out like the history row."""
        n = len(self._params)
        dev = self._device
        out = torch.zeros(2, n, device=dev)
        nonempty = [g for g in grads if g.numel()]
        if nonempty:
            if dev.type == "cpu":
                # On CPU the inf-norm kernel is ~10x slower than aminmax and abs() would copy
                # every gradient; aminmax reads each gradient once, allocation-free.
                lo_hi = [torch.aminmax(g) for g in nonempty]
                lo = torch.stack([a for a, _ in lo_hi]).float().abs()
                hi = torch.stack([b for _, b in lo_hi]).float().abs()
                gmax = torch.maximum(lo, hi)
            else:
                gmax = self._norms(nonempty, math.inf)
            nnz = self._norms(nonempty, 0)
            if len(nonempty) == n:
                out[0], out[1] = gmax, nnz
            else:
                ids = present[0] if present is not None else range(n)
                keep = torch.tensor([i for i, g in zip(ids, grads) if g.numel()],
                                    dtype=torch.long, device=dev)
                out[0].index_copy_(0, keep, gmax)
                out[1].index_copy_(0, keep, nnz)
        return out

    def _is_detail_step(self, step: int) -> bool:
        """Check steps that also measure max |g| and zero fractions (and sample activations): every ``activation_every`` steps, or every 5th check without it. None of
        the detectors needs them every check, and on CPU they cost more than the norms."""
        every = self.monitor.activation_every or 5 * self.monitor.check_every
        return step % every == 0

    @staticmethod
    def _inv(scaler: Any) -> torch.Tensor | None:
        """1 / the GradScaler's current scale (a new tensor: the scaler updates its own in
        place after the step), or None without loss scaling."""
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if scaler is None or not isinstance(scale, torch.Tensor) or not scaler.is_enabled():
            return None
        return scale.detach().float().reciprocal()

    def _find_scaler(self) -> Any:
        # GradScaler.step(opt) calls opt.step() from _maybe_opt_step; find it on the stack so a
        # user need not pass it. Only frames with those names are inspected (cheap).
        if self._scaler_ref is not None:
            return self._scaler_ref()
        amp = getattr(torch, "amp", None)
        scaler_type = getattr(amp, "GradScaler", None)
        frame = sys._getframe(2)
        for _ in range(8):
            if frame is None:
                break
            if frame.f_code.co_name in ("_maybe_opt_step", "step"):
                obj = frame.f_locals.get("self")
                if scaler_type is not None and isinstance(obj, scaler_type):
                    self._scaler_ref = weakref.ref(obj)
                    return obj
            frame = frame.f_back
        return None

    def _on_pre_step(self) -> None:
        slot = self._step % self.monitor.check_every
        self._inv_scale[slot] = self._inv(self._find_scaler())
        if not self.monitor.is_check_step(self._step + 1):
            return
        with torch.no_grad():
            if self._w0:
                self._snapshot = [s.clone() for s in self._samples()]
            # The gradients the optimizer is about to apply (after any clipping, unscaled):
            # compared with the end of backward, they tell whether the user clips. Not when
            # the backward runs inside step() (a closure: LBFGS, Lightning): they are stale.
            if not self._backward_seen:
                return
            grads = self._grads()
            present = self._present(grads)
            if present is None:
                self._pre_norms = self._norms(grads) if grads else None
            elif present[0]:
                self._pre_norms = torch.zeros(len(grads), device=self._device).index_copy_(
                    0, present[1], self._norms([grads[i] for i in present[0]]))

    def _on_post_step(self) -> None:
        slot = self._step % self.monitor.check_every
        self._note_clipping(self._inv_scale[slot] is not None)
        self._commit()

    def observe_loss(self, loss: Any) -> None:
        """Record the loss of the step in progress (a tensor or a float); never syncs.

        Call it before ``optimizer.step()`` (without an optimizer: before ``backward()``).
        Several calls in one step (micro-batches) are averaged.
        """
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss: loss must be a scalar, got shape "
                                 f"{tuple(loss.shape)}")
            self._losses.append(loss.detach())  # read at the next check, with everything else
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._losses.append(float(loss))
        else:
            raise TypeError(f"observe_loss: loss must be a tensor or a float, got "
                            f"{type(loss).__name__}")

    def _commit(self) -> None:
        """One optimizer step completed: file its loss, then check if it is a check step."""
        slot = self._step % self.monitor.check_every
        if not self._backward_seen:
            # An optimizer step with no backward since the last one: no gradient to report
            # (the slot still holds a value from check_every steps ago).
            self._has_grad[slot] = False
        self._backward_seen = False
        self._step += 1
        losses = self._losses
        if len(losses) == 1:
            self._loss_slot[slot] = losses[0]
        elif losses:
            self._loss_slot[slot] = losses  # averaged at the check
        else:
            self._loss_slot[slot] = None
        self._losses = []
        self._window_steps.append(self._step)
        self.monitor.note_steps(self._step)
        if self.monitor.is_check_step(self._step):
            self._guard(self._check)
            self._window_steps = []
            self._guard(self._structure_check)
        self._sampling = self.monitor.is_activation_step(self._step + 1)
        if self._act_calls:
            self._act_calls.clear()

    # -- the check ---------------------------------------------------------------------------

    def _loss_values(self, window: int, parts: list[torch.Tensor]) -> list[Any]:
        """Each slot's loss: a float, None, or (an int) its position among the loss tensors
        appended to ``parts``, which are read in the check's one transfer."""
        out: list[Any] = []
        k = 0
        for slot in range(window):
            value = self._loss_slot[slot]
            if isinstance(value, list):
                tensors = [x.float().to(self._device).reshape(()) if isinstance(x, torch.Tensor)
                           else torch.tensor(x, device=self._device) for x in value]
                value = torch.stack(tensors).mean()
            if isinstance(value, torch.Tensor):
                parts.append(value.float().to(self._device).reshape(1))
                out.append(k)
                k += 1
            else:
                out.append(value)
        return out

    def _check(self) -> None:
        window = self.monitor.check_every
        n = len(self._params)
        dev = self._device
        with torch.no_grad():
            hist, extra, pre = self._hist, self._check_extra, self._pre_norms
            wn = d0 = du = snap = w0_sq = None
            if self._params:
                wn = self._norms([local(p.detach()) if self._sharded else p.detach()
                                  for p in self._params])
                if self._w0:
                    now = self._samples()
                    if self.update_ratio == "exact":
                        # One tensor at a time: the transient is the largest tensor, not a
                        # second copy of the model.
                        d0 = self._norms([torch.linalg.vector_norm(a - b) for a, b in
                                          zip(now, self._w0)])
                    else:
                        d0 = self._norms(torch._foreach_sub(now, self._w0))
                    if self._snapshot is not None:
                        snap = self._norms(self._snapshot)
                        torch._foreach_sub_(self._snapshot, now)  # in place: no third copy
                        du = self._norms(self._snapshot)
            if self._sharded:
                hist, extra, pre, wn, d0, du, snap, w0_sq = self._sum_over_ranks(
                    hist, extra, pre, wn, d0, du, snap)
            parts: list[torch.Tensor] = [hist.flatten()]
            parts.append(extra.flatten() if extra is not None else
                         torch.full((2 * n,), math.nan, device=dev))
            parts.append(pre if pre is not None else torch.full((n,), math.nan, device=dev))
            dots = self._dots
            parts.append(dots.flatten() if dots is not None else
                         torch.full((2 * n,), math.nan, device=dev))
            inv = self._inv_scale
            parts.append(torch.stack([s.to(dev).reshape(()) if s is not None else
                                      torch.ones((), device=dev) for s in inv])
                         if any(s is not None for s in inv) else torch.ones(window, device=dev))
            parts.extend(t for t in (wn, d0, du, snap) if t is not None)
            act_names = list(self._activations)
            if act_names:
                parts.append(torch.stack([self._activations[a][1] for a in act_names]).flatten())
            losses = self._loss_values(window, parts)
            if w0_sq is not None:
                parts.append(w0_sq)  # last: read before the rest is unpacked
            host = torch.cat([p.float().to(dev).flatten() for p in parts]).cpu().numpy()
        host = host.astype(float)
        if w0_sq is not None:
            self._w0_sq = self._layer_sum(host[-n:])
        has_snapshot = self._snapshot is not None
        has_extra = self._check_extra is not None
        self._check_extra = self._pre_norms = self._snapshot = self._dots = None
        self._inv_scale = [None] * window
        stats = self._unpack(host, act_names, losses, has_snapshot, has_extra)
        self._activations = {}
        self.monitor.check(stats)

    def _sum_over_ranks(self, hist: torch.Tensor, extra: torch.Tensor | None,
                        pre: torch.Tensor | None, *norms: torch.Tensor | None) -> tuple:
        """Sharded parameters: the ranks' per-parameter statistics of their shards become the
        whole tensors' in ONE all-reduce (sums of squares; max |g| by a per-rank row).

        The layout depends only on the step and the watcher's settings, never on what this
        rank happened to see, so every rank contributes a buffer of the same size.
        """
        n = len(self._params)
        dev = self._device
        rep = self._rep
        wn, d0, du, snap = norms
        missing = torch.full((n,), math.nan, device=dev)

        def sq(t: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
            return t * t * scale if t is not None else missing

        blocks = [(hist * hist * rep).flatten(), sq(pre, rep),
                  extra[1] * rep if extra is not None else missing]
        if wn is not None:
            blocks.append(sq(wn, rep))
        if d0 is not None:
            scale = self._scale_dev
            blocks += [sq(d0, scale), sq(du, scale), sq(snap, scale), self._w0_sq_dev]
        detail = self._is_detail_step(self._step)
        if detail:
            gmax = torch.zeros((self.world_size, n), device=dev)
            gmax[self.rank] = extra[0] if extra is not None else missing
            blocks.append(gmax.flatten())
        buf = torch.cat(blocks)
        all_reduce_sum(buf)
        out = list(torch.split(buf, [b.numel() for b in blocks]))
        hist = out.pop(0).sqrt().reshape(hist.shape)
        pre_all = out.pop(0).sqrt()
        nnz = out.pop(0)
        wn_all = out.pop(0).sqrt() if wn is not None else None
        d0_all = du_all = snap_all = w0_sq = None
        if d0 is not None:
            d0_all, du_all, snap_all = (out.pop(0).sqrt() for _ in range(3))
            w0_sq = out.pop(0)
        if extra is not None:
            gmax_all = out.pop(0).reshape(self.world_size, n).amax(0) if detail else extra[0]
            extra = torch.stack([gmax_all, nnz])
        return (hist, extra, pre_all if pre is not None else None, wn_all, d0_all,
                du_all if du is not None else None, snap_all if snap is not None else None,
                w0_sq)

    def _unpack(self, host: np.ndarray, act_names: list[str], losses: list[Any],
                has_snapshot: bool, has_extra: bool) -> StepStats:
        window = self.monitor.check_every
        n = len(self._params)
        pos = 0

        def take(k: int) -> np.ndarray:
            nonlocal pos
            out = host[pos:pos + k]
            pos += k
            return out

        norms = take(window * n).reshape(window, n)
        gmax_p, nnz_p = take(2 * n).reshape(2, n)
        pre_p = take(n)
        dot_p, wb_p = take(2 * n).reshape(2, n)
        inv = take(window)
        # Rows in step order: the window's slots are step-1 modulo the window.
        steps = np.array(self._window_steps, dtype=np.int64)
        slots = (steps - 1) % window
        last = slots[-1] if len(slots) else 0
        with np.errstate(over="ignore", invalid="ignore"):
            sq = norms * norms
            grad_norm = np.sqrt(self._layer_sum(sq)) * inv[:, None]
            gmax = np.maximum.reduceat(gmax_p, self._seg_starts) * inv[last] if n else gmax_p
            gbad = self._layer_sum((~np.isfinite(norms[last])).astype(float))
            gzero = 1 - self._layer_sum(nnz_p) / np.maximum(self._grad_size, 1)
            bwd_total = math.sqrt(sq[last].sum()) * inv[last] if n else math.nan
            pre_total = math.sqrt((pre_p * pre_p).sum()) if n else math.nan

        wnorm = wbad = ratio = change = orth = None
        if n:
            wn = take(n)
            wnorm = np.sqrt(self._layer_sum(wn * wn))
            if np.isfinite(dot_p).any():
                with np.errstate(over="ignore", invalid="ignore"):
                    orth = np.sqrt(self._layer_sum(orthogonal_norms(
                        sq[last], dot_p, wb_p * wb_p))) * inv[last]
            wbad = self._layer_sum((~np.isfinite(wn)).astype(float))
            if self._w0:
                scale = self._sample_scale
                with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                    d0 = take(n)
                    # A layer that started at zero (a bias) has no relative change: NaN, not inf.
                    change = np.where(self._w0_sq > 0, np.sqrt(
                        self._layer_sum(d0 * d0 * scale) / self._w0_sq), math.nan)
                    if has_snapshot:
                        du, snap = take(n), take(n)
                        before = self._layer_sum(snap * snap * scale)
                        ratio = np.where(before > 0, np.sqrt(
                            self._layer_sum(du * du * scale) / before), math.nan)
                    else:
                        ratio = np.full(len(self._layers), math.nan)
        acts = take(len(act_names))
        loss = np.array([host[pos + x] if isinstance(x, int) else
                         (math.nan if x is None else x) for x in losses], dtype=float)
        has_loss = np.array([x is not None for x in losses], dtype=bool)
        if np.isfinite(bwd_total) and np.isfinite(pre_total) and bwd_total > 0:
            if pre_total < 0.999 * bwd_total:
                self._clipping_seen = True
        ctx = self.monitor.context
        opt = self._opt_ref() if self._opt_ref is not None else None
        lrs = self._learning_rates(opt) or ctx.model.learning_rates
        clipping = self._clipping_seen or None
        if lrs != ctx.model.learning_rates or clipping != ctx.model.clipping:
            ctx.model = dataclasses.replace(ctx.model, learning_rates=lrs, clipping=clipping)
        activations = {}
        for name, value in zip(act_names, acts):
            kind, _, units = self._activations[name]
            if kind == "relu":
                activations[name] = ActivationStats(kind=kind, dead_fraction=float(value), units=units)
            else:
                activations[name] = ActivationStats(kind=kind, saturated_fraction=float(value),
                                                    units=units)
        has_grad = self._has_grad[slots].copy()
        return StepStats(
            step=self._step, layers=self._layer_names, steps=steps,
            grad_norm=np.where(has_grad, grad_norm[slots], np.nan), has_grad=has_grad,
            loss=loss[slots], has_loss=has_loss[slots], grad_size=self._grad_size,
            grad_max=(gmax if n else np.zeros(0)) if has_extra else None, grad_nonfinite=gbad,
            grad_zero_fraction=gzero if has_extra else None,
            weight_norm=wnorm, weight_nonfinite=wbad, update_ratio=ratio, weight_change=change,
            grad_norm_orthogonal=orth, activations=activations,
        )

    def _sample_activation(self, name: str, kind: str, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.numel() == 0:
            return
        calls = self._act_calls.get(name, 0)
        self._act_calls[name] = calls + 1
        site = name if calls == 0 else f"{name}#{calls}"
        y = out.detach()
        with torch.no_grad():
            if kind == "relu":
                axis = 1 if y.dim() != 3 else -1
                units = y.shape[axis]
                # A ReLU output is >= 0, so a unit is alive iff its sum over the batch (and
                # positions) is > 0: one float reduction, no boolean copy of the activation
                # (about 10x faster on conv outputs than any(y > 0)). NaN counts as not alive.
                dims = [d for d in range(y.dim()) if d != axis % y.dim()]
                alive = y.sum(dim=dims, dtype=torch.float32) > 0
                value = 1 - alive.float().mean()
            elif kind == "sigmoid":
                units = y.shape[1 if y.dim() != 3 else -1]
                value = ((y * (1 - y)) < 0.25 * SATURATION_DERIVATIVE).float().mean()
            else:
                units = y.shape[1 if y.dim() != 3 else -1]
                value = ((1 - y * y) < SATURATION_DERIVATIVE).float().mean()
        self._activations[site] = (kind, value.to(self._device), int(units))

    # -- structure changes -------------------------------------------------------------------

    def _opt_param_count(self) -> int:
        opt = self._opt_ref() if self._opt_ref is not None else None
        if opt is None:
            return 0
        return sum(len(group["params"]) for group in opt.param_groups)

    def _outside_params(self, model: nn.Module) -> int:
        """How many of the optimizer's tensors are not parameters of the model."""
        opt = self._opt_ref() if self._opt_ref is not None else None
        if opt is None:
            return 0
        mine = {id(p) for p in model.parameters()}
        return sum(1 for group in opt.param_groups for p in group["params"] if id(p) not in mine)

    def _structure_check(self) -> None:
        """After a check: has the model changed since watch()? Cheap by construction: the
        optimizer's parameter count every check, a full rescan every ``RESCAN_EVERY`` checks or
        when that count changed."""
        self._checks_since_scan += 1
        count = self._opt_param_count()
        if count == self._opt_count and self._checks_since_scan < RESCAN_EVERY:
            return
        self._opt_count = count
        self._checks_since_scan = 0
        model = self._model_ref()
        if model is not None:
            self._rescan(model)

    def _rescan(self, model: nn.Module) -> None:
        layers = self._collect_layers(model)
        before = [(layer.name, [id(p) for p in layer.params]) for layer in self._layers]
        now = [(layer.name, [id(p) for p in layer.params]) for layer in layers]
        outside = self._outside_params(model)
        changes = []
        if now != before:
            old = {name: ids for name, ids in before}
            new = {name: ids for name, ids in now}
            added = [name for name in new if name not in old]
            removed = [name for name in old if name not in new]
            changed = [name for name in new if name in old and new[name] != old[name]]
            for label, names in (("added", added), ("replaced", changed), ("removed", removed)):
                if names:
                    shown = ", ".join(f"'{plain(x)}'" for x in names[:5])
                    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                    changes.append(f"layers {label}: {shown}{more}")
            self._restructure(model, layers)
        elif {id(p) for p in self._params if p.requires_grad} != self._hooked:
            # Unfrozen (or frozen) parameters: same layers, only the gradient hooks change.
            before_n = len(self._hooked)
            self._detach_structure(params_only=True)
            self._attach_params()
            changes.append(f"tensors with gradients: {before_n} -> {len(self._hooked)}")
        if outside != self._outside:
            self._outside = outside
            if outside:
                changes.append(f"the optimizer holds {outside} tensor(s) that are not "
                               f"parameters of the model; they are not watched")
        if changes and self._emits:
            logger.info("gradwatch: the model changed at step %d (%s); watching %d layers from "
                        "now on.", self._step, "; ".join(changes), len(self._layers))

    def _restructure(self, model: nn.Module, layers: list[_Layer]) -> None:
        """New layer list: hooks moved to the current parameters, buffers and per-layer
        statistics restarted, detectors rebound. Runs right after a check (an empty window)."""
        self._detach_structure()
        self._layers = layers
        self._setup_buffers()
        self._attach_params()
        self._attach_modules(model)
        opt = self._opt_ref() if self._opt_ref is not None else None
        info = self._model_info(model, opt)
        info = dataclasses.replace(info, clipping=self._clipping_seen or None)
        if self._residual_graph is not None:
            info = dataclasses.replace(info, residual=bool(self._residual_graph or info.residual))
        self.monitor.set_context(RunContext(model=info, layers=self._layer_infos()))

    # -- public API --------------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Findings so far, in order of occurrence."""
        return self.monitor.findings

    @property
    def step(self) -> int:
        """Optimizer steps observed so far."""
        return self._step

    def report(self) -> Report:
        """Per-layer table and findings; ``str()`` renders it."""
        return self.monitor.report()

    def remove(self) -> Report:
        """Detach every hook gradwatch added and release the model; returns the final report.

        The model is left exactly as it was: no hook, no reference from gradwatch.
        """
        if not self._removed:
            self._removed = True
            _remove_handles(self._handles)
            # Every tensor of the model's (parameters, through the layer list too, and their
            # gradients' samples) goes: the report, kept by the watcher, needs none of them.
            for layer in self._layers:
                layer.params = []
            self._params = []
            self._w0 = []
            self._snapshot = None
            self._check_extra = self._pre_norms = self._dots = None
            self._losses = []
            self._loss_slot = [None] * len(self._loss_slot)
            self._activations = {}
            self._index_cache = None
            self._model_ref = lambda: None
            self._opt_ref = None
            self._scaler_ref = None
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
        state = "removed" if self._removed else f"{len(self._handles)} hooks"
        return (f"TorchWatcher({len(self._layers)} layers, step {self._step}, "
                f"{len(self.findings)} findings, {state})")

    def layers(self) -> Iterator[str]:
        """Names of the watched layers in depth order."""
        return (layer.name for layer in self._layers)
