"""What an adapter measured, per parameter tensor, and the one function that makes StepStats of it.

An adapter computes per-tensor numbers on the device with its framework's ops (squared gradient
norms every step; max |g|, non-zero counts, g . W, weight and sampled update sums on check steps)
and moves them to the host in one transfer. Everything after that is the same arithmetic for
every framework and lives here, tested once: tensors summed into layers, loss-scale undone, ratios
that never divide by a zero start, activation sites turned into :class:`ActivationStats`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ._stats import ActivationStats, StepStats, orthogonal_norms

#: Activation kinds whose forward outputs adapters sample, and the statistic each feeds:
#: ReLU (and ReLU6) outputs for dead units, sigmoid/tanh outputs for saturation.
SAMPLED_ACTIVATIONS: dict[str, str] = {"relu": "relu", "relu6": "relu", "sigmoid": "sigmoid",
                                       "tanh": "tanh"}


class TensorLayout:
    """Which layer each parameter tensor belongs to, and how large each tensor is.

    Args:
        layers: Layer names in depth order (input side first).
        tensor_layer: The layer index of each tensor ``[T]``. Tensors of a layer need not be
            adjacent; every layer should own at least one tensor.
        numel: Elements per tensor ``[T]`` (a sharded tensor: the whole tensor's).
        sample_scale: Per tensor, elements / elements sampled for update ratios ``[T]`` (``1``
            where the whole tensor is read). Defaults to all ones.
    """

    def __init__(self, layers: Sequence[str], tensor_layer: Sequence[int] | np.ndarray,
                 numel: Sequence[float] | np.ndarray,
                 sample_scale: Sequence[float] | np.ndarray | None = None) -> None:
        #: Layer names in depth order.
        self.layers: tuple[str, ...] = tuple(layers)
        #: Layer index of each tensor ``[T]``.
        self.tensor_layer = np.asarray(tensor_layer, dtype=np.intp).reshape(-1)
        n = self.tensor_layer.size
        #: Elements per tensor ``[T]``.
        self.numel = np.asarray(numel, dtype=float).reshape(-1)
        #: Elements / elements sampled, per tensor ``[T]``.
        self.sample_scale = (np.ones(n) if sample_scale is None
                             else np.asarray(sample_scale, dtype=float).reshape(-1))
        if self.numel.size != n or self.sample_scale.size != n:
            raise ValueError(f"TensorLayout: tensor_layer, numel and sample_scale must have one "
                             f"entry per tensor ({n}), got {self.numel.size} and "
                             f"{self.sample_scale.size}")
        L = len(self.layers)
        if n and (self.tensor_layer.min() < 0 or self.tensor_layer.max() >= L):
            raise ValueError(f"TensorLayout: tensor_layer must index the {L} layers")
        # Per-layer sums are one np.add.reduceat over the tensors in layer order; the order is
        # skipped when tensors already come layer by layer (the usual case).
        order = np.argsort(self.tensor_layer, kind="stable")
        self._order = None if np.array_equal(order, np.arange(n)) else order
        sorted_layer = self.tensor_layer[order]
        self._dense = n > 0 and np.array_equal(np.unique(sorted_layer), np.arange(L))
        self._starts = (np.flatnonzero(np.r_[True, np.diff(sorted_layer) != 0]) if n
                        else np.zeros(0, dtype=np.intp))
        #: Gradient elements per layer ``[L]``.
        self.grad_size = self.layer_sum(self.numel)

    @property
    def num_tensors(self) -> int:
        return int(self.tensor_layer.size)

    def layer_sum(self, x: np.ndarray) -> np.ndarray:
        """Per-layer sums of a per-tensor array (last axis ``[..., T] -> [..., L]``)."""
        x = np.asarray(x, dtype=float)
        L = len(self.layers)
        if not self.num_tensors:
            return np.zeros(x.shape[:-1] + (L,))
        if self._dense:
            xs = x if self._order is None else x[..., self._order]
            return np.add.reduceat(xs, self._starts, axis=-1)
        out = np.zeros(x.shape[:-1] + (L,))
        np.add.at(out, (..., self.tensor_layer), x)
        return out

    def layer_max(self, x: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
        """Per-layer maximum of a per-tensor vector ``[T] -> [L]``, over the tensors ``present``
        only; NaN for a layer with none."""
        x = np.where(present, x, -np.inf) if present is not None else np.asarray(x, float)
        out = np.full(len(self.layers), -np.inf)
        if self.num_tensors:
            np.maximum.at(out, self.tensor_layer, x)  # NaN propagates: a NaN max is news
        return np.where(np.isneginf(out), np.nan, out)


@dataclasses.dataclass(frozen=True)
class ActivationSite:
    """One sampled activation site: its name, what is measured there and its width."""

    #: Site name (the module or layer path; ``name#k`` for its k-th call in one forward).
    name: str
    #: ``"relu"`` (the value is the dead fraction) or ``"sigmoid"``/``"tanh"`` (saturated).
    kind: str
    #: Units (features or channels) at the site.
    units: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class CheckRecord:
    """Per-tensor measurements of the steps since the last check, as they came off the device.

    Per-step arrays have one row per optimizer step, oldest first; the last row is the check
    step. Check-step arrays are ``[T]`` and ``None`` when not measured at this check. Squared
    norms are as the framework saw them (loss-scaled under AMP); ``grad_scale`` undoes that.
    """

    #: Optimizer step numbers ``[S]``.
    steps: np.ndarray
    #: Squared gradient L2 norm per step and tensor ``[S, T]`` (anything where absent).
    grad_sq: np.ndarray
    #: Which tensors had a gradient at each step ``[S, T]``.
    has_grad: np.ndarray
    #: Loss per step ``[S]`` (NaN where none).
    loss: np.ndarray
    #: Which steps had a loss observed ``[S]``.
    has_loss: np.ndarray
    #: Factor that turns a measured gradient into the true one, per step ``[S]`` (1 / the AMP
    #: loss scale); ``None``: 1.
    grad_scale: np.ndarray | None = None
    #: Max |g| per tensor at the check step ``[T]`` (as measured, scaled).
    grad_max: np.ndarray | None = None
    #: Non-zero gradient elements per tensor at the check step ``[T]``.
    grad_nonzero: np.ndarray | None = None
    #: g . W per tensor at the check step, W as the gradient saw it (before the update) ``[T]``.
    grad_dot: np.ndarray | None = None
    #: ||W||^2 per tensor before the update, beside ``grad_dot`` ``[T]``.
    weight_sq_before: np.ndarray | None = None
    #: ||W||^2 per tensor after the check step ``[T]``.
    weight_sq: np.ndarray | None = None
    #: Sampled ||W_after - W_before||^2 and ||W_before||^2 of the check step ``[T]``.
    update_sq: np.ndarray | None = None
    update_base_sq: np.ndarray | None = None
    #: Sampled ||W_now - W_start||^2 and ||W_start||^2 ``[T]``.
    change_sq: np.ndarray | None = None
    change_base_sq: np.ndarray | None = None
    #: Sampled activation sites and their values (dead or saturated fraction), one per site.
    activation_sites: Sequence[ActivationSite] = ()
    activation_values: Sequence[float] | np.ndarray = ()
    #: The batch of each step ``[S]`` (an int or a string the user gave; ``None`` where not
    #: known); ``None``: the adapter knows none.
    batch_ids: Sequence[object] | None = None
    #: Whether the check step's gradients reached the optimizer with a smaller norm than the
    #: backward left (clipping); ``None``: not compared.
    clipped: bool | None = None


def _per_layer_ratio(layout: TensorLayout, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """sqrt(sum num / sum den) per layer, sample-scaled; NaN where the base is 0 (a layer that
    started at zero has no relative change)."""
    s = layout.sample_scale
    top = layout.layer_sum(num * s)
    bottom = layout.layer_sum(den * s)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.where(bottom > 0, np.sqrt(top / bottom), np.nan)


def activation_stats(sites: Sequence[ActivationSite],
                     values: Sequence[float] | np.ndarray) -> dict[str, ActivationStats]:
    """One :class:`ActivationStats` per site with a finite value."""
    out: dict[str, ActivationStats] = {}
    for site, value in zip(sites, np.asarray(values, dtype=float).reshape(-1)):
        if not np.isfinite(value):
            continue
        if site.kind == "relu":
            out[site.name] = ActivationStats(kind="relu", dead_fraction=float(value),
                                             units=int(site.units))
        else:
            out[site.name] = ActivationStats(kind=site.kind, saturated_fraction=float(value),
                                             units=int(site.units))
    return out


def step_stats(record: CheckRecord, layout: TensorLayout, *, step: int | None = None) -> StepStats:
    """The per-layer :class:`StepStats` of one check: the framework-neutral arithmetic every
    adapter would otherwise repeat. ``step`` defaults to the record's last step."""
    steps = np.asarray(record.steps, dtype=np.int64).reshape(-1)
    S, T = len(steps), layout.num_tensors
    sq = np.asarray(record.grad_sq, dtype=float).reshape(S, T)
    present = np.asarray(record.has_grad, dtype=bool).reshape(S, T)
    scale = (np.ones(S) if record.grad_scale is None
             else np.asarray(record.grad_scale, dtype=float).reshape(S))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        kept = np.where(present, sq, 0.0)
        has_grad = layout.layer_sum(present.astype(float)) > 0
        grad_norm = np.sqrt(layout.layer_sum(kept)) * scale[:, None]
        last_present, last_scale = present[-1], scale[-1]
        # A NaN/Inf gradient shows as a non-finite squared norm (Inf from overflow too).
        grad_bad = layout.layer_sum((last_present & ~np.isfinite(sq[-1])).astype(float))
        grad_max = orth = zero = None
        if record.grad_max is not None:
            grad_max = layout.layer_max(np.asarray(record.grad_max, float), last_present) * \
                last_scale
        if record.grad_nonzero is not None:
            nnz = np.where(last_present, np.asarray(record.grad_nonzero, float), 0.0)
            zero = 1 - layout.layer_sum(nnz) / np.maximum(layout.grad_size, 1)
        if record.grad_dot is not None and record.weight_sq_before is not None:
            rest = np.where(last_present, orthogonal_norms(
                sq[-1], np.asarray(record.grad_dot, float),
                np.asarray(record.weight_sq_before, float)), 0.0)
            orth = np.where(has_grad[-1], np.sqrt(layout.layer_sum(rest)), np.nan) * last_scale
        wnorm = wbad = None
        if record.weight_sq is not None:
            wsq = np.asarray(record.weight_sq, float)
            wnorm = np.sqrt(layout.layer_sum(wsq))
            wbad = layout.layer_sum((~np.isfinite(wsq)).astype(float))
        ratio = change = None
        if record.update_sq is not None and record.update_base_sq is not None:
            ratio = _per_layer_ratio(layout, np.asarray(record.update_sq, float),
                                     np.asarray(record.update_base_sq, float))
        if record.change_sq is not None and record.change_base_sq is not None:
            change = _per_layer_ratio(layout, np.asarray(record.change_sq, float),
                                      np.asarray(record.change_base_sq, float))
    return StepStats(
        step=int(steps[-1]) if step is None else int(step), layers=layout.layers, steps=steps,
        grad_norm=np.where(has_grad, grad_norm, np.nan), has_grad=has_grad,
        loss=np.asarray(record.loss, dtype=float).reshape(S),
        has_loss=np.asarray(record.has_loss, dtype=bool).reshape(S),
        grad_size=layout.grad_size, grad_max=grad_max, grad_nonfinite=grad_bad,
        grad_zero_fraction=zero, weight_norm=wnorm, weight_nonfinite=wbad, update_ratio=ratio,
        weight_change=change, grad_norm_orthogonal=orth,
        activations=activation_stats(record.activation_sites, record.activation_values),
        batch_ids=(None if record.batch_ids is None or all(b is None for b in record.batch_ids)
                   else tuple(record.batch_ids)),
        clipped=record.clipped,
    )
