"""Eager mode (the PyTorch backend, ``run_eagerly=True``): per-step numbers kept on the device.

Each step writes its gradient norms into a ring of rows and keeps its loss; check steps also
keep max |g|, g . W and the weights' norms before the update, and after it the weight norms and
the sampled update and change sizes. A host counter gates the work; the check's one transfer
reads them all (:func:`._readout.eager_record`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._plan import StepPlan


class EagerRow(NamedTuple):
    """One step, as the host knows it (its gradient norms are in the ring of rows)."""

    #: The optimizer's step number.
    step: int
    #: Positions of the variables that had a gradient.
    present: tuple[int, ...]
    #: The batch loss (a device scalar), or None when none was seen.
    loss: Any = None


class EagerCheck(NamedTuple):
    """A check step's numbers, on the device."""

    step: int
    present: tuple[int, ...]
    #: max |g|, g . W and ||W|| (before the update) of the present variables, one vector.
    grads: Any
    #: ||W|| per variable after the update; with update ratios on also the sampled ||dW||,
    #: ||W_before|| and ||W - W_start|| per variable; one vector.
    weights: Any


class Pending(NamedTuple):
    """What the wrapped ``apply`` hands from before the update to after it."""

    row: EagerRow
    #: ``EagerCheck.grads`` on a check step, else None.
    grads: Any = None
    #: The weight samples before the update (one vector), on check steps with update ratios.
    snapshot: Any = None


class EagerRecorder:
    """Keeps the steps of an eager train function (the activation sampler is told when a step
    ran)."""

    def __init__(self, plan: StepPlan) -> None:
        self._plan = plan
        self._ops, self._vars, self._samples = plan.ops, plan.variables, plan.samples
        self._all = tuple(range(len(plan.variables)))
        #: Gradient norms of the kept steps, by ``step % window``.
        self.window = plan.window
        self.norms = plan.ops.norm_rows(plan.window, len(plan.variables))
        #: The last step taken.
        self.step = plan.start
        #: Steps kept, by ``step % window``.
        self.rows: dict[int, EagerRow] = {}
        #: The last check step's numbers, until read.
        self.check: EagerCheck | None = None
        #: The loss of the step running now.
        self.loss: Any = None

    def before(self, grads: dict[int, Any], rows: dict[int, Any]) -> Pending | None:
        """Gradient norms of this step; on check steps also max |g|, g . W and ||W|| (the
        weights are read here, before the update) and the weight samples."""
        if not grads:
            return None
        plan, ops = self._plan, self._ops
        step = self.step + 1
        present = self._all if len(grads) == len(self._all) else tuple(sorted(grads))
        gs = [grads[i] for i in present]
        self.norms.write(step % plan.window, gs, present)
        row = EagerRow(step, present)
        if not plan.monitor.is_check_step(step - plan.start):
            return Pending(row)
        weights = ops.resolve(self._vars)
        ws = weights if present is self._all else [weights[i] for i in present]
        check = ops.cat([ops.max_abs(gs), ops.dots(gs, ws, [rows.get(i) for i in present]),
                         ops.norms(ws)])
        snapshot = self._samples.snapshot(weights) if self._samples.enabled else None
        return Pending(row, check, snapshot)

    def after(self, pending: Pending) -> bool:
        """Keeps the step; on a check step also measures the updated weights. Returns whether
        this was a check step (the caller checks, in the training thread)."""
        plan = self._plan
        row = pending.row._replace(loss=self.loss)
        self.loss = None
        self.step = row.step
        plan.activations.step_done(row.step - plan.start)
        self.rows[row.step % plan.window] = row
        if pending.grads is None:
            return False
        ops, samples = self._ops, self._samples
        ws = ops.resolve(self._vars)
        parts = list(ws)
        if pending.snapshot is not None:
            now = ops.cat(samples.take(ws))
            for x in (now - pending.snapshot, pending.snapshot, now - samples.start_flat):
                parts += ops.split(x, samples.sizes)
        self.check = EagerCheck(row.step, row.present, pending.grads, ops.norms(parts))
        return True

    def take(self, after: int) -> tuple[list[EagerRow], EagerCheck | None]:
        """The kept steps after step ``after``, oldest first, and the check step's numbers when
        they are of one of them (forgotten here)."""
        rows = sorted((r for r in self.rows.values() if r.step > after), key=lambda r: r.step)
        check, self.check = self.check, None
        if check is not None and check.step not in {r.step for r in rows}:
            check = None
        return rows, check
