"""The watched parameter tensors and what is measured of each on the device: their gradients
every step (``_recorder``), their norms and sampled updates on check steps (``_samples``), summed
over the ranks when they are sharded. Built from the layer list, at watch time and again when the
model changes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from gradwatch import kit

from ._distributed import is_sharded, local, replication, sum_over_ranks
from ._model import Layer
from ._readout import Measured
from ._recorder import GradRecorder
from ._reduce import ReducePlan
from ._samples import UpdateSamples


class WatchedTensors:
    """Args:
        layers: The watched layers.
        window: Steps per check (``check_every``).
        update_ratio: ``"sampled"``, ``"exact"`` or ``"off"``.
        sample_fraction: Fraction of elements sampled per tensor.
        world_size: Ranks of the default process group (for sharded tensors).
    """

    def __init__(self, layers: list[Layer], window: int, update_ratio: str,
                 sample_fraction: float, world_size: int) -> None:
        #: The parameters, layer by layer.
        self.params = [p for layer in layers for p in layer.params]
        params = self.params
        #: Some parameter is a DTensor (FSDP2): shards are measured, then summed over ranks.
        self.sharded = any(is_sharded(p) for p in params)
        self.device = params[0].device if params else torch.device("cpu")
        self.recorder = GradRecorder(params, window, self.device, self.sharded)
        weights = self.weights()
        self._plan = ReducePlan(weights, self.device)
        self.samples = None
        scale = None
        if update_ratio != "off" and params:
            self.samples = UpdateSamples(weights, self._plan, sample_fraction,
                                         update_ratio == "exact")
            scale = self.samples.scale
        self._world = world_size
        self._rep = self._sample_rep = None
        if self.sharded:
            # 1 / how many ranks hold each element, so that the sum of the ranks' squares
            # counts every element once; samples are rescaled to their shard before the sum.
            self._rep = torch.tensor([1 / replication(p, world_size) for p in params],
                                     dtype=torch.float32, device=self.device)
            if scale is not None:
                self._sample_rep = torch.tensor(scale, dtype=torch.float32,
                                                device=self.device) * self._rep
                scale = None
        counts = [len(layer.params) for layer in layers]
        #: Which layer each tensor belongs to, for the core's per-layer sums.
        self.layout = kit.TensorLayout([layer.name for layer in layers],
                                       np.repeat(np.arange(len(counts)), counts),
                                       [p.numel() for p in params], scale)

    def weights(self) -> list[Any]:
        """The parameters as they are measured (a sharded one's local shard)."""
        if self.sharded:
            return [local(p.detach()) for p in self.params]
        return self.params

    def snapshot(self) -> None:
        """Before the optimizer step of a check step: the weights the update starts from."""
        if self.samples is not None:
            self.samples.snapshot(self.weights())

    def measure(self, rank: int, detail: bool) -> Measured:
        """After the check step: what the window and the step measured, every rank's summed
        when sharded (``detail``: this check measures max |g|)."""
        extra, dots, pre = self.recorder.take()
        with torch.no_grad():
            measured = Measured(
                hist=self.recorder.hist, pre=pre,
                grad_max=extra[0] if extra is not None else None,
                grad_nonzero=extra[1] if extra is not None else None,
                grad_dot=dots[0] if dots is not None else None,
                weight_before=dots[1] if dots is not None else None)
            if self.params:
                weights = self.weights()
                copies = self._plan.copies(weights)
                measured.weight = self._plan.norms(weights, copies=copies)
                if self.samples is not None:
                    measured.change, measured.update, measured.before = \
                        self.samples.measure(weights, copies)
                    measured.start = self.samples.w0_norm
            if self.sharded:
                assert self._rep is not None
                measured = sum_over_ranks(measured, self._rep, self._sample_rep, self._world,
                                          rank, detail)
        return measured

    def held_bytes(self) -> int:
        """Bytes held on the device between steps: start-of-run samples, per-step history."""
        hist = self.recorder.hist
        held = self.samples.held_bytes() if self.samples is not None else 0
        return held + hist.numel() * hist.element_size()

    def clear(self) -> None:
        """Let go of every tensor of the model's (``remove()``)."""
        self.params = []
        self.recorder.clear()
        if self.samples is not None:
            self.samples.clear()


def unmeasured_updates(record: kit.CheckRecord, params: list[torch.Tensor],
                       stepping: torch.optim.Optimizer | None) -> kit.CheckRecord:
    """``record`` with the update ratio of the tensors ``stepping`` does not hold left
    unmeasured (NaN): with several optimizers taking turns, the others' parameters did not move
    in the check step, and a ratio of 0 would read as stalled weights."""
    if stepping is None or record.update_sq is None:
        return record
    held = {id(p) for group in stepping.param_groups for p in group["params"]}
    idle = np.array([id(p) not in held for p in params], dtype=bool)
    if not idle.any():
        return record
    return dataclasses.replace(record, update_sq=np.where(idle, math.nan, record.update_sq),
                               update_base_sq=np.where(idle, math.nan, record.update_base_sq))
