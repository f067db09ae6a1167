"""Notices that the model or the optimizer changed after ``watch()``: unfrozen parameters, replaced
or added modules, optimizer tensors that are not the model's. Cheap by construction: after each
check the optimizer's parameter count is compared with the last one; the model's parameters are
rescanned when it changed, or every ``RESCAN_EVERY`` checks otherwise."""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import nn

from gradwatch import kit

from ._model import Layer, collect_layers

#: Checks between full rescans of the model's parameters (a changed optimizer parameter count
#: triggers one at once): a replaced module is found within this many checks.
RESCAN_EVERY = 10


def optimizer_tensors(optimizer: Any) -> int:
    if optimizer is None:
        return 0
    return sum(len(group["params"]) for group in optimizer.param_groups)


def outside_tensors(model: nn.Module, optimizer: Any) -> int:
    """How many of the optimizer's tensors are not parameters of the model."""
    if optimizer is None:
        return 0
    mine = {id(p) for p in model.parameters()}
    return sum(1 for group in optimizer.param_groups for p in group["params"] if id(p) not in mine)


class RescanSchedule:
    """When to rescan: the optimizer's tensor count changed, or ``RESCAN_EVERY`` checks
    passed."""

    def __init__(self, optimizer: Any) -> None:
        self._count = optimizer_tensors(optimizer)
        self._checks = 0

    def due(self, optimizer: Any) -> bool:
        """After a check."""
        self._checks += 1
        count = optimizer_tensors(optimizer)
        if count == self._count and self._checks < RESCAN_EVERY:
            return False
        self._count, self._checks = count, 0
        return True


def layer_changes(before: list[Layer], now: list[Layer]) -> list[str] | None:
    """What differs between two layer lists, for the log (``None``: the same layers)."""
    old = {layer.name: [id(p) for p in layer.params] for layer in before}
    new = {layer.name: [id(p) for p in layer.params] for layer in now}
    if list(old.items()) == list(new.items()):
        return None
    added = [name for name in new if name not in old]
    removed = [name for name in old if name not in new]
    changed = [name for name in new if name in old and new[name] != old[name]]
    changes = []
    for label, names in (("added", added), ("replaced", changed), ("removed", removed)):
        if names:
            shown = ", ".join(f"'{kit.plain(x)}'" for x in names[:5])
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            changes.append(f"layers {label}: {shown}{more}")
    return changes


class Changes(NamedTuple):
    """What a rescan found."""

    #: The new layer list, when layers were added, replaced or removed (else ``None``).
    layers: list[Layer] | None
    #: Same layers, but other tensors take gradients now (unfrozen or frozen).
    rehook: bool
    #: Optimizer tensors that are not parameters of the model.
    outside: int
    #: What changed, for the log (empty: nothing to say).
    messages: list[str]


def rescan(model: nn.Module, layers: list[Layer], hooked: set[int], outside: int,
           optimizer: Any) -> Changes:
    """Compare the model and the optimizer with what is watched: ``layers``, the ``hooked``
    parameters (ids) and the ``outside`` count seen last."""
    now = collect_layers(model)
    changed = layer_changes(layers, now)
    messages = list(changed or ())
    taking = {id(p) for layer in layers for p in layer.params if p.requires_grad}
    # Only a tensor that takes gradients unhooked calls for new hooks: one frozen since keeps
    # its hook, which never fires. Lightning's toggle_optimizer freezes the other optimizers'
    # parameters during each optimizer's step, where the check runs; unhooking them there
    # would miss every backward pass of the other optimizers from then on.
    rehook = changed is None and not taking <= hooked
    if rehook:
        messages.append(f"tensors with gradients: {len(hooked)} -> {len(taking)}")
    count = outside_tensors(model, optimizer)
    if count != outside and count:
        messages.append(f"the optimizer holds {count} tensor(s) that are not parameters of "
                        f"the model; they are not watched")
    return Changes(now if changed is not None else None, rehook, count, messages)
