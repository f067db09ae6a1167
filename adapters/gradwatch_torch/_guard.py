"""``guard="skip"``: an optimizer step whose gradients are not finite is not applied.

The guard takes the optimizer's ``step`` (an attribute of the instance, in front of the class's
own, so every caller goes through it: the user's loop, ``GradScaler.step``, Lightning's and
accelerate's wrappers). Before the real step it reads whether every gradient is finite, one
host synchronisation, the trade ``torch.amp.GradScaler`` makes for the same reason. If any is not
finite, the real ``step`` is not called: the parameters and the optimizer state (momentum, Adam's
moments, step counters) stay exactly as they were, and the watcher is told which layers were
bad. A GradScaler that found an overflow skips the step before it reaches the guard, so its own
skips are never counted twice.

A closure (``optimizer.step(closure)``, as Lightning passes one under automatic optimization)
is run first, once, so that its backward pass has produced the gradients to check; the real
step then gets a closure that returns that loss. LBFGS, which evaluates its closure many times
in one step, cannot be guarded like that and is refused.

Under ``torch.distributed`` every rank must skip the same step: the flag is all-reduced (MAX)
across the ranks, so a non-finite shard on one rank (FSDP2) skips the step everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gradwatch import kit

from ._distributed import local


def check_guard(guard: Any, optimizer: torch.optim.Optimizer | None) -> str:
    """``guard`` validated, and against the optimizer (a ValueError names it)."""
    value = kit.guard_mode(guard)
    if value == "skip":
        if optimizer is None:
            raise ValueError("guard='skip' needs the optimizer: pass optimizer= to watch() "
                             "(the guard decides whether its step() runs)")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("guard='skip' does not support LBFGS: its step() evaluates the "
                             "closure many times, so the gradients cannot be checked before "
                             "the step")
    return value


class StepGuard:
    """Wraps ``optimizer.step`` for as long as the watcher is attached (``remove()``).

    Args:
        optimizer: The real ``torch.optim.Optimizer``.
        tensors: Returns the watched parameters and, for each, the index of its layer (read at
            every step: the watcher rebuilds its tensor list when the model changes).
        norms: Returns the per-tensor gradient norms of the step in progress if the watcher
            has recorded them (a device tensor), else ``None``.
        skipped: Called with the sorted indices of the layers whose gradients were not finite,
            when a step is skipped.
        distributed: All-reduce the flag across the ranks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 tensors: Callable[[], tuple[Sequence[torch.Tensor], Sequence[int]]],
                 skipped: Callable[[list[int]], None], *, distributed: bool = False,
                 norms: Callable[[], torch.Tensor | None] = lambda: None) -> None:
        self.optimizer = optimizer
        self.tensors = tensors
        self.norms = norms
        self.skipped = skipped
        self.distributed = distributed
        had = "step" in vars(optimizer)
        self._previous = vars(optimizer)["step"] if had else None
        self._real = optimizer.step  # bound: the class's step, with its hooks
        optimizer.step = self.step  # type: ignore[method-assign]

    def verdict(self) -> tuple[bool, list[int]]:
        """Whether to skip the step, and the indices (into the watched tensors) of this rank's
        tensors whose gradient is not finite (empty when only another rank's were).

        The common case costs a few tiny ops and the one sync: the watcher's recorder has
        already written this step's per-tensor gradient norms (at the end of the backward), and
        a non-finite gradient has a non-finite norm. Only when a norm is not finite are the
        gradients read tensor by tensor, since a float32 norm can also overflow on finite ones.
        """
        params, _ = self.tensors()
        norms = self.norms()
        with torch.no_grad():
            if norms is not None:
                flag = (~torch.isfinite(norms)).any().to(torch.float32)
            else:
                flag, _ = self._exact(params)
            if not bool(self._reduce(flag).item()):  # the step's one synchronisation
                return False, []
            exact, bad = self._exact(params)
            if norms is not None and not bool(self._reduce(exact).item()):
                return False, []  # an overflowing norm of finite gradients: not bad
            return True, bad

    def _exact(self, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        """Tensor by tensor: the flag, and (on the host) which are not finite."""
        # a sharded (DTensor) gradient: this rank's shard; the all-reduce covers the rest
        found = [(i, local(p.grad)) for i, p in enumerate(params)
                 if p.grad is not None and not p.grad.is_sparse]
        if not found:
            return torch.zeros(()), []
        finite = torch.stack([torch.isfinite(g).all() for _, g in found]).cpu()
        bad = [i for (i, _), ok in zip(found, finite.tolist()) if not ok]
        return torch.tensor(float(bool(bad))), bad

    def _reduce(self, flag: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            flag = flag.clone()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def step(self, *args: Any, **kwargs: Any) -> Any:
        closure = kwargs.pop("closure", None)
        if closure is None and args:
            closure, args = args[0], args[1:]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip, bad = self.verdict()
        if skip:
            _, layer_of = self.tensors()
            self.skipped(sorted({int(layer_of[i]) for i in bad}))
            return loss
        if closure is not None:
            return self._real(*args, closure=lambda: loss, **kwargs)
        return self._real(*args, **kwargs)

    def remove(self) -> None:
        """Give the optimizer its ``step`` back."""
        if vars(self.optimizer).get("step") == self.step:
            if self._previous is not None:
                self.optimizer.step = self._previous  # type: ignore[method-assign]
            else:
                del self.optimizer.step


def guard_steps(ref: Any, optimizer: torch.optim.Optimizer, distributed: bool) -> StepGuard:
    """A guard on ``optimizer`` for the watcher behind the weak reference ``ref``: it checks
    the watcher's current tensors and tells it (``_on_skipped``, guarded by its monitor) which
    layers were bad; once the watcher is gone it checks nothing."""

    def tensors() -> tuple[Sequence[torch.Tensor], Sequence[int]]:
        watcher = ref()
        if watcher is None:
            return [], []
        return watcher._tensors.params, watcher._tensors.layout.tensor_layer

    def skipped(layers: list[int]) -> None:
        watcher = ref()
        if watcher is not None:
            watcher.monitor.guard("torch adapter (guard)", watcher._on_skipped, layers)

    def norms() -> torch.Tensor | None:
        watcher = ref()
        if watcher is None or not watcher._tensors.recorder.seen:
            return None  # no backward recorded since the last step: read the gradients
        return watcher._tensors.recorder.hist[watcher._step % watcher._window.size]

    return StepGuard(optimizer, tensors, skipped, distributed=distributed, norms=norms)
