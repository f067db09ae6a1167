"""The framework-neutral boundary: what an adapter measured, as plain numpy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What an adapter can see of one parameterised layer, in depth order."""

    #: The framework's own name (``named_modules()`` path, Keras layer path).
    name: str
    #: Class name, e.g. ``"Linear"``, ``"Conv2d"``, ``"Dense"``.
    type: str
    #: Number of trainable scalars the layer owns (shared parameters counted once).
    num_params: int
    #: Weight standard deviation times sqrt(fan_in) at watch time; He init gives ~1.41 and
    #: Xavier/Glorot ~1 for square layers. ``None`` when the layer has no matrix/kernel weight.
    init_gain: float | None = None
    #: True for recurrent layers (RNN/LSTM/GRU), whose gradients can explode through time.
    recurrent: bool = False
    #: Whether the layer owns a weight matrix or kernel (False: only biases, norm gains, a
    #: tied decoder's bias); ``None`` when the adapter does not say.
    matrix: bool | None = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the adapter can see of the whole model; advice is chosen from it."""

    framework: str
    #: Activation kinds found in the model: "sigmoid", "tanh", "relu", "leaky_relu", "prelu",
    #: "gelu", "elu", "softplus", ... (lower case). Functional activations are invisible.
    activations: frozenset[str] = frozenset()
    #: How many activation sites of each kind (a tanh in a pooler is not a tanh network).
    activation_counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: Normalisation kinds found: "batchnorm", "layernorm", "groupnorm", ...
    normalization: frozenset[str] = frozenset()
    #: Number of parameterised layers.
    depth: int = 0
    #: True/False when the adapter can tell whether the model has skip connections, else None.
    residual: bool | None = None
    recurrent: bool = False
    #: Learning rate(s) of the optimizer, when the adapter knows them.
    learning_rates: tuple[float, ...] = ()
    optimizer: str | None = None
    #: Observed by the adapter: gradients were norm-clipped between backward and the step.
    clipping: bool | None = None


@dataclasses.dataclass(frozen=True)
class ActivationStats:
    """Forward-activation statistics of one activation site, sampled on a schedule."""

    #: "relu" (dead units) or "sigmoid"/"tanh" (saturation).
    kind: str
    #: Fraction of units (features/channels) that were zero for the whole batch.
    dead_fraction: float = float("nan")
    #: Fraction of outputs in the flat region of a sigmoid/tanh.
    saturated_fraction: float = float("nan")
    #: Number of units (features or channels) at this site.
    units: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class StepStats:
    """Statistics of one check, covering the optimizer steps since the previous check.

    Per-step arrays (``steps``, ``grad_norm``, ``has_grad``, ``loss``) have one row per optimizer
    step since the last check, oldest first; the last row is the check step ``step``. The other
    per-layer arrays describe the check step only, and are ``None`` when not measured. Every
    per-layer array follows ``layers`` (depth order: input side first).
    """

    step: int
    layers: tuple[str, ...]
    #: Optimizer step numbers covered by this check, shape ``[S]``.
    steps: np.ndarray
    #: Per-step, per-layer gradient L2 norm ``[S, L]``; NaN/Inf when the gradient was non-finite,
    #: NaN too where ``has_grad`` is False.
    grad_norm: np.ndarray
    #: Which layers received a gradient at each step ``[S, L]`` (frozen or unused layers: False).
    has_grad: np.ndarray
    #: Loss per step ``[S]`` (mean over micro-batches), NaN where none was observed.
    loss: np.ndarray
    #: Number of gradient elements per layer ``[L]`` (to turn norms into RMS values).
    grad_size: np.ndarray
    #: Max |g| per layer at the check step ``[L]``.
    grad_max: np.ndarray | None = None
    #: Number of the layer's gradient tensors holding NaN/Inf at the check step ``[L]``.
    grad_nonfinite: np.ndarray | None = None
    #: Which steps had a loss observed ``[S]``; ``None`` means "wherever ``loss`` is not NaN".
    #: Adapters set it, so that a NaN loss is told apart from no loss at all.
    has_loss: np.ndarray | None = None
    #: Fraction of exactly-zero gradient elements per layer at the check step ``[L]``.
    grad_zero_fraction: np.ndarray | None = None
    #: Weight L2 norm per layer after the check step ``[L]``.
    weight_norm: np.ndarray | None = None
    #: Number of the layer's parameter tensors holding NaN/Inf ``[L]``.
    weight_nonfinite: np.ndarray | None = None
    #: ||W_after - W_before|| / ||W_before|| for the check step, per layer ``[L]``.
    update_ratio: np.ndarray | None = None
    #: ||W_now - W_start|| / ||W_start|| per layer ``[L]`` (0.05 means 5 % since the start).
    weight_change: np.ndarray | None = None
    #: The check step's gradient L2 norm with each tensor's component along its own weights
    #: taken out, ``sqrt(sum_t ||g_t||^2 - (g_t . W_t)^2 / ||W_t||^2)`` per layer ``[L]`` (g as
    #: judged: unscaled, before clipping). An L2 penalty in the loss pulls every weight towards
    #: zero with 2λW, parallel to W; what is left is what the data asks of the layer.
    grad_norm_orthogonal: np.ndarray | None = None
    #: Sampled forward activations, keyed by activation-site name.
    activations: Mapping[str, ActivationStats] = dataclasses.field(default_factory=dict)
    #: The batch each step trained on, as the user named it (``observe_loss(batch_id=)``, or
    #: the batch number in the epoch where the adapter knows it) ``[S]``; ``None``: not known.
    batch_ids: tuple[Any, ...] | None = None
    #: At the check step: whether the optimizer got a smaller gradient norm than the backward
    #: left (the user clips); ``None``: not compared at this check.
    clipped: bool | None = None

    def __post_init__(self) -> None:
        n_layers = len(self.layers)
        if self.batch_ids is not None:
            ids = tuple(self.batch_ids)
            if len(ids) != np.shape(self.steps)[0]:
                raise ValueError(f"StepStats.batch_ids must have one entry per step "
                                 f"({np.shape(self.steps)[0]}), got {len(ids)}")
            object.__setattr__(self, "batch_ids", ids)
        s = np.asarray(self.steps).shape
        if len(s) != 1 or s[0] < 1:
            raise ValueError("StepStats.steps must be a non-empty 1-D array")
        for name in ("grad_norm", "has_grad"):
            shape = np.shape(getattr(self, name))
            if shape != (s[0], n_layers):
                raise ValueError(f"StepStats.{name} must have shape {(s[0], n_layers)}, got {shape}")
        if self.has_loss is None:
            object.__setattr__(self, "has_loss", ~np.isnan(np.asarray(self.loss, dtype=float)))
        if np.shape(self.has_loss) != (s[0],):
            raise ValueError(f"StepStats.has_loss must have shape {(s[0],)}")
        if np.shape(self.loss) != (s[0],):
            raise ValueError(f"StepStats.loss must have shape {(s[0],)}, got {np.shape(self.loss)}")
        for name in (
            "grad_size", "grad_max", "grad_nonfinite", "grad_zero_fraction", "weight_norm",
            "weight_nonfinite", "update_ratio", "weight_change", "grad_norm_orthogonal",
        ):
            value = getattr(self, name)
            if value is not None and np.shape(value) != (n_layers,):
                raise ValueError(f"StepStats.{name} must have shape {(n_layers,)}, got {np.shape(value)}")

    @property
    def last_grad_norm(self) -> np.ndarray:
        """Gradient norm per layer at the check step ``[L]``."""
        return self.grad_norm[-1]

    @property
    def last_has_grad(self) -> np.ndarray:
        return self.has_grad[-1]


def orthogonal_norms(grad_sq: np.ndarray, dot: np.ndarray, weight_sq: np.ndarray) -> np.ndarray:
    """Per tensor, ``||g||^2 - (g . W)^2 / ||W||^2`` (>= 0): the squared norm of the gradient
    less its component along W. Where the dot product is unknown (NaN) or W is 0, ``||g||^2``.
    Adapters sum it per layer for :attr:`StepStats.grad_norm_orthogonal`."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        along = dot * dot / weight_sq
    along = np.where(np.isfinite(along), along, 0.0)
    return np.where(np.isfinite(grad_sq), np.maximum(grad_sq - along, 0.0), grad_sq)


