"""Per-step gradient recording: each step's per-tensor gradient norms into a device ring buffer,
and what the check step adds (max |g|, non-zero counts, g . W, the norms the optimizer sees).

It also keeps the two marks that clipping and missed backward passes are told by: the in-place
version counters of the first and last gradient, read at the end of backward and again after
the optimizer step (two tensors read, whatever the model's size).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ._distributed import local
from ._reduce import ReducePlan


class Presence(NamedTuple):
    """Which watched tensors have a gradient, when not all of them do."""

    #: Their positions among the watched tensors, ascending.
    indices: list[int]
    #: The same positions as a device tensor, to scatter per-tensor results into a row.
    index: torch.Tensor
    #: Per watched tensor: whether it has a gradient ``[T]``.
    mask: np.ndarray


class GradMark(NamedTuple):
    """One gradient as it was when read: whose it is, which tensor, its in-place version."""

    #: Position of its parameter among the watched tensors.
    index: int
    #: The gradient tensor (weakly: a mark must not keep a freed gradient alive).
    grad: weakref.ref
    #: Its ``_version`` then; anything that rescales it in place (clipping, unscaling) or
    #: accumulates into it (another backward) moves it on.
    version: int


#: The per-step history (``check_every`` rows of one float32 per tensor) may take this much.
HISTORY_MAX_BYTES = 1 << 30


class GradRecorder:
    """Reads the watched parameters' gradients at the end of each backward pass.

    Args:
        params: The watched parameters, layer by layer.
        window: Rows of the ring buffer (``check_every``).
        device: Where the buffer and per-tensor results live.
        sharded: Some parameter is a DTensor: its local shard is read.
    """

    def __init__(self, params: list[nn.Parameter], window: int, device: torch.device,
                 sharded: bool) -> None:
        self._params = params
        self._device = device
        self._sharded = sharded
        n = len(params)
        if window * n * 4 > HISTORY_MAX_BYTES:
            # Refused by name: the allocation would fail (or take the memory) with no hint.
            raise ValueError(
                f"check_every={window}: the per-step gradient history ({window} steps x {n} "
                f"tensors, {window * n * 4 / 2**30:.1f} GiB on {device}) is too large; use "
                f"check_every <= {HISTORY_MAX_BYTES // (4 * n)}")
        #: Per step slot and tensor: the gradient's L2 norm (0 where there is none) ``[W, T]``.
        self.hist = torch.zeros((window, n), dtype=torch.float32, device=device)
        self._rows = list(self.hist.unbind(0))
        # Per step slot: which tensors had a gradient (True: all, False: none, or a Presence).
        self._had: list[Presence | bool] = [False] * window
        #: A backward pass was recorded since the last optimizer step.
        self.seen = False
        #: First and last gradient at the last read (for clipping), then after the last step
        #: (``stamp``, for backward passes that nothing told about).
        self.marks: tuple[GradMark, GradMark] | None = None
        self.stamp: tuple[GradMark, ...] | None = None
        #: Check-step extras, per tensor: max |g| and non-zero counts ``[2, T]``; g . W and
        #: ||W|| before the update ``[2, T]`` (NaN where not measured); the gradients' norms at
        #: the optimizer's pre-step ``[T]``.
        self.extra: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None
        self.pre: torch.Tensor | None = None
        #: The check step's pre-step compared the optimizer's gradients with the backward's.
        self.compared = False
        self._presence: Presence | None = None
        self._plans: dict[tuple[int, ...] | None, ReducePlan] = {}
        # The check step's gradients as its backward left them, and their versions.
        self._read: tuple[list[torch.Tensor], list[int]] | None = None

    def grads(self) -> list[Any]:
        """The parameters' gradients (a sharded gradient's local shard)."""
        if self._sharded:
            return [local(p.grad) for p in self._params]
        return [p.grad for p in self._params]

    def _presence_of(self, grads: list[Any]) -> Presence | None:
        """``None`` when every tensor has a gradient (the usual case). Cached: the set of tensors
        with gradients rarely changes."""
        for g in grads:
            if g is None:
                break
        else:
            return None
        indices = [i for i, g in enumerate(grads) if g is not None]
        cached = self._presence
        if cached is not None and cached.indices == indices:
            return cached
        mask = np.zeros(len(grads), dtype=bool)
        mask[indices] = True
        self._presence = Presence(indices, torch.tensor(indices, dtype=torch.long,
                                                        device=self._device), mask)
        return self._presence

    def _plan(self, tensors: list[torch.Tensor], presence: Presence | None) -> ReducePlan:
        key = None if presence is None else tuple(presence.indices)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4:
                self._plans.clear()
            plan = self._plans[key] = ReducePlan(tensors, self._device)
        return plan

    def _scatter(self, values: torch.Tensor, presence: Presence | None, fill: float,
                 rows: int = 0) -> torch.Tensor:
        """Per-present-tensor values laid out over every tensor (``fill`` where absent)."""
        if presence is None:
            return values
        shape = (rows, len(self._params)) if rows else (len(self._params),)
        out = torch.full(shape, fill, dtype=torch.float32, device=self._device)
        out.index_copy_(out.dim() - 1, presence.index, values)
        return out

    def _present(self) -> tuple[list[torch.Tensor], Presence | None] | None:
        grads = self.grads()
        presence = self._presence_of(grads)
        if presence is None:
            return (grads, None) if grads else None
        if not presence.indices:
            return None
        return [grads[i] for i in presence.indices], presence

    # -- every backward -------------------------------------------------------------------------

    def no_gradient(self, slot: int) -> None:
        """The step of ``slot`` had no backward pass."""
        self._had[slot] = False

    def had_grad(self) -> np.ndarray:
        """Per step slot and tensor: whether it had a gradient ``[W, T]``."""
        out = np.zeros((len(self._had), len(self._params)), dtype=bool)
        for slot, had in enumerate(self._had):
            out[slot] = had.mask if isinstance(had, Presence) else had
        return out

    def record(self, slot: int, check_next: bool, detail_next: bool) -> bool:
        """Read the gradients into row ``slot``; on the backward of a check step also g . W
        (and on detail steps max |g| and non-zero counts). False when no tensor has one."""
        if torch.is_grad_enabled():  # a create_graph backward: measuring must not join its graph
            with torch.no_grad():
                return self._record(slot, check_next, detail_next)
        return self._record(slot, check_next, detail_next)

    def _record(self, slot: int, check_next: bool, detail_next: bool) -> bool:
        found = self._present()
        if found is None:
            self._had[slot] = False
            return False
        present, presence = found
        plan = self._plan(present, presence)
        copies = plan.copies(present)
        if presence is None:
            plan.norms(present, out=self._rows[slot], copies=copies)
            self._had[slot] = True
        else:
            self._rows[slot].zero_().index_copy_(0, presence.index,
                                                 plan.norms(present, copies=copies))
            self._had[slot] = presence
        self.seen = True
        self.marks = self._mark(present, presence)
        if check_next:
            self._read = (present, [g._version for g in present])
            self.dots = self._dots(plan, present, presence, copies)
            if detail_next:
                extra = torch.stack([plan.max_abs(present, copies),
                                     plan.norms(present, 0, copies=copies)])
                self.extra = self._scatter(extra, presence, 0.0, rows=2)
        return True

    def _dots(self, plan: ReducePlan, grads: list[torch.Tensor], presence: Presence | None,
              copies: list[torch.Tensor]) -> torch.Tensor | None:
        """g . W and ||W|| per tensor, W as the gradient saw it (before the update): the
        gradient's component along its own weights is an L2 penalty's pull, not a data
        gradient."""
        if self._sharded:
            return None  # a shard's dot product would need its own all-reduce
        weights = (self._params if presence is None
                   else [self._params[i] for i in presence.indices])
        weight_copies = plan.copies(weights)
        both = torch.stack([plan.dots(grads, weights, copies, weight_copies),
                            plan.norms(weights, copies=weight_copies)])
        return self._scatter(both, presence, math.nan, rows=2)

    @staticmethod
    def _mark(grads: list[torch.Tensor],
              presence: Presence | None) -> tuple[GradMark, GradMark] | None:
        first, last = (0, len(grads) - 1) if presence is None else (presence.indices[0],
                                                                    presence.indices[-1])
        a, b = grads[0], grads[-1]
        if a.is_sparse or b.is_sparse:
            return None
        return (GradMark(first, weakref.ref(a), a._version),
                GradMark(last, weakref.ref(b), b._version))

    # -- around the optimizer step --------------------------------------------------------------

    def pre_step(self) -> None:
        """The norms of the gradients the optimizer is about to apply (after any clipping):
        not measured again when they are, tensor for tensor and version for version, what the
        check step's backward left (the usual case: nothing to compare)."""
        read, self._read = self._read, None
        found = self._present()
        if found is None:
            return
        self.compared = True  # the check can tell whether clipping acted at this step
        present, presence = found
        if read is not None and len(read[0]) == len(present) and all(
                a is b and a._version == v for a, b, v in zip(present, *read)):
            return
        with torch.no_grad():
            norms = self._plan(present, presence).norms(present)
        self.pre = self._scatter(norms, presence, 0.0)

    def _grad(self, index: int) -> Any:
        g = self._params[index].grad
        return local(g) if g is not None and self._sharded else g

    def clipped(self, scaled: bool) -> bool:
        """At the end of a step: were the gradients rescaled in place after the backward?
        ``clip_grad_norm_`` multiplies every gradient even when it need not clip; GradScaler's
        unscale is one rescale of its own (``scaled``); more is clipping."""
        marks, self.marks = self.marks, None
        if marks is None:
            return False
        first, last = marks
        a, b = self._grad(first.index), self._grad(last.index)
        # After the step: the state that a backward nothing told about would change.
        self.stamp = tuple(GradMark(m.index, weakref.ref(g), g._version)
                           for m, g in ((first, a), (last, b)) if g is not None)
        if a is None or b is None or a is not first.grad() or b is not last.grad():
            return False  # replaced, not rescaled: nothing to tell
        return min(a._version - first.version, b._version - last.version) > (1 if scaled else 0)

    def missed(self, hooked: list[nn.Parameter]) -> bool:
        """At an optimizer step with no backward read since the last one: did the gradients
        of the ``hooked`` parameters change all the same (a backward pass that did not go
        through the model's output)?"""
        looked = False
        for mark in self.stamp or ():
            g = self._grad(mark.index)
            if g is None:
                continue
            looked = True
            if g is not mark.grad() or g._version != mark.version:
                return True
        return not looked and any(p.grad is not None for p in hooked)

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The check step's extras, dots and pre-step norms; cleared for the next check."""
        out = (self.extra, self.dots, self.pre)
        self.extra = self.dots = self.pre = self._read = None
        return out

    def clear(self) -> None:
        """Drop every tensor held (``remove()``), the per-step history too: the report needs
        none of it, and a removed watcher kept for its report must not hold device memory."""
        self._params = []
        self.hist = torch.zeros((0, 0), dtype=torch.float32, device=self._device)
        self._rows = []
        self._had = []
        self.extra = self.dots = self.pre = None
        self.marks = self.stamp = self._read = None
        self._presence = None
        self._plans = {}
