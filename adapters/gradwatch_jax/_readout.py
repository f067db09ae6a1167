"""A check's one host transfer (the payload of :func:`gradwatch_jax._device.payload`, as the
host callback receives it) turned into a :class:`gradwatch.kit.CheckRecord` of the steps since
the last check; the core's :func:`kit.step_stats` makes per-layer numbers of it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gradwatch import kit


def _vec(host: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    x = host.get(name)
    return None if x is None else np.asarray(x, dtype=np.float64).reshape(-1)


def to_record(host: dict[str, Any], sites: tuple[kit.ActivationSite, ...] = ()
              ) -> kit.CheckRecord:
    """The record of the window ending at the check step ``host["count"]``. The ring's slots
    are (step - 1) % window and a check closes every window, so the rows are in step order.
    ``sites``: the activation sites; their values go in when sampled in this window."""
    with np.errstate(over="ignore", invalid="ignore"):
        step = int(np.asarray(host["count"]))
        sq = np.asarray(host["grad_sq"], dtype=np.float64)
        W, T = sq.shape
        detail = bool(np.asarray(host["detail"]))
        dot = _vec(host, "grad_dot")
        wsq_before = _vec(host, "weight_sq_before")
        if dot is not None and not np.isfinite(dot).any():
            dot = wsq_before = None  # no params were given to update()
        acts_step = int(np.asarray(host.get("acts_step", 0)))
        sampled = bool(sites) and step - W < acts_step <= step
        return kit.CheckRecord(
            steps=np.arange(step - W + 1, step + 1, dtype=np.int64), grad_sq=sq,
            has_grad=np.ones((W, T), dtype=bool),
            loss=np.asarray(host["loss"], dtype=np.float64),
            has_loss=np.asarray(host["has_loss"], dtype=bool),
            grad_max=_vec(host, "grad_max") if detail else None,
            grad_nonzero=_vec(host, "grad_nonzero") if detail else None,
            grad_dot=dot, weight_sq_before=wsq_before, weight_sq=_vec(host, "weight_sq"),
            update_sq=_vec(host, "update_sq"), update_base_sq=_vec(host, "update_base_sq"),
            change_sq=_vec(host, "change_sq"), change_base_sq=_vec(host, "change_base_sq"),
            activation_sites=sites if sampled else (),
            activation_values=_vec(host, "acts") if sampled else ())


def learning_rates(host: dict[str, Any]) -> tuple[float, ...]:
    """The learning rates ``optax.inject_hyperparams`` held at the check (finite ones)."""
    lr = _vec(host, "lr")
    return () if lr is None else tuple(float(x) for x in lr if math.isfinite(x))
