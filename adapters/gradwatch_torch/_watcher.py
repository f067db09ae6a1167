"""PyTorch watcher: per-layer statistics from hooks, computed on the device, one transfer a check.

Where gradients are read: at the end of each backward pass (an autograd-engine callback queued
by the parameters' post-accumulate-grad hooks), so they are accumulated over micro-batches and
not yet clipped. The statistics of the last backward before an optimizer step belong to that
step; they are unscaled by the GradScaler's scale at the optimizer's pre-step hook, and a step
the scaler skips (overflow) is not a step. Without an optimizer every backward is a step.

Per step the cost is one ``torch._foreach_norm`` over the gradients plus a few tiny kernels;
check steps (every ``check_every``) add max/zero counts, weight norms and update ratios, then
move everything to the host in one transfer.
"""

from __future__ import annotations

import dataclasses
import math
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
from gradwatch._report import Report
from gradwatch._stats import ActivationStats, LayerInfo, ModelInfo, StepStats, sample_stride

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

TORCH_OPTIONS = ("scaler", "update_ratio", "sample_fraction")


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
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``activation_every``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 scaler: Any = None, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        unknown = sorted(set(options) - set(CORE_OPTIONS))
        if unknown:
            raise TypeError(f"gradwatch.torch.watch got unexpected option(s) {', '.join(unknown)}; "
                            f"valid options: optimizer, {', '.join(TORCH_OPTIONS + CORE_OPTIONS)}")
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(scaler).__name__}")
        self.update_ratio = v.choice("update_ratio", update_ratio, ("sampled", "exact", "off"))
        self.sample_fraction = v.fraction("sample_fraction", sample_fraction)
        self._model_ref = weakref.ref(model)
        self._opt_ref = weakref.ref(optimizer) if optimizer is not None else None
        self._scaler_ref = weakref.ref(scaler) if scaler is not None else None
        self._scaler_explicit = scaler is not None
        self._layers = self._collect_layers(model)
        context = RunContext(model=self._model_info(model, optimizer),
                             layers=self._layer_infos())
        self.monitor = Monitor(context, **options)
        self._handles: list[Any] = []
        self._removed = False
        self._setup_buffers()
        self._attach(model, optimizer)
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
                layers.append(_Layer(name or "(root)", type(module).__name__, own,
                                     isinstance(module, RECURRENT)))
        return layers

    def _layer_infos(self) -> tuple[LayerInfo, ...]:
        weights = []
        for layer in self._layers:
            w = next((p for p in layer.params if p.dim() >= 2), None)
            weights.append(w)
        gains: list[float | None] = [None] * len(weights)
        present = [i for i, w in enumerate(weights) if w is not None and w.numel() > 1]
        if present:
            with torch.no_grad():
                vals = torch.stack([
                    (weights[i].detach().float().std() * math.sqrt(weights[i][0].numel())).cpu()
                    for i in present]).tolist()  # one transfer, at watch time only
            for i, g in zip(present, vals):
                gains[i] = float(g)
        return tuple(
            LayerInfo(name=layer.name, type=layer.module_type,
                      num_params=sum(p.numel() for p in layer.params), init_gain=gain,
                      recurrent=layer.recurrent)
            for layer, gain in zip(self._layers, gains))

    @staticmethod
    def _model_info(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> ModelInfo:
        acts, norms = set(), set()
        residual = False
        recurrent = False
        depth = 0
        for name, m in model.named_modules():
            kind = ACTIVATION_KINDS.get(type(m))
            if kind:
                acts.add(kind)
            if isinstance(m, nn.RNN):
                acts.add("relu" if m.nonlinearity == "relu" else "tanh")
            if type(m) in NORM_KINDS:
                norms.add(NORM_KINDS[type(m)])
            if isinstance(m, RECURRENT):
                recurrent = True
            low = (type(m).__name__ + " " + name.rsplit(".", 1)[-1]).lower()
            if any(h in low for h in _RESIDUAL_HINTS):
                residual = True
            if any(p.dim() >= 2 for p in m.parameters(recurse=False)):
                depth += 1
        return ModelInfo(
            framework="torch", activations=frozenset(acts), normalization=frozenset(norms),
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

    # -- buffers -----------------------------------------------------------------------------

    def _setup_buffers(self) -> None:
        params = [p for layer in self._layers for p in layer.params]
        self._params = params
        self._param_layer = [i for i, layer in enumerate(self._layers) for _ in layer.params]
        self._device = params[0].device if params else torch.device("cpu")
        n_layers = len(self._layers)
        window = self.monitor.check_every
        f32 = dict(dtype=torch.float32, device=self._device)
        self._hist = torch.full((window, n_layers), math.nan, **f32)
        self._loss_hist = torch.full((window,), math.nan, **f32)
        self._has_grad = np.zeros((window, n_layers), dtype=bool)
        self._has_loss = np.zeros(window, dtype=bool)
        self._window_steps: list[int] = []
        self._grad_size = np.array([sum(p.numel() for p in layer.params) for layer in self._layers],
                                   dtype=float)
        self._loss_acc = torch.zeros((), **f32)
        self._loss_count = 0
        self._step = 0  # completed optimizer steps
        self._cb_queued = False
        self._backward_seen = False
        self._index_cache: tuple[list[int], torch.Tensor, torch.Tensor] | None = None
        self._zero = torch.zeros((), **f32)
        self._full_index = torch.tensor(self._param_layer, dtype=torch.long, device=self._device)
        self._check_extra: torch.Tensor | None = None  # grad max / nonfinite / zero fraction
        self._bwd_total: torch.Tensor | None = None
        self._pre_total: torch.Tensor | None = None
        self._snapshot: list[torch.Tensor] | None = None
        self._activations: dict[str, tuple[str, torch.Tensor, int]] = {}
        self._act_calls: dict[str, int] = {}
        self._sampling = False
        self._clipping_seen = False
        # Strided samples for update ratios: stride chosen per tensor, prime to avoid aliasing
        # with row lengths; the start-of-run sample gives the weight change since the start.
        self._strides: list[int] = []
        self._sample_scale = torch.ones(len(params), **f32)
        self._w0: list[torch.Tensor] = []
        if self.update_ratio != "off" and params:
            scale = []
            for p in params:
                n = p.numel()
                stride = sample_stride(n, self.sample_fraction, self.update_ratio == "exact")
                self._strides.append(stride)
                k = len(range(0, n, stride))
                scale.append(n / max(k, 1))
            self._sample_scale = torch.tensor(scale, **f32)
            with torch.no_grad():
                self._w0 = [s.clone() for s in self._samples()]

    def _samples(self) -> list[torch.Tensor]:
        return [p.detach().reshape(-1)[::s] for p, s in zip(self._params, self._strides)]

    def extra_memory_bytes(self) -> int:
        """Bytes gradwatch holds on the device between steps (start-of-run samples and the
        per-step history), excluding transient check-step buffers."""
        held = sum(t.numel() * t.element_size() for t in self._w0)
        held += self._hist.numel() * 4 + self._loss_hist.numel() * 4 + self._sample_scale.numel() * 4
        return held

    # -- hooks -------------------------------------------------------------------------------

    def _attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        ref = weakref.ref(self)  # hooks live on the model; they must not keep the watcher alive

        def on_grad(_param: torch.Tensor) -> None:
            w = ref()
            if w is not None and not w._cb_queued:
                w._cb_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(w._on_backward_end)

        for p in self._params:
            if p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(on_grad))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: ref() and ref()._guard(ref()._on_pre_step)))
            self._handles.append(optimizer.register_step_post_hook(
                lambda opt, args, kwargs: ref() and ref()._guard(ref()._on_post_step)))
        sites = [(name, SAMPLED[ACTIVATION_KINDS[type(m)]], m) for name, m in model.named_modules()
                 if ACTIVATION_KINDS.get(type(m)) in SAMPLED]
        if sites and self.monitor.activation_every is not None:
            self._handles.append(model.register_forward_pre_hook(
                lambda mod, args: ref() and ref()._act_calls.clear()))
            for name, kind, m in sites:
                def on_forward(mod, args, out, name=name, kind=kind):
                    w = ref()
                    if w is not None and w._sampling and torch.is_grad_enabled():
                        w._guard(w._sample_activation, name, kind, out)
                self._handles.append(m.register_forward_hook(on_forward))
        self._sampling = self.monitor.is_activation_step(1)

    def _guard(self, fn, *args) -> None:
        """Run a hook body; gradwatch's own failures are reported once and training goes on."""
        try:
            fn(*args)
        except (GradientHealthError, Warning):
            raise
        except Exception as exc:
            self.monitor.internal_error(f"torch adapter ({fn.__name__})", exc)

    def _on_backward_end(self) -> None:
        self._cb_queued = False
        self._guard(self._record_backward)

    # -- per-step work -----------------------------------------------------------------------

    def _layer_index(self, present: list[int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Layer index of each present parameter, each layer's element count, and which layers
        have a gradient (cached: the set of parameters with gradients rarely changes)."""
        cache = self._index_cache
        if cache is not None and cache[0] == present:
            return cache[1], cache[2], cache[3]
        layer_of = [self._param_layer[i] for i in present]
        idx = torch.tensor(layer_of, dtype=torch.long, device=self._device)
        sizes = torch.zeros(len(self._layers), device=self._device).index_add_(
            0, idx, torch.tensor([float(self._params[i].numel()) for i in present],
                                 device=self._device))
        mask = np.zeros(len(self._layers), dtype=bool)
        mask[layer_of] = True
        self._index_cache = (present, idx, sizes, mask)
        return idx, sizes, mask

    def _record_backward(self) -> None:
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        slot = self._step % self.monitor.check_every
        if not present:
            self._hist[slot].fill_(math.nan)
            self._has_grad[slot] = False
            if self._opt_ref is None:
                self._commit()
            return
        self._backward_seen = True
        grads = [self._params[i].grad for i in present]
        idx, sizes, mask = self._layer_index(present)
        with torch.no_grad():
            # Layers without a gradient read 0 here; the host-side mask marks them.
            norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
            if norms.device != self._device:
                norms = norms.to(self._device)
            sq = self._hist[slot].zero_().index_add_(0, idx, norms * norms)
            if self.monitor.is_check_step(self._step + 1):
                self._bwd_total = sq.sum().sqrt()
                self._check_extra = self._grad_extras(grads, idx, sizes, norms)
            sq.sqrt_()
        self._has_grad[slot] = mask
        if self._opt_ref is None:
            scaler = self._scaler_ref() if self._scaler_ref is not None else None
            self._unscale(slot, scaler)
            self._commit()

    def _grad_extras(self, grads: list[torch.Tensor], idx: torch.Tensor, sizes: torch.Tensor,
                     norms: torch.Tensor) -> torch.Tensor:
        """Check-step gradient statistics per layer: max |g|, tensors holding NaN/Inf, and the
        fraction of exactly-zero entries (L0 "norm" counts the non-zeros)."""
        n_layers = len(self._layers)
        dev = self._device
        gmax = torch.stack(torch._foreach_norm(grads, math.inf, dtype=torch.float32)).to(dev)
        nnz = torch.stack(torch._foreach_norm(grads, 0, dtype=torch.float32)).to(dev)
        out = torch.zeros(3, n_layers, device=dev)
        out[0].scatter_reduce_(0, idx, gmax, reduce="amax", include_self=False)
        out[1].index_add_(0, idx, (~torch.isfinite(norms)).float())
        out[2].index_add_(0, idx, nnz)
        out[2] = 1 - out[2] / sizes.clamp_min(1)
        return out

    def _unscale(self, slot: int, scaler: Any) -> None:
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if scaler is None or not isinstance(scale, torch.Tensor) or not scaler.is_enabled():
            return
        inv = scale.to(self._device, torch.float32).reciprocal()
        self._hist[slot].mul_(inv)
        if self._check_extra is not None and self.monitor.is_check_step(self._step + 1):
            self._check_extra[0].mul_(inv)
            if self._bwd_total is not None:
                self._bwd_total = self._bwd_total * inv

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
        self._unscale(slot, self._find_scaler())
        if not self.monitor.is_check_step(self._step + 1):
            return
        with torch.no_grad():
            grads = [p.grad for p in self._params if p.grad is not None]
            if grads:
                n = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).to(self._device)
                self._pre_total = (n * n).sum().sqrt()
            if self._w0:
                self._snapshot = [s.clone() for s in self._samples()]

    def _on_post_step(self) -> None:
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
            value = loss.detach().reshape(()).to(self._device, torch.float32)
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            value = torch.tensor(float(loss), dtype=torch.float32, device=self._device)
        else:
            raise TypeError(f"observe_loss: loss must be a tensor or a float, got "
                            f"{type(loss).__name__}")
        self._loss_acc = self._loss_acc + value
        self._loss_count += 1

    def _commit(self) -> None:
        """One optimizer step completed: file its loss, then check if it is a check step."""
        slot = self._step % self.monitor.check_every
        if not self._backward_seen:
            # An optimizer step with no backward since the last one: no gradient to report
            # (the slot still holds a value from check_every steps ago).
            self._hist[slot].fill_(math.nan)
            self._has_grad[slot] = False
        self._backward_seen = False
        self._step += 1
        if self._loss_count:
            self._loss_hist[slot] = self._loss_acc / self._loss_count
            self._has_loss[slot] = True
        else:
            self._loss_hist[slot] = math.nan
            self._has_loss[slot] = False
        self._loss_acc = self._zero  # observe_loss never writes in place
        self._loss_count = 0
        self._window_steps.append(self._step)
        self.monitor.note_steps(self._step)
        if self.monitor.is_check_step(self._step):
            self._guard(self._check)
            self._window_steps = []
        self._sampling = self.monitor.is_activation_step(self._step + 1)
        self._act_calls.clear()

    # -- the check ---------------------------------------------------------------------------

    def _check(self) -> None:
        n_layers = len(self._layers)
        dev = self._device
        parts = [self._hist.flatten(), self._loss_hist]
        with torch.no_grad():
            extra = self._check_extra
            if extra is None:
                extra = torch.full((3, n_layers), math.nan, device=dev)
            parts.append(extra.flatten())
            params = self._params
            if params:
                wn = torch.stack(torch._foreach_norm([p.detach() for p in params], 2,
                                                     dtype=torch.float32)).to(dev)
                idx = self._full_index
                wsq = torch.zeros(n_layers, device=dev).index_add_(0, idx, wn * wn)
                wbad = torch.zeros(n_layers, device=dev).index_add_(0, idx, (~torch.isfinite(wn)).float())
                parts += [wsq.sqrt(), wbad]
                ratio, change = self._ratios(idx)
                parts += [ratio, change]
            else:
                parts += [torch.zeros(0, device=dev)] * 4
            totals = torch.stack([
                self._bwd_total if self._bwd_total is not None else torch.tensor(math.nan, device=dev),
                self._pre_total if self._pre_total is not None else torch.tensor(math.nan, device=dev),
            ])
            parts.append(totals.to(dev))
            act_names = list(self._activations)
            if act_names:
                parts.append(torch.stack([self._activations[n][1] for n in act_names]).flatten())
            host = torch.cat([p.float().to(dev) for p in parts]).cpu().numpy().astype(float)
        self._check_extra = self._bwd_total = self._pre_total = None
        self._snapshot = None
        stats = self._unpack(host, act_names)
        self._activations = {}
        self.monitor.check(stats)

    def _ratios(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_layers = len(self._layers)
        dev = self._device
        nan = torch.full((n_layers,), math.nan, device=dev)
        if not self._w0:
            return nan, nan.clone()
        now = self._samples()
        scale = self._sample_scale

        def layer_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
            n = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).to(dev)
            return torch.zeros(n_layers, device=dev).index_add_(0, idx, n * n * scale).sqrt()

        change = layer_norm(torch._foreach_sub(now, self._w0)) / layer_norm(self._w0)
        if self._snapshot is not None:
            ratio = layer_norm(torch._foreach_sub(now, self._snapshot)) / layer_norm(self._snapshot)
        else:
            ratio = nan
        return ratio, change

    def _unpack(self, host: np.ndarray, act_names: list[str]) -> StepStats:
        window = self.monitor.check_every
        n_layers = len(self._layers)
        pos = 0

        def take(n: int) -> np.ndarray:
            nonlocal pos
            out = host[pos:pos + n]
            pos += n
            return out

        hist = take(window * n_layers).reshape(window, n_layers)
        loss = take(window)
        gmax, gbad, gzero = take(3 * n_layers).reshape(3, n_layers)
        wnorm, wbad, ratio, change = (take(n_layers) for _ in range(4))
        bwd_total, pre_total = take(2)
        acts = take(len(act_names) * 1)
        # Rows in step order: the window's slots are step-1 modulo the window.
        steps = np.array(self._window_steps, dtype=np.int64)
        slots = (steps - 1) % window
        if np.isfinite(bwd_total) and np.isfinite(pre_total) and bwd_total > 0:
            if pre_total < 0.999 * bwd_total:
                self._clipping_seen = True
        ctx = self.monitor.context
        opt = self._opt_ref() if self._opt_ref is not None else None
        ctx.model = dataclasses.replace(
            ctx.model, learning_rates=self._learning_rates(opt) or ctx.model.learning_rates,
            clipping=self._clipping_seen or None)
        activations = {}
        for name, value in zip(act_names, acts):
            kind, _, units = self._activations[name]
            if kind == "relu":
                activations[name] = ActivationStats(kind=kind, dead_fraction=float(value), units=units)
            else:
                activations[name] = ActivationStats(kind=kind, saturated_fraction=float(value),
                                                    units=units)
        no_params = not self._params
        has_grad = self._has_grad[slots].copy()
        return StepStats(
            step=self._step, layers=tuple(layer.name for layer in self._layers), steps=steps,
            grad_norm=np.where(has_grad, hist[slots], np.nan), has_grad=has_grad, loss=loss[slots],
            has_loss=self._has_loss[slots].copy(), grad_size=self._grad_size,
            grad_max=gmax, grad_nonfinite=gbad, grad_zero_fraction=gzero,
            weight_norm=None if no_params else wnorm, weight_nonfinite=None if no_params else wbad,
            update_ratio=None if (no_params or not self._w0) else ratio,
            weight_change=None if (no_params or not self._w0) else change,
            activations=activations,
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
                alive = (y > 0).movedim(axis, -1).reshape(-1, units).any(0)
                value = 1 - alive.float().mean()
            elif kind == "sigmoid":
                units = y.shape[1 if y.dim() != 3 else -1]
                value = ((y * (1 - y)) < 0.25 * SATURATION_DERIVATIVE).float().mean()
            else:
                units = y.shape[1 if y.dim() != 3 else -1]
                value = ((1 - y * y) < SATURATION_DERIVATIVE).float().mean()
        self._activations[site] = (kind, value.to(self._device), int(units))

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
            self._params = []
            self._w0 = []
            self._snapshot = None
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
