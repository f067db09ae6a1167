"""The check: what the device measured since the last one, moved to the host in one transfer and
handed to the core as a ``kit.CheckRecord`` (the core turns it into per-layer StepStats)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np
import torch

from gradwatch import kit


@dataclasses.dataclass
class Measured:
    """What one check measured on the device, per watched tensor ``[T]`` (float32 norms unless
    said otherwise); ``None`` where not measured at this check."""

    #: Each step slot's gradient norms ``[W, T]``.
    hist: torch.Tensor
    #: max |g| and non-zero gradient elements, at the check step (detail steps).
    grad_max: torch.Tensor | None = None
    grad_nonzero: torch.Tensor | None = None
    #: The gradients as the optimizer's pre-step hook saw them (after any clipping).
    pre: torch.Tensor | None = None
    #: g . W and ||W|| with W before the update, at the check step's backward.
    grad_dot: torch.Tensor | None = None
    weight_before: torch.Tensor | None = None
    #: ||W|| after the check step.
    weight: torch.Tensor | None = None
    #: Sampled ||W - W_start||, ||W - W_before||, ||W_before|| and ||W_start||.
    change: torch.Tensor | None = None
    update: torch.Tensor | None = None
    before: torch.Tensor | None = None
    start: torch.Tensor | None = None


class StepWindow:
    """The optimizer steps since the last check, slot by slot (slot = (step - 1) % window):
    their numbers, losses and loss-scale inverses."""

    def __init__(self, size: int) -> None:
        self.size = size
        #: Steps completed since the last check, oldest first.
        self.steps: list[int] = []
        #: Per slot: the step's loss (a float, a tensor, a list of micro-batch losses, None).
        self.loss: list[Any] = [None] * size
        #: Per slot: 1 / the AMP loss scale of that step's gradients (None: 1).
        self.inv_scale: list[torch.Tensor | None] = [None] * size
        #: Per slot: the batch the step trained on, as the user named it (absent: not given).
        self.batch: dict[int, Any] = {}
        self._pending: list[Any] = []
        self._pending_batch: list[Any] = []

    @property
    def pending_batch(self) -> Any:
        """The batch of the step in progress (several micro-batches: a tuple), or None."""
        ids = self._pending_batch
        return None if not ids else ids[0] if len(ids) == 1 else tuple(ids)

    def observe(self, loss: Any, batch_id: Any = None) -> None:
        """A loss of the step in progress, a scalar tensor or a float (several: micro-batches,
        averaged at the check). A tensor is read at the next check, with everything else.
        ``batch_id``: an int or a string naming the batch, kept for the window a warning
        reports."""
        if batch_id is not None:
            if (not isinstance(batch_id, (int, str)) or isinstance(batch_id, bool)
                    or (isinstance(batch_id, str) and len(batch_id) > 200)):
                raise TypeError(f"observe_loss: batch_id must be an int or a string of at most "
                                f"200 characters (or None), got {type(batch_id).__name__}")
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(f"observe_loss: loss must be a scalar, got shape "
                                 f"{tuple(loss.shape)}")
            self._pending.append(loss.detach())
        elif isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self._pending.append(float(loss))
        else:
            raise TypeError(f"observe_loss: loss must be a tensor or a float, got "
                            f"{type(loss).__name__}")
        if batch_id is not None:
            self._pending_batch.append(batch_id)

    def commit(self, step: int) -> None:
        """Step ``step`` completed: its slot gets the losses observed during it."""
        pending, self._pending = self._pending, []
        slot = (step - 1) % self.size
        self.loss[slot] = (pending[0] if len(pending) == 1 else pending or None)
        if self._pending_batch or self.batch:
            self.batch[slot] = self.pending_batch
        self._pending_batch = []
        self.steps.append(step)

    def clear_losses(self) -> None:
        self._pending = []
        self._pending_batch = []
        self.loss = [None] * self.size
        self.batch = {}

    def drop_pending(self) -> None:
        """Forget the losses observed in a step that never completed (the GradScaler skipped it)."""
        self._pending = []
        self._pending_batch = []

    def reset(self) -> None:
        """After a check: a new window."""
        self.steps = []
        self.inv_scale = [None] * self.size


class Totals(NamedTuple):
    """The check step's whole-model gradient norm at the end of backward (unscaled) and at the
    optimizer's pre-step."""

    backward: float
    pre_step: float

    @property
    def clipped(self) -> bool:
        """The optimizer got smaller gradients than the backward left: the user clips."""
        return (math.isfinite(self.backward) and math.isfinite(self.pre_step)
                and self.backward > 0 and self.pre_step < 0.999 * self.backward)


