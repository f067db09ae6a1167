"""What gradwatch knows of a torch model: its layers, its activation and normalisation kinds, and
the optimizer's learning rates; read once at watch time (and again when the model changes)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from gradwatch import kit

from ._distributed import local, module_type

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
_RESIDUAL_HINTS = ("residual", "resblock", "basicblock", "bottleneck", "skip", "shortcut")
# Activation modules of other libraries (transformers' GELUActivation, NewGELUActivation,
# QuickGELUActivation, ...), by what their class name says.
_ACTIVATION_NAMES = (("gelu", "gelu"), ("silu", "silu"), ("swish", "silu"), ("mish", "mish"),
                     ("relu", "relu"), ("sigmoid", "sigmoid"), ("tanh", "tanh"))


def activation_kind(module: nn.Module) -> str | None:
    cls = module_type(module)
    kind = ACTIVATION_KINDS.get(cls)
    if kind is None and not any(True for _ in module.parameters(recurse=False)):
        low = cls.__name__.lower()
        if "activation" in low or low.endswith(("gelu", "silu", "swish")):
            kind = next((k for hint, k in _ACTIVATION_NAMES if hint in low), None)
    return kind


@dataclasses.dataclass
class Layer:
    """A watched layer: a module that owns parameters directly."""

    #: Its ``named_modules()`` name (``"(root)"`` for the model itself).
    name: str
    #: The user's class name (``"Linear"``).
    module_type: str
    #: The parameters it owns, shared ones only in the first layer that owns them.
    params: list[nn.Parameter]
    recurrent: bool = False


def collect_layers(model: nn.Module) -> list[Layer]:
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        own = []
        for p in module.parameters(recurse=False):
            if id(p) not in seen:  # tied/shared parameters count once
                seen.add(id(p))
                own.append(p)
        if own:
            layers.append(Layer(name or "(root)", module_type(module).__name__, own,
                                isinstance(module, RECURRENT)))
    return layers


def layer_infos(layers: list[Layer]) -> tuple[kit.LayerInfo, ...]:
    weights = [next((p for p in layer.params if p.dim() >= 2), None) for layer in layers]
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
        kit.LayerInfo(name=layer.name, type=layer.module_type,
                      num_params=sum(p.numel() for p in layer.params), init_gain=gain,
                      recurrent=layer.recurrent, matrix=w is not None)
        for layer, gain, w in zip(layers, gains, weights))


def model_info(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> kit.ModelInfo:
    acts: dict[str, int] = {}
    norms = set()
    residual = False
    recurrent = False
    depth = 0
    for name, m in model.named_modules():
        cls = module_type(m)
        kind = activation_kind(m)
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
    return kit.ModelInfo(
        framework="torch", activations=frozenset(acts), activation_counts=acts,
        normalization=frozenset(norms),
        depth=depth, residual=True if residual else None, recurrent=recurrent,
        learning_rates=learning_rates(optimizer),
        optimizer=type(optimizer).__name__ if optimizer is not None else None,
    )


def learning_rates(optimizer: torch.optim.Optimizer | None) -> tuple[float, ...]:
    if optimizer is None:
        return ()
    lrs = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if isinstance(lr, (int, float)):
            lrs.append(float(lr))
        # A tensor learning rate would need a host sync to read; advice goes without it.
    return tuple(lrs)


def real_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The ``torch.optim.Optimizer`` behind a known wrapper, checked: accelerate's
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
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got "
                        f"{type(optimizer).__name__}")
    if optimizer is not None and not hasattr(optimizer, "_optimizer_step_pre_hooks"):
        raise TypeError(
            f"optimizer: a {type(optimizer).__module__}.{type(optimizer).__qualname__} "
            "subclasses torch.optim.Optimizer without running Optimizer.__init__, so it "
            "takes no step hooks; pass the optimizer it wraps (gradwatch looks through "
            "accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer itself)")
    return optimizer
