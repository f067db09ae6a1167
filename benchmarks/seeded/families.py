"""The seeded-bug benchmark, framework-neutral: families, specs, data, weights, truth, scores.

A :class:`ModelSpec` says everything about one run: the layers, the initial-weight scheme, the
data set, the optimizer, the batches and the seed. Both framework modules build the model it
describes, load the weights :func:`initial_weights` made (one numpy source), train on the
batches :func:`batch_indices` lists (the reference experiments' own batch order), and gather the
same raw :class:`Evidence` at the same steps; so a PyTorch run and a Keras run of one spec start
from the same weights and see the same data in the same order.

Canonical layouts (numpy): a dense kernel is ``[fan_in, fan_out]`` (Keras' ``Dense``; PyTorch's
``nn.Linear`` stores its transpose), a conv kernel ``[kh, kw, c_in, c_out]`` (Keras' ``Conv2D``),
images are channels-last ``[n, h, w, c]``, and a conv feature map is flattened channels-last (the
PyTorch model permutes to NHWC before ``flatten``), so the dense weights after it mean the same.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

import gradwatch
from gradwatch import experiments as ex
from gradwatch._findings import to_json_ready

# -- families --------------------------------------------------------------------------------

#: The L2 strength of the regularised variant of every spec: Keras' ``l2(1e-4)`` on every kernel
#: (``1e-4 * sum(w ** 2)``), and the same penalty added to the loss in PyTorch.
L2 = 1e-4


@dataclasses.dataclass(frozen=True)
class Family:
    """A group of runs sharing one label and what counts as detecting it."""

    name: str
    #: True when the family's nets learn (no warning may be raised on them).
    healthy: bool
    #: Finding kinds that count as detecting the bug (empty for healthy families).
    accepted: tuple[str, ...]
    description: str


FAMILIES: tuple[Family, ...] = (
    Family("numerical", False, ("nonfinite", "exploding_gradient", "loss_divergence"),
           "Dense/Linear layers with exponential activations stacked 3-5 deep: the activations "
           "overflow and the loss and gradients become huge or non-finite."),
    Family("vanishing-sigmoid", False, ("vanishing_gradient",),
           "10-14 sigmoid layers, and a sigmoid LeNet-style CNN with an extra sigmoid dense layer: "
           "the gradient shrinks by up to 4x per layer and the first layers get none."),
    Family("vanishing-small-init", False, ("vanishing_gradient",),
           "Width-5 ReLU stacks initialised U(-0.05, 0.05): every layer shrinks the signal, "
           "forward and backward."),
    Family("dying-relu", False, ("dead_units",),
           "15-17-layer width-5 ReLU stacks with PyTorch's default init: units die (zero for every "
           "input) and the loss is stuck. vanishing_gradient is accepted too where the raw "
           "gradient norms show it."),
    Family("healthy-slow-start", True, (),
           "Deep narrow tanh nets that sit near the chance loss for a few hundred steps, then "
           "learn."),
    Family("healthy", True, (),
           "Nets the published tools label healthy (they learn): shallow and medium ReLU+He MLPs, "
           "a shallow sigmoid MLP, a small CNN, tanh MLPs on standardized inputs and tanh MLPs on "
           "unscaled inputs."),
)

FAMILY = {f.name: f for f in FAMILIES}

ACTIVATIONS = (None, "relu", "sigmoid", "tanh", "exp")
INITS = ("default", "he", "xavier", "small_uniform")
DATASETS = ("circles", "moons", "blobs", "blobs_unscaled", "images")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer: ``dense`` (``size`` units), ``conv`` (``size`` filters, ``kernel`` square, valid
    padding, stride 1), ``pool`` (2x2 max pool) or ``flatten``. ``activation`` follows a dense or
    conv layer (``None``: linear)."""

    kind: str
    size: int = 0
    activation: str | None = None
    kernel: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "conv", "pool", "flatten"):
            raise ValueError(f"unknown layer kind {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def has_params(self) -> bool:
        return self.kind in ("dense", "conv")


def dense(size: int, activation: str | None = None) -> LayerSpec:
    return LayerSpec("dense", size, activation)


def conv(filters: int, kernel: int, activation: str | None) -> LayerSpec:
    return LayerSpec("conv", filters, activation, kernel)


POOL = LayerSpec("pool")
FLATTEN = LayerSpec("flatten")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One run of the benchmark: model, data, optimizer, budget and seed."""

    family: str
    variant: str
    seed: int
    #: Hidden layers; the output layer (``dense(classes)``, linear) is appended by :func:`layers`.
    hidden: tuple[LayerSpec, ...]
    data: str
    init: str = "default"
    #: 0 or :data:`L2`.
    l2: float = 0.0
    lr: float = 0.05
    momentum: float = 0.0
    batch: int = 32
    steps: int = 600
    #: Training-set size.
    n: int = 512
    #: Evidence is gathered every ``probe_every`` steps (and before the first, after the last).
    probe_every: int = 20

    def __post_init__(self) -> None:
        if self.family not in FAMILY:
            raise ValueError(f"unknown family {self.family!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")

    @property
    def name(self) -> str:
        return f"{self.family}/{self.variant}{'+l2' if self.l2 else ''}/seed{self.seed}"

    @property
    def healthy(self) -> bool:
        return FAMILY[self.family].healthy

    @property
    def classes(self) -> int:
        return DATA_CLASSES[self.data]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return DATA_SHAPES[self.data]

    @property
    def layers(self) -> tuple[LayerSpec, ...]:
        return self.hidden + (dense(self.classes),)

    def with_(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)


# -- data ------------------------------------------------------------------------------------

DATA_CLASSES = {"circles": 2, "moons": 2, "blobs": 3, "blobs_unscaled": 3, "images": 4}
DATA_SHAPES: dict[str, tuple[int, ...]] = {"circles": (2,), "moons": (2,), "blobs": (2,),
                                           "blobs_unscaled": (2,), "images": (16, 16, 1)}


@dataclasses.dataclass(frozen=True)
class Dataset:
    x: np.ndarray  # float32, [n, *input_shape]
    y: np.ndarray  # int64 class ids, [n]
    classes: int


def blobs(n: int, centers: np.ndarray, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around ``centers`` (``[classes, 2]``), ``n // classes`` points each."""
    rng = np.random.default_rng([seed, 10])
    k = len(centers)
    y = np.arange(n) % k
    x = centers[y] + rng.normal(0, spread, (n, centers.shape[1]))
    return x.astype(np.float32), y.astype(np.int64)


def images(n: int, seed: int, size: int = 16, noise: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic ``size`` x ``size`` grayscale images of 4 classes: a horizontal bar, a vertical
    bar, a diagonal line, a hollow square, each at a random place, with Gaussian noise."""
    rng = np.random.default_rng([seed, 11])
    x = np.zeros((n, size, size), dtype=np.float64)
    y = np.arange(n) % 4
    for i, c in enumerate(y):
        if c == 3:    # hollow square, side 5-8
            side = int(rng.integers(5, 9))
            a, b = rng.integers(0, size - side + 1, 2)
            x[i, a:a + side, b] = x[i, a:a + side, b + side - 1] = 1
            x[i, a, b:b + side] = x[i, a + side - 1, b:b + side] = 1
            continue
        length = int(rng.integers(6, size - 1))
        a = int(rng.integers(0, size - 1))           # across the line
        b = int(rng.integers(0, size - length + 1))  # along it
        if c == 0:    # horizontal bar, 2 rows thick
            x[i, a:a + 2, b:b + length] = 1
        elif c == 1:  # vertical bar
            x[i, b:b + length, a:a + 2] = 1
        else:         # diagonal, 2 pixels thick, either direction
            r = np.arange(length)
            start = int(rng.integers(0, size - length + 1))
            rr, cc = start + r, b + r
            if rng.random() < 0.5:
                cc = size - 1 - cc
            x[i, rr, cc] = 1
            x[i, rr, np.clip(cc + 1, 0, size - 1)] = 1
    x += rng.normal(0, noise, x.shape)
    return x[..., None].astype(np.float32), y.astype(np.int64)


def _standardize(x: np.ndarray) -> np.ndarray:
    axes = tuple(range(x.ndim - 1)) if x.ndim == 2 else None  # images: one mean/std overall
    mean, std = x.mean(axis=axes), x.std(axis=axes)
    return ((x - mean) / std).astype(np.float32)


def dataset(spec: ModelSpec) -> Dataset:
    """The spec's training set, made in code (nothing is downloaded).

    ``circles`` and ``moons`` are the reference experiments' own data (standardized); ``blobs``
    three Gaussian blobs (standardized); ``blobs_unscaled`` the same kind of blobs left in raw
    units of tens to a hundred (as raw prices or pixel values would be); ``images`` the synthetic
    4-class image set (standardized).
    """
    if spec.data in ("circles", "moons"):
        x, y = ex.DATASETS[spec.data](n=spec.n, noise=0.1, seed=spec.seed)
        return Dataset(_standardize(x), y.astype(np.int64), 2)
    if spec.data == "blobs":
        centers = np.array([[0.0, 3.0], [2.6, -1.5], [-2.6, -1.5]])
        x, y = blobs(spec.n, centers, 1.0, spec.seed)
        return Dataset(_standardize(x), y, 3)
    if spec.data == "blobs_unscaled":
        centers = np.array([[20.0, 80.0], [60.0, 30.0], [95.0, 70.0]])
        x, y = blobs(spec.n, centers, 10.0, spec.seed)
        return Dataset(x, y, 3)
    x, y = images(spec.n, spec.seed)
    return Dataset(_standardize(x), y, 4)


def batch_indices(spec: ModelSpec) -> np.ndarray:
    """``[steps, batch]`` example indices: the reference experiments' batch order (one shuffled
    pass over the data after another), seeded by the spec."""
    return ex.batch_indices(spec)  # reads .seed, .n, .batch, .steps


PROBE_SIZE = 256


def probe_indices(spec: ModelSpec) -> np.ndarray:
    """The fixed batch the evidence's gradients and dead-unit fractions are measured on."""
    rng = np.random.default_rng([spec.seed, 3])
    return np.sort(rng.choice(spec.n, min(PROBE_SIZE, spec.n), replace=False))


def probe_steps(spec: ModelSpec) -> list[int]:
    """Steps (optimizer steps done so far) at which evidence is gathered: 0, every
    ``probe_every``, and the end."""
    return sorted(set(range(0, spec.steps + 1, spec.probe_every)) | {spec.steps})


# -- initial weights -------------------------------------------------------------------------


def param_layers(spec: ModelSpec) -> list[tuple[str, LayerSpec]]:
    """``(name, layer)`` of every layer with parameters, input side first: ``fc{i}`` for dense,
    ``conv{i}`` for conv (``i`` counts layers of either kind); the output layer is ``out``."""
    out = []
    layers = spec.layers
    for i, layer in enumerate(layers):
        if not layer.has_params:
            continue
        if i == len(layers) - 1:
            out.append(("out", layer))
        else:
            out.append((f"{'fc' if layer.kind == 'dense' else 'conv'}{len(out)}", layer))
    return out


def relu_sites(spec: ModelSpec) -> list[str]:
    """Names of the layers whose ReLU output the evidence measures dead fractions of."""
    return [name for name, layer in param_layers(spec) if layer.activation == "relu"]


def kernel_shapes(spec: ModelSpec) -> list[tuple[int, ...]]:
    """Canonical kernel shape of every parameterised layer, input side first."""
    shape = spec.input_shape
    out = []
    for layer in spec.layers:
        if layer.kind == "dense":
            fan_in = int(np.prod(shape))
            out.append((fan_in, layer.size))
            shape = (layer.size,)
        elif layer.kind == "conv":
            h, w, c = shape
            out.append((layer.kernel, layer.kernel, c, layer.size))
            shape = (h - layer.kernel + 1, w - layer.kernel + 1, layer.size)
        elif layer.kind == "pool":
            h, w, c = shape
            shape = (h // 2, w // 2, c)
        else:
            shape = (int(np.prod(shape)),)
    return out


def initial_weights(spec: ModelSpec) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(kernel, bias)`` per parameterised layer, float32, canonical layout, from the spec's seed.

    ``default``: PyTorch's ``nn.Linear``/``nn.Conv2d`` default, U(+-1/sqrt(fan_in)) for weights and
    biases; ``he``: He (Kaiming) normal, zero bias; ``xavier``: Glorot uniform, zero bias;
    ``small_uniform``: U(-0.05, 0.05) (Keras' ``RandomUniform()``), zero bias.
    """
    rng = np.random.default_rng([spec.seed, 1])
    out = []
    for shape in kernel_shapes(spec):
        fan_in = int(np.prod(shape[:-1]))
        fan_out = int(shape[-1] * np.prod(shape[:-2]))
        units = shape[-1]
        if spec.init == "default":
            bound = 1 / math.sqrt(fan_in)
            w, b = rng.uniform(-bound, bound, shape), rng.uniform(-bound, bound, units)
        elif spec.init == "he":
            w, b = rng.normal(0, math.sqrt(2 / fan_in), shape), np.zeros(units)
        elif spec.init == "xavier":
            bound = math.sqrt(6 / (fan_in + fan_out))
            w, b = rng.uniform(-bound, bound, shape), np.zeros(units)
        else:
            w, b = rng.uniform(-0.05, 0.05, shape), np.zeros(units)
        out.append((w.astype(np.float32), b.astype(np.float32)))
    return out


# -- the specs -------------------------------------------------------------------------------


def _stack(depth: int, width: int, activation: str) -> tuple[LayerSpec, ...]:
    return tuple(dense(width, activation) for _ in range(depth))


def _lenet(activation: str, extra_dense: int = 0) -> tuple[LayerSpec, ...]:
    """LeNet-style: conv 5x5 (6) - pool - conv 3x3 (12) - pool - flatten - dense 32 - dense 16,
    plus ``extra_dense`` more dense layers of 16."""
    return ((conv(6, 5, activation), POOL, conv(12, 3, activation), POOL, FLATTEN,
             dense(32, activation), dense(16, activation))
            + _stack(extra_dense, 16, activation))


def _variants(seed: int) -> list[ModelSpec]:
    """Every spec of one seed, without L2 (:func:`specs` adds the L2 copies)."""
    k = seed % 3
    return [
        # (a) numerical: exp(exp(exp(...))) overflows.
        ModelSpec("numerical", "exp-mlp", seed, _stack(3 + k, 16, "exp"), "circles", lr=0.1,
                  steps=300),
        # (b) vanishing sigmoid: 10/12/14 sigmoid layers; a sigmoid LeNet with one more sigmoid
        # dense layer (5 sigmoid layers: its first layer's gradient is ~1e-4 of the largest, and
        # with L2 the penalty's own gradient is larger than that).
        ModelSpec("vanishing-sigmoid", "sigmoid-mlp", seed, _stack(10 + 2 * k, 32, "sigmoid"),
                  "moons", lr=0.05),
        ModelSpec("vanishing-sigmoid", "sigmoid-lenet", seed, _lenet("sigmoid", 1), "images",
                  lr=0.05, n=768, steps=400),
        # (c) tiny init: every layer shrinks the signal.
        ModelSpec("vanishing-small-init", "relu5-small-init", seed, _stack(6 + k, 5, "relu"),
                  "circles", init="small_uniform", lr=0.05),
        # (d) dying ReLU.
        ModelSpec("dying-relu", "relu5-deep", seed, _stack(15 + k, 5, "relu"), "moons", lr=0.05),
        # (e) slow start, then learns.
        ModelSpec("healthy-slow-start", "tanh-deep-circles", seed, _stack(6, 8, "tanh"),
                  "circles", lr=0.1, steps=800),
        ModelSpec("healthy-slow-start", "tanh-deep-blobs", seed, _stack(8, 8, "tanh"), "blobs",
                  lr=0.05, steps=800),
        # (f) healthy.
        ModelSpec("healthy", "relu-he-shallow", seed, _stack(2, 32, "relu"), "moons", init="he",
                  lr=0.1, steps=400),
        ModelSpec("healthy", "relu-he-medium", seed, _stack(5, 32, "relu"), "blobs", init="he",
                  lr=0.05, steps=400),
        ModelSpec("healthy", "sigmoid-shallow", seed, _stack(2, 16, "sigmoid"), "moons",
                  init="xavier", lr=0.1, momentum=0.9, steps=400),
        ModelSpec("healthy", "relu-cnn", seed, _lenet("relu"), "images", init="xavier",
                  lr=0.02, momentum=0.9, n=768, steps=300),
        ModelSpec("healthy", "tanh-standardized", seed, _stack(3, 32, "tanh"), "moons",
                  init="xavier", lr=0.1, steps=400),
        ModelSpec("healthy", "tanh-unscaled", seed, _stack(2, 32, "tanh"), "blobs_unscaled",
                  lr=0.05, steps=400),
    ]


def specs(seeds: Iterable[int], families: Iterable[str] | None = None,
          variants: Iterable[str] | None = None) -> list[ModelSpec]:
    """Every spec of the given seeds, each without and with L2, in family order.

    ``families``/``variants`` (names) narrow the selection; an unknown name raises ``KeyError``.
    """
    fams = list(families or ())
    unknown = [f for f in fams if f not in FAMILY]
    if unknown:
        raise KeyError(f"unknown families {unknown}; choose from {list(FAMILY)}")
    seeds = list(seeds)
    all_variants = {s.variant for s in _variants(0)}
    vars_ = list(variants or ())
    unknown = [v for v in vars_ if v not in all_variants]
    if unknown:
        raise KeyError(f"unknown variants {unknown}; choose from {sorted(all_variants)}")
    out = []
    for fam in FAMILIES:
        if fams and fam.name not in fams:
            continue
        for seed in seeds:
            for spec in _variants(seed):
                if spec.family != fam.name or (vars_ and spec.variant not in vars_):
                    continue
                out += [spec, spec.with_(l2=L2)]
    return out


# -- evidence (gathered by the framework modules, without gradwatch) -------------------------


@dataclasses.dataclass
class Probe:
    """What the framework itself says at one point of training (``step`` optimizer steps done)."""

    step: int
    #: Mean cross-entropy of the data (no penalty) over the whole training set.
    loss: float
    accuracy: float
    #: ``l2 * sum(kernel ** 2)``; 0 without L2.
    penalty: float
    #: Per parameterised layer (kernel and bias together): L2 norm of the data loss's gradient on
    #: the probe batch.
    grad_norm: list[float]
    #: The same with the L2 penalty's gradient added (what the optimizer and gradwatch see).
    total_grad_norm: list[float]
    #: Per ReLU layer: fraction of its units (features, or conv channels) that are zero for every
    #: example (and position) of the probe batch.
    dead_fraction: dict[str, float]


@dataclasses.dataclass
class Evidence:
    layers: list[str]
    probes: list[Probe]
    #: PyTorch only, from ``p.grad`` after every training step's ``backward`` (the batch the
    #: optimizer used, penalty included): median over the second half of training of the first
    #: layer's gradient norm over the largest layer's.
    train_ratio_median: float | None = None
    #: PyTorch only: the largest per-layer ``p.grad`` norm of any step, and whether any step's
    #: loss or gradient was non-finite.
    train_grad_max: float | None = None
    train_nonfinite: bool | None = None
    #: PyTorch only: the largest training-batch loss.
    train_loss_max: float | None = None


# -- truth -----------------------------------------------------------------------------------

#: A vanishing gradient: the first layer's data gradient is below this share of the largest
#: layer's (AUTOTRAINER's beta_1), as a median over the later probes.
VANISH_RATIO = 1e-3
#: Dead: more than this share of a layer's units.
DEAD_FRACTION = 0.5
#: Numerical: a loss or gradient norm above this (or non-finite).
NUMERIC_LIMIT = 1e6
#: Stuck: the final loss is at least this share of the chance loss ln(classes).
STUCK_SHARE = 0.9
#: Learned: the final loss is at most this share of min(start loss, chance loss).
LEARNED_SHARE = 0.6
#: Learning has begun once the loss is below this share of the chance loss; a slow starter sits
#: above it for at least :data:`SLOW_START_STEPS` steps.
BEGUN_SHARE = 0.9
SLOW_START_STEPS = 100


@dataclasses.dataclass
class TruthNumbers:
    """The raw numbers a label is judged on (all from :class:`Evidence`)."""

    chance_loss: float
    start_loss: float
    final_loss: float
    min_loss: float
    final_accuracy: float
    #: The first probe step whose loss is below ``BEGUN_SHARE`` of the chance loss (None: never).
    learn_step: int | None
    #: Median over probes in the last 3/4 of training of first-layer / largest-layer norm of the
    #: data gradient; also the first layer's own median norm and the largest layer's.
    ratio_median: float
    first_norm_median: float
    largest_norm_median: float
    #: The same ratio with the penalty's gradient included (what gradwatch sees).
    total_ratio_median: float
    total_first_norm_median: float
    #: Largest dead fraction of any ReLU layer at the last probe, and which layer.
    final_dead_max: float
    final_dead_layer: str | None
    #: Largest finite loss and gradient norm seen, and whether anything was non-finite.
    max_loss: float
    max_grad: float
    nonfinite: bool
    train_ratio_median: float | None


@dataclasses.dataclass
class Truth:
    ok: bool
    reason: str
    #: Kinds that count as detecting this run's bug (empty for a healthy run).
    accepted: tuple[str, ...]
    #: None when the run failed before any evidence was gathered.
    numbers: TruthNumbers | None


def _finite_max(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return max(vals) if vals else float("nan")


def _median(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def truth_numbers(spec: ModelSpec, ev: Evidence) -> TruthNumbers:
    probes = ev.probes
    later = [p for p in probes if p.step >= spec.steps // 4 and p.step > 0] or probes[-1:]

    def ratios(attr: str) -> tuple[float, float, float]:
        rs, firsts, tops = [], [], []
        for p in later:
            g = np.asarray(getattr(p, attr), dtype=float)
            if not np.all(np.isfinite(g)) or not g.max() > 0:
                continue
            rs.append(g[0] / g.max())
            firsts.append(g[0])
            tops.append(g.max())
        return _median(rs), _median(firsts), _median(tops)

    ratio, first, top = ratios("grad_norm")
    total_ratio, total_first, _ = ratios("total_grad_norm")
    last = probes[-1]
    dead_layer = max(last.dead_fraction, key=last.dead_fraction.get) if last.dead_fraction else None
    grads = [g for p in probes for g in p.grad_norm + p.total_grad_norm]
    losses = [p.loss for p in probes]
    nonfinite = not all(math.isfinite(v) for v in grads + losses) or bool(ev.train_nonfinite)
    max_loss = _finite_max(losses + ([ev.train_loss_max] if ev.train_loss_max is not None else []))
    max_grad = _finite_max(grads + ([ev.train_grad_max] if ev.train_grad_max is not None else []))
    return TruthNumbers(
        chance_loss=math.log(spec.classes), start_loss=probes[0].loss, final_loss=last.loss,
        min_loss=-_finite_max([-v for v in losses]), final_accuracy=last.accuracy,
        learn_step=next((p.step for p in probes
                         if math.isfinite(p.loss) and p.loss < BEGUN_SHARE * math.log(spec.classes)),
                        None),
        ratio_median=ratio, first_norm_median=first, largest_norm_median=top,
        total_ratio_median=total_ratio, total_first_norm_median=total_first,
        final_dead_max=last.dead_fraction[dead_layer] if dead_layer else 0.0,
        final_dead_layer=dead_layer, max_loss=max_loss, max_grad=max_grad, nonfinite=nonfinite,
        train_ratio_median=ev.train_ratio_median)


def check_truth(spec: ModelSpec, ev: Evidence) -> Truth:
    """Does the raw evidence bear the spec's label out? With the reason, in numbers."""
    t = truth_numbers(spec, ev)
    fam = FAMILY[spec.family]
    numeric = t.nonfinite or t.max_loss > NUMERIC_LIMIT or t.max_grad > NUMERIC_LIMIT
    stuck = math.isfinite(t.final_loss) and t.final_loss >= STUCK_SHARE * t.chance_loss
    vanished = t.ratio_median < VANISH_RATIO
    where = (f"final loss {t.final_loss:.4g} (start {t.start_loss:.4g}, chance {t.chance_loss:.4g}, "
             f"accuracy {t.final_accuracy:.3f})")
    grad = (f"first/largest data-gradient ratio {t.ratio_median:.2g} (first {t.first_norm_median:.2g},"
            f" largest {t.largest_norm_median:.2g}; with penalty {t.total_ratio_median:.2g})")
    if fam.healthy:
        learned = (not numeric and math.isfinite(t.final_loss)
                   and t.final_loss <= LEARNED_SHARE * min(t.start_loss, t.chance_loss))
        reason = f"{'learns' if learned else 'does NOT learn'}: {where}; begins at step {t.learn_step}"
        if spec.family == "healthy-slow-start":
            slow = t.learn_step is not None and t.learn_step >= SLOW_START_STEPS
            reason += "" if slow else f" (NOT a slow start: expected >= {SLOW_START_STEPS})"
            learned = learned and slow
        return Truth(learned, reason, (), t)
    if spec.family == "numerical":
        why = ("non-finite values" if t.nonfinite else
               f"max loss {t.max_loss:.3g}, max gradient norm {t.max_grad:.3g}")
        return Truth(numeric, f"{'numerical' if numeric else 'NOT numerical'}: {why}; {where}",
                     fam.accepted, t)
    if numeric:
        return Truth(False, f"unexpectedly numerical (max loss {t.max_loss:.3g}, max grad "
                            f"{t.max_grad:.3g}, non-finite {t.nonfinite})", fam.accepted, t)
    if spec.family in ("vanishing-sigmoid", "vanishing-small-init"):
        ok = vanished and stuck
        return Truth(ok, f"{'vanishing' if ok else 'NOT vanishing+stuck'}: {grad}; {where}",
                     fam.accepted, t)
    # dying-relu
    dead = t.final_dead_max > DEAD_FRACTION
    ok = dead and stuck
    accepted = fam.accepted + (("vanishing_gradient",) if vanished else ())
    return Truth(ok, f"{'dying' if ok else 'NOT dying+stuck'}: {100 * t.final_dead_max:.0f}% of "
                     f"'{t.final_dead_layer}' dead at the end; {grad}; {where}", accepted, t)


# -- results ---------------------------------------------------------------------------------


def json_safe(x: Any) -> Any:
    """Plain JSON (no NaN/Inf: those become the strings ``"NaN"``, ``"Infinity"``): dataclasses as
    dicts, the rest as gradwatch's own event file writes it."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return json_safe({f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return to_json_ready(x)


@dataclasses.dataclass
class FindingRecord:
    """A gradwatch finding as the benchmark keeps it."""

    kind: str
    severity: str
    step: int
    layer: str | None
    message: str
    evidence: dict[str, Any]

    @classmethod
    def of(cls, f: Any) -> FindingRecord:
        return cls(kind=f.kind, severity=getattr(f, "severity", "warning"), step=int(f.step),
                   layer=f.layer, message=f.message, evidence=json_safe(dict(f.evidence)))


@dataclasses.dataclass
class RunResult:
    """One run: spec, raw evidence verdict, gradwatch's findings and the outcome."""

    name: str
    framework: str
    family: str
    variant: str
    seed: int
    l2: bool
    healthy: bool
    truth: Truth
    #: The raw evidence the truth was judged on.
    evidence: Evidence
    #: gradwatch's findings (empty in a ``--truth`` run, which trains without gradwatch).
    findings: list[FindingRecord]
    watched: bool
    seconds: float
    #: gradwatch's own failures (GradWatchInternalWarning messages and ERROR log records).
    internal: list[str] = dataclasses.field(default_factory=list)
    #: An exception that stopped the run (the benchmark's or the framework's), else None.
    error: str | None = None

    @property
    def warnings(self) -> list[FindingRecord]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def warning_kinds(self) -> list[str]:
        return sorted({f.kind for f in self.warnings})

    @property
    def detected(self) -> bool:
        return any(f.kind in self.truth.accepted for f in self.warnings)

    @property
    def outcome(self) -> str:
        """``error``, ``mislabelled``, ``hit``/``miss`` (buggy), ``clean``/``false_alarm``
        (healthy); ``label_ok`` for a run without gradwatch whose label the evidence bears out."""
        if self.error is not None:
            return "error"
        if not self.truth.ok:
            return "mislabelled"
        if not self.watched:
            return "label_ok"
        if self.healthy:
            return "false_alarm" if self.warnings else "clean"
        return "hit" if self.detected else "miss"


@dataclasses.dataclass
class Score:
    """Scores of a group of runs (a family, or all runs, of one framework)."""

    framework: str
    group: str
    runs: int
    buggy: int
    hits: int
    healthy: int
    false_alarms: int
    #: Runs (buggy or healthy, scored) with at least one warning-severity finding.
    warning_runs: int
    mislabelled: int
    errors: int

    @property
    def recall(self) -> float | None:
        return self.hits / self.buggy if self.buggy else None

    @property
    def precision(self) -> float | None:
        return self.hits / self.warning_runs if self.warning_runs else None

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarms / self.healthy if self.healthy else None


def score(runs: Sequence[RunResult], framework: str, group: str) -> Score:
    scored = [r for r in runs if r.outcome in ("hit", "miss", "clean", "false_alarm")]
    return Score(
        framework=framework, group=group, runs=len(runs),
        buggy=sum(r.outcome in ("hit", "miss") for r in scored),
        hits=sum(r.outcome == "hit" for r in scored),
        healthy=sum(r.outcome in ("clean", "false_alarm") for r in scored),
        false_alarms=sum(r.outcome == "false_alarm" for r in scored),
        warning_runs=sum(bool(r.warnings) for r in scored),
        mislabelled=sum(r.outcome == "mislabelled" for r in runs),
        errors=sum(r.outcome == "error" for r in runs))


def scores(runs: Sequence[RunResult]) -> list[Score]:
    """Per framework: one score per family (in family order), then ``all``."""
    out = []
    for fw in dict.fromkeys(r.framework for r in runs):
        mine = [r for r in runs if r.framework == fw]
        for fam in FAMILIES:
            group = [r for r in mine if r.family == fam.name]
            if group:
                out.append(score(group, fw, fam.name))
        out.append(score(mine, fw, "all"))
    return out


# -- one run, either framework ----------------------------------------------------------------


class _ErrorRecords(logging.Handler):
    """Keeps gradwatch's ERROR records (its own failures, with tracebacks)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


def run_spec(spec: ModelSpec, framework: str, watch: bool,
             train: Callable[[ModelSpec, bool, Evidence], list]) -> RunResult:
    """Run ``train(spec, watch, evidence)`` (which returns gradwatch's findings), keeping
    gradwatch's internal failures apart and the run's own failure as a result, not a crash;
    the label is then checked on the evidence it gathered."""
    handler = _ErrorRecords()
    logger = logging.getLogger("gradwatch")
    logger.addHandler(handler)
    start = time.perf_counter()
    findings: list = []
    internal: list[str] = []
    error = None
    ev = Evidence(layers=[n for n, _ in param_layers(spec)], probes=[])
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            findings = train(spec, watch, ev)
        internal = [str(w.message) for w in caught
                    if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
    except Exception:  # the run's own failure: recorded, the benchmark goes on
        error = traceback.format_exc(limit=8)
    finally:
        logger.removeHandler(handler)
    internal += handler.messages
    seconds = time.perf_counter() - start
    truth = (check_truth(spec, ev) if ev.probes and error is None
             else Truth(False, "no evidence (the run failed)", (), None))
    return RunResult(
        name=spec.name, framework=framework, family=spec.family, variant=spec.variant,
        seed=spec.seed, l2=bool(spec.l2), healthy=spec.healthy, truth=truth, evidence=ev,
        findings=[FindingRecord.of(f) for f in findings], watched=watch, seconds=seconds,
        internal=internal, error=error)