class Transfer:
    """Device tensors gathered for the check's one device-to-host copy."""

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._parts: list[tuple[str, torch.Tensor, tuple[int, ...]]] = []

    def add(self, name: str, tensor: torch.Tensor | None) -> None:
        if tensor is None:
            return
        flat = tensor.reshape(-1)
        if flat.dtype is not torch.float32:
            flat = flat.float()
        if flat.device != self._device:
            flat = flat.to(self._device)
        self._parts.append((name, flat, tuple(tensor.shape)))

    def fetch(self) -> dict[str, np.ndarray]:
        """Every part, by name, as float64 arrays of its shape: one transfer."""
        if not self._parts:
            return {}
        host = torch.cat([t for _, t, _ in self._parts]).cpu().numpy().astype(float)
        out, pos = {}, 0
        for name, t, shape in self._parts:
            out[name] = host[pos:pos + t.numel()].reshape(shape)
            pos += t.numel()
        return out


def _loss_tensors(window: StepWindow, device: torch.device) -> tuple[torch.Tensor | None,
                                                                     dict[int, int],
                                                                     dict[int, float]]:
    """Slot losses: the tensors to transfer (and which slot each is), and the floats."""
    tensors, where, floats = [], {}, {}
    for slot, value in enumerate(window.loss):
        if isinstance(value, list):
            value = torch.stack([_scalar(x, device) for x in value]).mean()
        if isinstance(value, torch.Tensor):
            where[slot] = len(tensors)
            tensors.append(_scalar(value, device))
        elif value is not None:
            floats[slot] = float(value)
    return (torch.stack(tensors) if tensors else None), where, floats


def _scalar(x: Any, device: torch.device) -> torch.Tensor:
    """A loss as a float32 0-d tensor on ``device``."""
    if not isinstance(x, torch.Tensor):
        return torch.tensor(float(x), device=device)
    if x.dim():
        x = x.reshape(())
    if x.dtype is not torch.float32:
        x = x.float()
    return x if x.device == device else x.to(device)


def _square(x: np.ndarray | None) -> np.ndarray | None:
    return None if x is None else x * x


def read(measured: Measured, window: StepWindow, has_grad: np.ndarray,
         activations: tuple[list[kit.ActivationSite], torch.Tensor | None],
         device: torch.device) -> tuple[kit.CheckRecord, Totals]:
    """Move one check's measurements to the host (one transfer) and make its record."""
    size = window.size
    transfer = Transfer(device)
    for field in dataclasses.fields(Measured):
        transfer.add(field.name, getattr(measured, field.name))
    inv = window.inv_scale
    if any(s is not None for s in inv):
        transfer.add("inv", torch.stack([s.to(device).reshape(()) if s is not None else
                                         torch.ones((), device=device) for s in inv]))
    sites, values = activations
    transfer.add("activations", values)
    losses, loss_slot, loss_floats = _loss_tensors(window, device)
    transfer.add("loss", losses)
    with np.errstate(over="ignore", invalid="ignore"):
        host = transfer.fetch()
        scale = host.get("inv", np.ones(size))
        loss = np.full(size, math.nan)
        has_loss = np.zeros(size, dtype=bool)
        for slot, k in loss_slot.items():
            loss[slot], has_loss[slot] = host["loss"][k], True
        for slot, value in loss_floats.items():
            loss[slot], has_loss[slot] = value, True
        # Rows in step order: the window's slots are step-1 modulo the window.
        steps = np.array(window.steps, dtype=np.int64)
        slots = (steps - 1) % size
        sq = host["hist"] * host["hist"]
        last = slots[-1]
        totals = Totals(math.sqrt(sq[last].sum()) * scale[last] if sq.shape[1] else math.nan,
                        math.sqrt(np.square(host["pre"]).sum()) if "pre" in host else math.nan)
        dot = host.get("grad_dot")
        update, before = _square(host.get("update")), _square(host.get("before"))
        if update is None and "change" in host:  # no snapshot (no optimizer step): no ratio
            update = before = np.full(sq.shape[1], math.nan)
        record = kit.CheckRecord(
            steps=steps, grad_sq=sq[slots], has_grad=has_grad[slots].copy(), loss=loss[slots],
            has_loss=has_loss[slots], grad_scale=scale[slots], grad_max=host.get("grad_max"),
            grad_nonzero=host.get("grad_nonzero"),
            grad_dot=dot if dot is not None and np.isfinite(dot).any() else None,
            weight_sq_before=_square(host.get("weight_before")),
            weight_sq=_square(host.get("weight")),
            update_sq=update, update_base_sq=before,
            change_sq=_square(host.get("change")), change_base_sq=_square(host.get("start")),
            activation_sites=sites, activation_values=host.get("activations", ()),
            batch_ids=[window.batch.get(int(slot)) for slot in slots] if window.batch else None,
        )
    return record, totals