def make_step_stats(
    step: int,
    layers: Sequence[str],
    grad_norm: Sequence[float] | np.ndarray,
    *,
    loss: float | None = None,
    has_loss: bool | None = None,
    grad_size: Sequence[int] | np.ndarray | None = None,
    has_grad: Sequence[bool] | np.ndarray | None = None,
    **extras,
) -> StepStats:
    """Build a single-step :class:`StepStats` (handy in tests and third-party adapters)."""
    g = np.asarray(grad_norm, dtype=float).reshape(1, -1)
    hg = np.ones_like(g, dtype=bool) if has_grad is None else np.asarray(has_grad, bool).reshape(1, -1)
    size = np.ones(g.shape[1]) if grad_size is None else np.asarray(grad_size, dtype=float)
    arrays = {k: (None if v is None else np.asarray(v, dtype=float)) for k, v in extras.items()
              if k != "activations"}
    return StepStats(
        step=step,
        layers=tuple(layers),
        steps=np.array([step]),
        grad_norm=g,
        has_grad=hg,
        loss=np.array([np.nan if loss is None else loss], dtype=float),
        has_loss=np.array([loss is not None if has_loss is None else has_loss]),
        grad_size=size,
        activations=extras.get("activations", {}),
        **arrays,
    )


#: Fewer elements than this are sampled whole.
MIN_SAMPLES = 32


def sample_stride(n: int, sample_fraction: float, exact: bool = False) -> int:
    """Stride of the fixed sample adapters keep of a tensor of ``n`` elements to estimate update
    ratios: about ``sample_fraction`` of the elements, at least ``MIN_SAMPLES``. A prime, so the
    sample does not alias with row lengths (every k-th column of a matrix)."""
    target = 1 if exact else max(1, round(1 / sample_fraction))
    if target == 1 or n <= MIN_SAMPLES:
        return 1
    stride = max(2, min(target, n // MIN_SAMPLES))
    while any(stride % p == 0 for p in range(2, int(stride**0.5) + 1)):
        stride += 1
    return stride
