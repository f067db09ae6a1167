"""A check's one host read, turned into a :class:`gradwatch.kit.CheckRecord` of the steps since
the last check (the core's :func:`kit.step_stats` makes per-layer numbers of it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch import kit

from ._eager import EagerCheck, EagerRow
from ._graph import GraphRead
from ._ops import KerasOps, NormRows


class Cursor:
    """What the monitor has been given so far: steps and activation samples up to these.

    Args:
        start: The optimizer's iterations when the fit began (step ids are absolute, the
            record's steps count from the fit's start).
    """

    def __init__(self, start: int) -> None:
        self.start = start
        #: The last step handed on.
        self.step = start
        #: The step of the last activation sample handed on.
        self.act_step = start


class RecordSettings:
    """What every record of a fit shares.

    Args:
        sites: The activation sites (their ``units`` filled in while the fit runs).
        grad_scale: The static loss scale gradients arrive multiplied by, or None.
        change_base_sq: Squared norms of the start-of-fit weight samples ``[V]``, or None when
            update ratios are off.
    """

    def __init__(self, sites: Sequence[kit.ActivationSite], grad_scale: float | None,
                 change_base_sq: np.ndarray | None) -> None:
        self.sites = sites
        self.grad_scale = grad_scale
        self.change_base_sq = change_base_sq

    def record(self, cursor: Cursor, steps: np.ndarray, sq: np.ndarray, present: np.ndarray,
               loss: np.ndarray, has_loss: np.ndarray, check: dict[str, np.ndarray] | None,
               acts: tuple[int, np.ndarray] | None) -> kit.CheckRecord:
        """The record of ``steps`` (absolute ids, oldest first; the last is the check step when
        ``check`` holds its per-variable numbers, by :class:`kit.CheckRecord` field: max |g|,
        g . W, ||W||^2 before and after the update, with update ratios on also the sampled
        update, its base and the change since the start); ``acts``: (step, one value per
        site)."""
        cursor.step = int(steps[-1])
        sites: Sequence[kit.ActivationSite] = ()
        values: Any = ()
        if acts is not None and cursor.act_step < acts[0] <= cursor.step:
            cursor.act_step = int(acts[0])
            sites, values = tuple(self.sites), acts[1]
        scale = (None if self.grad_scale is None
                 else np.full(len(steps), 1.0 / self.grad_scale))
        numbers = dict(check or {})
        if "update_sq" in numbers:
            numbers["change_base_sq"] = self.change_base_sq
        return kit.CheckRecord(steps=steps - cursor.start, grad_sq=sq, has_grad=present,
                               loss=loss, has_loss=has_loss, grad_scale=scale,
                               activation_sites=sites, activation_values=values, **numbers)


def _check_numbers(gmax: np.ndarray, dot: np.ndarray, before_sq: np.ndarray,
                   weights: np.ndarray) -> dict[str, np.ndarray]:
    """The check step's :class:`kit.CheckRecord` fields; ``weights``: ||W||^2 after the update,
    then (with update ratios on) the sampled update, its base and the change ``[1 or 4, V]``."""
    names = ("weight_sq", "update_sq", "update_base_sq", "change_sq")
    return {"grad_max": gmax, "grad_dot": dot, "weight_sq_before": before_sq,
            **dict(zip(names, weights))}


def _upto(steps: np.ndarray, stamp: float) -> int | None:
    """How many of ``steps`` to hand on so that the check step ``stamp`` comes last (the rest
    wait for the next read: a check's numbers are of its last step); None: not among them."""
    if not np.isfinite(stamp):
        return None
    hit = np.flatnonzero(steps == int(stamp))
    return int(hit[0]) + 1 if hit.size else None


def graph_record(read: GraphRead, cursor: Cursor, settings: RecordSettings, *,
                 present: np.ndarray, has_loss: bool, sampled: bool,
                 replicas: int = 1) -> kit.CheckRecord | None:
    """The steps of the ring buffer after ``cursor.step`` (None when there are none);
    ``replicas``: how many replicas' activation values the read summed."""
    V = present.size
    ids = read.rows[:, V + 1]
    ok = np.isfinite(ids) & (ids > cursor.step)
    if not ok.any():
        return None
    slots = np.flatnonzero(ok)[np.argsort(ids[ok])]
    steps = ids[slots].astype(np.int64)
    # With steps_per_execution (or a late read) the read may come a few steps after the check
    # step: the check-step numbers of any step in this window are new.
    n = _upto(steps, read.weights[4 * V])
    check = None
    if n is not None:
        slots, steps = slots[:n], steps[:n]
        gmax, dot, wsq = read.grads.reshape(3, V)
        # Norms are stored (float32); squared here in float64, where a huge norm cannot overflow.
        w = np.asarray(read.weights[:4 * V], float).reshape(4, V) ** 2
        check = _check_numbers(gmax, dot, np.asarray(wsq, float) ** 2, w if sampled else w[:1])
    rows = read.rows[slots]
    S = len(settings.sites)
    return settings.record(cursor, steps, np.asarray(rows[:, :V], float) ** 2,
                           np.tile(present, (len(slots), 1)),
                           rows[:, V], np.full(len(slots), has_loss), check,
                           (read.acts[S], read.acts[:S] / replicas) if S else None)


def eager_record(ops: KerasOps, norms: NormRows, window: int, rows: list[EagerRow],
                 check: EagerCheck | None, acts: dict[int, Any], cursor: Cursor,
                 settings: RecordSettings, n_vars: int) -> kit.CheckRecord | None:
    """``rows`` (their norms in ``norms``, by ``step % window``), the check step's and the
    activation sites' numbers, read in one transfer."""
    if not rows:
        return None
    if check is not None:
        # The check step last: steps after it wait for the next read.
        rows = rows[:[r.step for r in rows].index(check.step) + 1]
    V, n = n_vars, len(rows)
    losses = [r.loss for r in rows if r.loss is not None]
    sites = sorted(acts)
    parts = [norms.read([r.step % window for r in rows])]
    if losses:
        parts.append(ops.stack(losses))
    if check is not None:
        parts += [check.grads, check.weights]
    if sites:
        parts.append(ops.stack([acts[i] for i in sites]))
    host = _HostSlices(ops.to_host(parts))
    sq = host.take(n * V).reshape(n, V) ** 2
    if all(len(r.present) == V for r in rows):
        present = np.ones((n, V), dtype=bool)
    else:
        present = np.zeros((n, V), dtype=bool)
        for k, r in enumerate(rows):
            present[k, list(r.present)] = True
    has_loss = np.array([r.loss is not None for r in rows])
    loss = np.full(n, np.nan)
    loss[has_loss] = host.take(len(losses))
    numbers = None
    if check is not None:
        p = list(check.present)
        gmax, dot, wnorm = np.full((3, V), np.nan)
        gmax[p], dot[p], wnorm[p] = host.take(3 * len(p)).reshape(3, len(p))
        k = 1 if settings.change_base_sq is None else 4  # (update ratios off: weights only)
        w = host.take(k * V).reshape(k, V) ** 2
        numbers = _check_numbers(gmax, dot, wnorm ** 2, w)
    values = np.full(len(settings.sites), np.nan)
    values[sites] = host.take(len(sites))
    steps = np.array([r.step for r in rows], dtype=np.int64)
    return settings.record(cursor, steps, sq, present, loss, has_loss, numbers,
                           (int(steps[-1]), values) if sites else None)


class _HostSlices:
    """Consecutive slices of the one host array."""

    def __init__(self, host: np.ndarray) -> None:
        self._host, self._pos = host, 0

    def take(self, n: int) -> np.ndarray:
        out = self._host[self._pos:self._pos + n]
        self._pos += n
        return out
