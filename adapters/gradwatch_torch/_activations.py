"""Dead and saturated units: outputs of the model's activation modules, sampled on activation steps.

The forward hooks are on the modules only for the steps that sample (one in ``activation_every``),
so the others run the model's plain forward. A sampled site costs one reduction of its output; the
fractions of all sites are made of those at the check, together. Only forward passes with
gradients enabled are sampled (validation under ``torch.no_grad()`` is not); under
``torch.compile`` the hooks return at once while dynamo traces them, so the compiled graph holds
no gradwatch op and no guard on gradwatch's state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from gradwatch import kit

from ._distributed import module_type
from ._hooks import HookSet, is_compiling
from ._model import ACTIVATION_KINDS


class _Sampled(NamedTuple):
    """What one site left at this activation step."""

    kind: str
    #: ReLU: per unit, the output summed over the batch (and positions) ``[units]``: a unit is
    #: alive iff > 0. Sigmoid/tanh: how many outputs are saturated (a 0-d tensor).
    value: torch.Tensor
    units: int
    #: Outputs at the site (sigmoid/tanh: what the count is a fraction of).
    numel: int


class ActivationSampler:
    """Samples the outputs of ``nn.ReLU``/``nn.ReLU6``/``nn.Sigmoid``/``nn.Tanh`` modules.

    Args:
        hooks: Where the handles are kept.
        guard: Runs a hook body so that gradwatch's failure does not stop training
            (``Monitor.guard``).
    """

    def __init__(self, hooks: HookSet, guard: Callable[..., Any]) -> None:
        self._hooks = hooks
        self._guard = guard
        self._device = torch.device("cpu")
        self._model: weakref.ref | None = None
        self._sites: list[tuple[weakref.ref, Callable[..., None]]] = []
        self._root_hook: Callable[..., None] | None = None
        self._handles: list[Any] = []
        self._calls: dict[str, int] = {}
        self._samples: dict[str, _Sampled] = {}

    def find(self, model: nn.Module, device: torch.device) -> None:
        """The model's activation sites (at watch time, and after the model changed); values
        are gathered on ``device``."""
        self.set_active(False)
        self._device = device
        self._model = weakref.ref(model)
        ref = weakref.ref(self)

        def on_forward_pre(module: nn.Module, args: Any) -> None:
            sampler = ref()
            if not is_compiling() and sampler is not None:
                sampler._calls.clear()  # a new forward: call sites count from 0 again

        def site_hook(name: str, kind: str) -> Callable[..., None]:
            def on_forward(module: nn.Module, args: Any, out: Any) -> None:
                if is_compiling():
                    return
                sampler = ref()
                if sampler is not None and torch.is_grad_enabled():
                    sampler._guard("torch adapter (_sample_activation)", sampler._sample, name,
                                   kind, out)
            return on_forward

        # The hooks are made once; on and off they are only registered and removed.
        self._root_hook = on_forward_pre
        self._sites = [(weakref.ref(m), site_hook(
                           name, kit.SAMPLED_ACTIVATIONS[ACTIVATION_KINDS[module_type(m)]]))
                       for name, m in model.named_modules()
                       if ACTIVATION_KINDS.get(module_type(m)) in kit.SAMPLED_ACTIVATIONS]

    def set_active(self, active: bool) -> None:
        """Hooks on (the next step samples) or off; called after every step."""
        self._calls.clear()
        if not active or not self._sites:
            if self._handles:
                self._hooks.remove(self._handles)
                self._handles = []
            return
        model = self._model() if self._model is not None else None
        if self._handles or model is None:
            return
        handles = [model.register_forward_pre_hook(self._root_hook)]
        for module_ref, hook in self._sites:
            module = module_ref()
            if module is not None:
                handles.append(module.register_forward_hook(hook))
        self._handles = [self._hooks.add(h) for h in handles]

    def _sample(self, name: str, kind: str, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or out.dim() < 2 or out.numel() == 0:
            return
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        site = name if calls == 0 else f"{name}#{calls}"
        y = out.detach()
        axis = 1 if y.dim() != 3 else 2
        with torch.no_grad():
            if kind == "relu":
                # A ReLU output is >= 0, so a unit is alive iff its sum over the batch (and
                # positions) is > 0: one float reduction, no boolean copy of the activation
                # (about 10x faster on conv outputs than any(y > 0)). NaN counts as not alive.
                value = y.sum(dim=[d for d in range(y.dim()) if d != axis], dtype=torch.float32)
            elif kind == "sigmoid":
                value = ((y * (1 - y)) < 0.25 * kit.SATURATION_DERIVATIVE).sum(
                    dtype=torch.float32)
            else:
                value = ((1 - y * y) < kit.SATURATION_DERIVATIVE).sum(dtype=torch.float32)
        self._samples[site] = _Sampled(kind, value, int(y.shape[axis]), y.numel())

    def take(self) -> tuple[list[kit.ActivationSite], torch.Tensor | None]:
        """The sites sampled since the last check and their values (dead or saturated
        fraction) ``[A]``; cleared for the next one."""
        samples, self._samples = self._samples, {}
        if not samples:
            return [], None
        dev = self._device
        sites = [kit.ActivationSite(site, s.kind, s.units) for site, s in samples.items()]
        relu = [k for k, s in enumerate(samples.values()) if s.kind == "relu"]
        saturating = [k for k, s in enumerate(samples.values()) if s.kind != "relu"]
        listed = list(samples.values())
        values = torch.empty(len(sites), device=dev)
        with torch.no_grad():
            if relu:
                sums = [listed[k].value.to(dev) for k in relu]
                units = torch.tensor([listed[k].units for k in relu], dtype=torch.long)
                segment = torch.repeat_interleave(torch.arange(len(relu)), units).to(dev)
                alive = torch.zeros(len(relu), device=dev).index_add_(
                    0, segment, (torch.cat(sums) > 0).float())
                values.index_copy_(0, torch.tensor(relu, device=dev),
                                   1 - alive / units.to(dev))
            if saturating:
                counts = torch.stack([listed[k].value.to(dev) for k in saturating])
                numel = torch.tensor([float(listed[k].numel) for k in saturating], device=dev)
                values.index_copy_(0, torch.tensor(saturating, device=dev), counts / numel)
        return sites, values

    def clear(self) -> None:
        """Let go of the model and every sample (``remove()`` has taken the hooks)."""
        self._sites, self._handles, self._samples, self._calls = [], [], {}, {}
        self._model = None
