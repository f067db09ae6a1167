"""Built-in detectors: small classes that turn StepStats into findings.

A detector's ``update(stats)`` returns the findings whose condition holds at this check, ``[]``
when it looked and found nothing, or ``None`` when the check held nothing it could judge (so
conditions it reported earlier are not considered cleared). Reporting a condition once when it
starts and once when it clears is the monitor's job, not the detector's.
"""

from __future__ import annotations

import collections
import math
import numbers
import statistics
from collections.abc import Mapping

import numpy as np

from . import _advice
from . import _validate as v
from ._context import RunContext, empty_context
from ._findings import Finding, GradientHealthWarning
from ._severity import BLOWN_UP
from ._stats import StepStats


def _fmt(x: float) -> str:
    return f"{x:.2g}" if math.isfinite(x) else str(x)


class Detector:
    """Base class. Subclasses set ``kinds`` and implement ``update``."""

    #: Finding kinds this detector can produce.
    kinds: tuple[str, ...] = ()
    #: The warning class of each of its own kinds, for a third-party detector (a subclass of
    #: :class:`GradientHealthWarning`); kinds not named here are emitted as the base class.
    categories: Mapping[str, type[GradientHealthWarning]] = {}

    def __init__(self) -> None:
        self.context: RunContext = empty_context()

    def bind(self, context: RunContext) -> None:
        """Called by the monitor before the first check (and again after :meth:`reset`)."""
        self.context = context
        self.reset()

    def reset(self) -> None:
        """Forget all history (a new run)."""

    def update(self, stats: StepStats) -> list[Finding] | None:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items()
                           if not k.startswith("_") and k != "context")
        return f"{type(self).__name__}({params})"


class _Sustained:
    """Counts consecutive checks for which a per-key condition held."""

    def __init__(self) -> None:
        self.counts: dict[object, int] = {}

    def update(self, holding: set) -> dict[object, int]:
        self.counts = {k: self.counts.get(k, 0) + 1 for k in holding}
        return self.counts


class VanishingGradientDetector(Detector):
    """Layers whose gradient is tiny both in absolute terms and next to the best-fed layer.

    A layer is starved at a check when the median (over the steps since the last check) of its
    gradient L2 norm is below ``abs_threshold`` AND below ``rel_threshold`` times the largest
    layer norm. A finding is raised after ``patience`` consecutive starved checks. Both tests
    must hold: a converged model has small gradients everywhere (not relative), and a layer can
    be far below the largest one while still learning (not absolute).

    Where the adapter measures ``grad_norm_orthogonal``, the part of each gradient parallel to
    its own weights is set aside first (when it is most of the gradient): an L2 penalty in the loss pulls every weight towards zero with 2λW, a
    gradient that can be far above ``abs_threshold`` while the data gradient has vanished.
    The evidence records how much a starved layer's ratio to the largest grew over its starved
    checks (``growth``): attention at initialisation starts starved and grows ~1000x within a
    few hundred steps, which the severity rules tell apart from vanishing.

    A gradient that vanishes with depth starves the layers from the input side up: the starved
    layers that only starved layers precede (in depth order) are the finding. A starved layer
    with a well-fed layer before it (attention query/key at initialisation, above embeddings
    that learn) is a local effect, not a gradient that fails to get through; it is reported as
    an ``info`` finding of its own.

    Args:
        rel_threshold: Ratio to the best-fed layer. Defaults to ``1e-3`` (AUTOTRAINER's beta_1).
        abs_threshold: Gradient L2 norm. Defaults to ``1e-4`` (AUTOTRAINER's beta_2).
        patience: Consecutive checks. Defaults to ``3``.
    """

    kinds = ("vanishing_gradient",)

    def __init__(self, rel_threshold: float = 1e-3, abs_threshold: float = 1e-4,
                 patience: int = 3) -> None:
        super().__init__()
        self.rel_threshold = v.fraction("rel_threshold", rel_threshold, inclusive_one=False)
        self.abs_threshold = v.positive_float("abs_threshold", abs_threshold)
        self.patience = v.positive_int("patience", patience)
        self._sustained = _Sustained()

    #: The gradient less its part along W below this share of it: (mostly) an L2 penalty's pull.
    PENALTY_SHARE = 0.5

    def reset(self) -> None:
        self._sustained = _Sustained()
        self._streak_rel: dict[int, float] = {}

    def update(self, stats: StepStats) -> list[Finding] | None:
        raw = _window_median(stats.grad_norm, stats.has_grad)
        norms = raw
        share = None
        if stats.grad_norm_orthogonal is not None:
            # What the data asks of the layer: the gradient less its component along W, as a
            # share of the check step's gradient, applied to the window's median.
            with np.errstate(divide="ignore", invalid="ignore"):
                share = stats.grad_norm_orthogonal / stats.last_grad_norm
            share = np.where(np.isfinite(share), np.clip(share, 0.0, 1.0), 1.0)
            norms = np.where(share < self.PENALTY_SHARE, raw * share, raw)
        ok = np.isfinite(norms)
        if ok.sum() < 2:
            return None  # nothing to compare: earlier conditions stay as they were
        top = int(np.nanargmax(np.where(ok, norms, -np.inf)))
        best = norms[top]
        if not best > 0:
            return None
        rel = norms / best
        starved = ok & (norms < self.abs_threshold) & (rel < self.rel_threshold)
        counts = self._sustained.update(set(np.flatnonzero(starved).tolist()))
        self._streak_rel = {i: self._streak_rel.get(i, float(rel[i])) for i in counts}
        hits = sorted(i for i, c in counts.items() if c >= self.patience)
        if not hits:
            return []
        prefix = set()
        for i in np.flatnonzero(ok):
            if not starved[i]:
                break
            prefix.add(int(i))
        deep = [i for i in hits if i in prefix]
        local = [i for i in hits if i not in prefix]
        out = []
        if deep:
            out.append(self._finding(stats, deep, counts, norms, raw, rel, top, best))
        if local:
            out.append(self._finding(stats, local, counts, norms, raw, rel, top, best,
                                     local=True))
        return out

    def _finding(self, stats: StepStats, hits: list[int], counts: dict, norms: np.ndarray,
                 raw: np.ndarray, rel: np.ndarray, top: int, best: float,
                 local: bool = False) -> Finding:
        first = hits[0]
        ctx = self.context
        start_rel = self._streak_rel[first]
        growth = float(rel[first] / start_rel) if start_rel > 0 else math.inf
        penalty = ""
        if norms[first] < raw[first]:
            penalty = (f" once its part along its own weights is set aside (the whole gradient, "
                       f"{_fmt(raw[first])}, is almost all the pull of an L2 penalty towards 0)")
        message = (
            f"step {stats.step}: layer {ctx.describe(first)}: gradient L2 norm {_fmt(norms[first])}"
            f"{penalty} is {_fmt(rel[first])} of the largest layer's ('{stats.layers[top]}', "
            f"{_fmt(best)}) for {counts[first]} consecutive checks. Gradient barely reaches "
            f"{ctx.span(hits)}."
        )
        if local:
            before = int(np.flatnonzero(np.isfinite(norms))[0])
            message += (f" Layer {ctx.describe(before)} before them is well fed, so the gradient "
                        "gets through: a local effect (attention at initialisation, a branch the "
                        "loss barely depends on), not a gradient that vanishes with depth.")
        return Finding(
            kind="vanishing_gradient", step=stats.step, layer=stats.layers[first],
            value=norms[first], threshold=self.abs_threshold, message=message,
            advice=_advice.vanishing(ctx, hits),
            evidence={"layers": [stats.layers[i] for i in hits],
                      "grad_norm": {stats.layers[i]: norms[i] for i in hits},
                      "ratio_to_largest": {stats.layers[i]: rel[i] for i in hits},
                      "largest_layer": stats.layers[top], "largest_norm": best,
                      "checks": counts[first], "growth": growth,
                      "l2_penalty": bool(norms[first] < raw[first]), "local": local},
            severity="info" if local else "warning",
        )


def nanmedian_columns(a: np.ndarray) -> np.ndarray:
    """Column medians ignoring NaN (NaN where a column has none); numpy's nanmedian takes a slow
    masked-array path for small arrays, and this runs on every check."""
    if a.shape[0] == 1:
        return a[0].astype(float)
    counts = np.sum(~np.isnan(a), axis=0)
    s = np.sort(a, axis=0)  # NaN sorts last
    cols = np.arange(a.shape[1])
    lo = np.maximum((counts - 1) // 2, 0)
    hi = np.maximum(counts // 2, 0)
    hi = np.where(counts % 2 == 1, lo, hi)
    med = s[lo, cols] / 2 + s[hi, cols] / 2  # no overflow near the float max
    return np.where(counts > 0, med, np.nan)


def _window_median(grad_norm: np.ndarray, has_grad: np.ndarray) -> np.ndarray:
    """Per-layer median over the window's steps, ignoring steps without a (finite) gradient."""
    return nanmedian_columns(np.where(has_grad & np.isfinite(grad_norm), grad_norm, np.nan))


class ExplodingGradientDetector(Detector):
    """Gradients far above their own recent history, absolutely huge, or growing with depth.

    Three tests, any of which raises a finding for a layer:

    * sudden: the norm at a step exceeds ``spike_factor`` times the layer's scale and exceeds
      ``spike_floor``. The scale is the larger of the median of the layer's last ``window``
      finite norms before this check (needs ``min_history`` of them first; the reference
      excludes the current check's own steps, so a rise cannot raise its own bar) and the
      median of its first ``early_steps`` norms: near convergence the recent median collapses,
      and one hard batch is then hundreds of times that median but a few times the norm the
      layer had while it learnt. That is not an explosion;
    * huge: the norm exceeds ``abs_threshold``;
    * depth ratio: the first layer's norm exceeds ``depth_ratio`` times the last layer's for
      ``patience`` consecutive checks (gradients grow as they flow back). Only in plain stacks:
      with normalisation or skip connections (a transformer, a ResNet) the first and last
      layers are not links of one chain, and an embedding tied to the output layer carries
      both their gradients.

    Args:
        spike_factor: Defaults to ``100``.
        spike_floor: Gradient L2 norm a spike must also exceed. Defaults to ``1.0`` (the usual
            clip-norm threshold: gradients below it are what clipping recipes call normal).
        window: History length in steps. Defaults to ``50``.
        min_history: Defaults to ``10``.
        abs_threshold: Gradient L2 norm per layer. Defaults to ``1e3``.
        depth_ratio: First-to-last layer norm ratio. Defaults to ``70`` (AUTOTRAINER's beta_3).
        patience: Checks for the depth-ratio test. Defaults to ``3``.
        early_steps: Steps whose median is the layer's learning-time scale. Defaults to ``100``.
    """

    kinds = ("exploding_gradient",)

    def __init__(self, spike_factor: float = 100.0, window: int = 50, min_history: int = 10,
                 abs_threshold: float = 1e3, depth_ratio: float = 70.0, patience: int = 3,
                 spike_floor: float = 1.0, early_steps: int = 100) -> None:
        super().__init__()
        self.spike_factor = v.greater_than_one("spike_factor", spike_factor)
        self.spike_floor = v.positive_float("spike_floor", spike_floor)
        self.window = v.positive_int("window", window, minimum=2)
        self.min_history = v.positive_int("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError(f"min_history ({min_history}) must be <= window ({window})")
        self.abs_threshold = v.positive_float("abs_threshold", abs_threshold)
        self.depth_ratio = v.greater_than_one("depth_ratio", depth_ratio)
        self.patience = v.positive_int("patience", patience)
        self.early_steps = v.positive_int("early_steps", early_steps)
        self.reset()

    def reset(self) -> None:
        self._history: collections.deque[np.ndarray] = collections.deque(maxlen=self.window)
        self._early: list[np.ndarray] = []
        self._early_ref: np.ndarray | None = None
        self._deep = 0

    def update(self, stats: StepStats) -> list[Finding]:
        hits: dict[int, tuple[int, float, float, str]] = {}  # layer -> (step, value, thr, why)
        # The reference is the history before this window: a sustained rise inside the window
        # cannot hide itself by raising its own median.
        ref = np.full(len(stats.layers), np.nan)
        counts = np.zeros(len(stats.layers), dtype=int)
        if self._history:
            hist = np.array(self._history)
            counts = np.sum(np.isfinite(hist), axis=0)
            ref = nanmedian_columns(hist)
        early = self._early_scale(len(stats.layers))
        if early is not None:
            ref = np.fmax(ref, early)
        enough = (counts >= self.min_history) & (ref > 0)
        g_all = np.where(stats.has_grad, stats.grad_norm, np.nan)
        finite = np.isfinite(g_all)
        with np.errstate(invalid="ignore"):
            spikes = finite & enough & (g_all > self.spike_factor * ref) & (g_all > self.spike_floor)
            huge = finite & (g_all > self.abs_threshold)
        never = len(stats.steps)
        first_spike = np.where(spikes.any(0), spikes.argmax(0), never)
        first_huge = np.where(huge.any(0), huge.argmax(0), never)
        # Per layer, the earliest step that qualifies; on the same step a spike is told first.
        for i in np.flatnonzero((first_spike < never) | (first_huge < never)):
            if first_spike[i] <= first_huge[i]:
                row = first_spike[i]
                hits[i] = (int(stats.steps[row]), g_all[row, i], self.spike_factor * ref[i],
                           f"{_fmt(g_all[row, i])} is {_fmt(g_all[row, i] / ref[i])}x its median "
                           f"of the last {int(counts[i])} steps ({_fmt(ref[i])})")
            else:
                row = first_huge[i]
                hits[i] = (int(stats.steps[row]), g_all[row, i], self.abs_threshold,
                           f"{_fmt(g_all[row, i])} is above the absolute limit "
                           f"{_fmt(self.abs_threshold)}")
        rows = np.where(finite, g_all, np.nan)
        self._history.extend(rows)
        if self._early_ref is None:
            self._early.extend(rows[:max(0, self.early_steps - len(self._early))])
        # Depth ratio at the check step, over layers that got a finite gradient.
        g = np.where(stats.last_has_grad, stats.last_grad_norm, np.nan)
        idx = np.flatnonzero(np.isfinite(g))
        model = self.context.model
        plain_stack = model.residual is not True and not model.normalization
        if (plain_stack and len(idx) >= 2 and g[idx[-1]] > 0
                and g[idx[0]] / g[idx[-1]] > self.depth_ratio):
            self._deep += 1
        else:
            self._deep = 0
        if self._deep >= self.patience:
            first = int(idx[0])
            ratio = g[first] / g[idx[-1]]
            hits.setdefault(first, (stats.step, ratio, self.depth_ratio,
                                    f"{_fmt(g[first])} is {_fmt(ratio)}x the last layer's ('{stats.layers[idx[-1]]}') "
                                    f"for {self._deep} consecutive checks: gradients grow as they "
                                    "flow back"))
        if not hits:
            return []
        ctx = self.context
        layers = sorted(hits)
        i = layers[0]
        step, value, thr, why = hits[i]
        message = f"step {step}: layer {ctx.describe(i)}: gradient L2 norm {why}."
        if len(layers) > 1:
            message += f" Also exploding: {ctx.span(layers[1:])}."
        return [Finding(
            kind="exploding_gradient", step=step, layer=stats.layers[i], value=value,
            threshold=thr, message=message, advice=_advice.exploding(ctx),
            evidence={"layers": [stats.layers[j] for j in layers],
                      "values": {stats.layers[j]: hits[j][1] for j in layers}},
        )]


    def _early_scale(self, n_layers: int) -> np.ndarray | None:
        """Median of each layer's first ``early_steps`` finite norms, once that many were seen
        (fixed from then on); ``None`` before."""
        if self._early_ref is None and len(self._early) >= self.early_steps:
            self._early_ref = nanmedian_columns(np.array(self._early))
            self._early = []
        if self._early_ref is not None and len(self._early_ref) == n_layers:
            return self._early_ref
        return None


class NonFiniteDetector(Detector):
    """NaN/Inf in the loss, gradients or weights, reported at the first step it appears.

    The layer named is where the bad values enter: a layer whose weights are non-finite, else the
    layer closest to the output among those with non-finite gradients (backward runs from the
    output). When every layer is affected and the loss itself is non-finite, the layer is ``None``
    and the message says so. No parameters: any non-finite value is a finding (as SageMaker's
    ExplodingTensor rule with ``only_nan=False`` and Keras' TerminateOnNaN).
    """

    kinds = ("nonfinite",)

    def reset(self) -> None:
        self._active: Finding | None = None

    def update(self, stats: StepStats) -> list[Finding]:
        found = self._scan(stats)
        if found is None:
            self._active = None
            return []
        # One condition from the first bad step until everything is finite again: later checks
        # (where NaN has spread to every layer) must not read as a new problem elsewhere.
        if self._active is None:
            self._active = found
        return [self._active]

    def _scan(self, stats: StepStats) -> Finding | None:
        last = len(stats.steps) - 1
        for row in range(len(stats.steps)):
            bad = stats.has_grad[row] & ~np.isfinite(stats.grad_norm[row])
            loss = float(stats.loss[row])
            loss_bad = bool(stats.has_loss[row]) and not math.isfinite(loss)
            weights = stats.weight_nonfinite if row == last else None
            fresh = None
            if weights is not None:
                # Weights are measured after the step: where this step's gradient was already
                # non-finite, bad weights are its consequence, not where the values entered.
                with np.errstate(invalid="ignore"):
                    fresh = (np.asarray(weights, dtype=float) > 0) & ~bad
            weight_bad = fresh is not None and bool(fresh.any())
            if bad.any() or loss_bad or weight_bad:
                return self._finding(stats, row, bad, loss, loss_bad,
                                     weights if weight_bad else None, fresh)
        return None

    def _finding(self, stats: StepStats, row: int, bad: np.ndarray, loss: float,
                 loss_bad: bool, weights: np.ndarray | None,
                 fresh: np.ndarray | None = None) -> Finding:
        ctx = self.context
        step = int(stats.steps[row])
        n_bad, n_with = int(bad.sum()), int(stats.has_grad[row].sum())
        layer: str | None
        if weights is not None and fresh is not None:
            idx = int(np.flatnonzero(fresh)[0])
            layer, value = stats.layers[idx], float(weights[idx])
            count = int(value) if math.isfinite(value) else value  # a count, from an adapter
            where = (f"the weights of layer {ctx.describe(idx)} are non-finite ({count} "
                     f"parameter tensor{'s' if value != 1 else ''} hold NaN/Inf)")
        elif n_bad and (n_bad < n_with or not loss_bad):
            idx = int(np.flatnonzero(bad)[-1])
            layer, value = stats.layers[idx], float(stats.grad_norm[row][idx])
            where = (f"the gradient of layer {ctx.describe(idx)} is non-finite (L2 norm {value}); "
                     f"it is the layer nearest the output of the {n_bad} affected")
        else:
            layer, value = None, loss
            where = f"the loss is {loss}"
            if n_bad:
                where += f" and the gradients of all {n_bad} layers are non-finite"
        return Finding(
            kind="nonfinite", step=step, layer=layer, value=value, threshold=math.inf,
            message=f"step {step}: {where}.",
            advice=_advice.nonfinite(ctx, in_loss_only=loss_bad and not n_bad),
            evidence={"layers": [stats.layers[i] for i in np.flatnonzero(bad)], "loss": loss},
        )


def _finite_losses(stats: StepStats) -> list[tuple[int, float]]:
    keep = stats.has_loss & np.isfinite(stats.loss)
    return [(int(s), float(x)) for s, x in zip(stats.steps[keep], stats.loss[keep])]


class LossPlateauDetector(Detector):
    """The loss stopped improving: Keras' EarlyStopping/ReduceLROnPlateau test on smoothed loss,
    and a run that has not learnt at all.

    Per-step losses are averaged over blocks of ``window`` steps (minibatch noise would otherwise
    hide or fake a plateau). A block improves when its mean is below the best block mean by more
    than ``max(min_delta, min_delta_rel * |best|)``. A finding is raised once ``patience`` steps
    pass without improvement, or once ``patience`` steps have passed and the best block is still
    within 10 % of the starting loss (a run that creeps down 1 % a block from where a blow-up left
    it has not learnt either). It clears when the loss improves again, after which it cannot
    re-fire for ``cooldown`` steps. The start is the untrained model's loss: the smaller of the
    first loss and the median of the first three (a first block of ``window`` steps can already
    be inside a blow-up). The evidence says whether the run is *stuck* (still within 10 % of the
    start) or fell first (converged), and the highest 5-step median loss relative to the start
    (``peak``): a run that blew up first and then sits near its start has been knocked into a
    trivial solution. The severity rules make a stuck plateau a warning when something explains
    it or it lasts.

    Args:
        window: Steps per block. Defaults to ``25``.
        patience: Steps without improvement. Defaults to ``200``.
        min_delta: Absolute improvement. Defaults to ``1e-4`` (ReduceLROnPlateau's default).
        min_delta_rel: Relative improvement. Defaults to ``1e-2``.
        cooldown: Steps. Defaults to ``100``.
    """

    kinds = ("loss_plateau",)
    #: The best loss within this fraction of the start: the run has not learnt.
    STUCK = 0.9

    def __init__(self, window: int = 25, patience: int = 200, min_delta: float = 1e-4,
                 min_delta_rel: float = 1e-2, cooldown: int = 100) -> None:
        super().__init__()
        self.window = v.positive_int("window", window)
        self.patience = v.positive_int("patience", patience)
        if self.patience < self.window:
            raise ValueError(f"patience ({patience}) must be >= window ({window})")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not (
                math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.min_delta = float(min_delta)
        self.min_delta_rel = v.fraction("min_delta_rel", min_delta_rel, inclusive_one=False)
        self.cooldown = v.positive_int("cooldown", cooldown, minimum=0)
        self.reset()

    def reset(self) -> None:
        self._block: list[float] = []
        self._head: list[float] = []
        self._last5: collections.deque[float] = collections.deque(maxlen=5)
        self._peak = -math.inf
        self._first_step: int | None = None
        self._best: float | None = None
        self._best_step = 0
        self._last_step = 0
        self._active = False
        self._quiet_until = -1

    @property
    def _start(self) -> float:
        return min(self._head[0], statistics.median(self._head))

    def _stuck(self) -> bool:
        start = self._start
        return self._best > start - (1 - self.STUCK) * abs(start)

    def update(self, stats: StepStats) -> list[Finding] | None:
        evaluated = False
        for step, loss in _finite_losses(stats):
            if self._first_step is None:
                self._first_step = step
            if len(self._head) < 3:
                self._head.append(loss)
            self._last5.append(loss)
            if len(self._last5) == 5:
                # the median of five; sorted() is ~4x cheaper than statistics.median here
                self._peak = max(self._peak, sorted(self._last5)[2])
            self._block.append(loss)
            if len(self._block) < self.window:
                continue
            mean = float(np.mean(self._block))
            self._block = []
            evaluated = True
            self._last_step = step
            if self._best is None or mean < self._best - max(self.min_delta,
                                                             self.min_delta_rel * abs(self._best)):
                was_stuck = self._best is not None and self._stuck()
                self._best, self._best_step = mean, step
                if self._active and not (was_stuck and self._stuck()):
                    self._active = False
                    self._quiet_until = step + self.cooldown
            self._current = mean
        if not evaluated:
            return None
        stuck = self._stuck()
        waited = self._last_step - self._best_step
        learning = self._last_step - self._first_step
        if waited < self.patience and stuck and learning >= self.patience:
            waited = learning  # creeping 1 % a block from the start is not learning either
        if waited < self.patience or self._last_step <= self._quiet_until:
            return []
        self._active = True
        start = self._start
        peak = self._peak / start if start > 0 and self._peak > 0 else None
        blown_up = stuck and peak is not None and peak >= BLOWN_UP
        state = (f"the run is stuck: the best loss is within {100 * (1 - self.STUCK):.0f}% of "
                 f"the starting loss {start:.4g}" if stuck else
                 f"it fell from {start:.4g} at the start, so the run may have converged")
        if blown_up:
            state += (f", after it rose to {peak:.3g}x that start: the steps blew the model into "
                      "a trivial solution (the loss of predicting the label frequencies)")
        tol = max(self.min_delta, self.min_delta_rel * abs(self._best))
        since = ("since the start" if waited > self._last_step - self._best_step else
                 f"for {waited} steps")
        message = (f"step {self._last_step}: the loss has not improved by more than "
                   f"{100 * (1 - self.STUCK):.0f}% of its start {since} ({waited} steps; best "
                   f"{self.window}-step mean {self._best:.4g} at step {self._best_step}, now "
                   f"{self._current:.4g}); {state}." if since == "since the start" else
                   f"step {self._last_step}: the loss has not improved by more than {tol:.2g} "
                   f"for {waited} steps (best {self.window}-step mean {self._best:.4g} at step "
                   f"{self._best_step}, now {self._current:.4g}); {state}.")
        return [Finding(
            kind="loss_plateau", step=self._last_step, layer=None, value=waited,
            threshold=self.patience, message=message,
            advice=(_advice.divergence(self.context) if blown_up
                    else _advice.plateau(self.context, stuck)),
            evidence={"best": self._best, "best_step": self._best_step, "current": self._current,
                      "first": start, "stuck": stuck, "peak": peak},
        )]


class LossDivergenceDetector(Detector):
    """The loss jumped far above its recent values, or rose above where training started.

    * jump: the median of the last ``spike_steps`` losses exceeds ``spike_factor`` times the
      median of the (up to ``window``) losses before them — at least ``min_history`` of them —
      and exceeds the starting loss. Medians make one bad minibatch noise: a jump must hold for
      most of ``spike_steps`` steps;
    * rise: the median of the last ``min_history`` losses exceeds ``rise_factor`` times the
      median of the first ``min_history`` (the untrained model's loss): training made the model
      worse. (Medians, so a brief spike in the first steps, which healthy runs also show, is
      not a divergence. A run that blows up at once and then sits near its start is the
      plateau detector's: it compares with the very first loss.) When the first loss differs
      from that median, the message says both.

    Both are tied to the starting loss so that a converged loss of 1e-3 jumping to 1e-2 is not
    called a divergence. Non-finite losses are :class:`NonFiniteDetector`'s. A jump's evidence
    says how many steps in a row it has held (``held``) and whether it still holds at the
    check's last step (``ongoing``): the severity rules make a jump that has not yet held for
    :data:`gradwatch._severity.JUMP_HOLD_STEPS` steps an info finding (SGD's brief excursions
    that recover on their own), and one that holds a warning.

    Args:
        spike_factor: Defaults to ``10``.
        spike_steps: Defaults to ``5``.
        window: Defaults to ``50``.
        min_history: Defaults to ``10``.
        rise_factor: Defaults to ``1.5``.
    """

    kinds = ("loss_divergence",)

    def __init__(self, spike_factor: float = 10.0, spike_steps: int = 5, window: int = 50,
                 min_history: int = 10, rise_factor: float = 1.5) -> None:
        super().__init__()
        self.spike_factor = v.greater_than_one("spike_factor", spike_factor)
        self.spike_steps = v.positive_int("spike_steps", spike_steps)
        self.window = v.positive_int("window", window, minimum=2)
        self.min_history = v.positive_int("min_history", min_history)
        if self.min_history > self.window:
            raise ValueError(f"min_history ({min_history}) must be <= window ({window})")
        self.rise_factor = v.greater_than_one("rise_factor", rise_factor)
        self.reset()

    def reset(self) -> None:
        # The last spike_steps losses are the candidate jump; the window before them the reference.
        self._losses: collections.deque[float] = collections.deque(
            maxlen=self.window + max(self.spike_steps, self.min_history))
        self._start: list[float] = []
        self._start_median: float | None = None
        self._streak = 0  # consecutive steps, up to the last one seen, at which the jump held

    def update(self, stats: StepStats) -> list[Finding] | None:
        losses = _finite_losses(stats)
        if not losses:
            return None
        hit, held = None, 0
        for step, loss in losses:
            if len(self._start) < self.min_history:
                self._start.append(loss)
            self._losses.append(loss)
            if len(self._start) < self.min_history:
                continue
            jump = self._jump(step)
            self._streak = self._streak + 1 if jump is not None else 0
            held = max(held, self._streak)
            if hit is None:
                hit = jump if jump is not None else self._rise(step)
        if hit is None:
            return []
        step, value, threshold, why, test = hit
        evidence: dict[str, object] = {"start": self._start_median, "test": test}
        if test == "jump":
            # How long the jump has held (its longest streak in this check, counted from
            # before it); whether it still holds at the check's last step.
            evidence.update(held=held, ongoing=self._streak > 0)
        return [Finding(kind="loss_divergence", step=step, layer=None, value=value,
                        threshold=threshold, message=f"step {step}: {why}.",
                        advice=_advice.divergence(self.context), evidence=evidence)]

    def _jump(self, step: int) -> tuple[int, float, float, str, str] | None:
        # statistics.median on these short lists of finite floats: the same value as
        # np.median at a tenth of the cost, and this runs once per step at every check.
        if self._start_median is None:
            self._start_median = statistics.median(self._start)
        start = self._start_median
        losses = list(self._losses)
        recent, before = losses[-self.spike_steps:], losses[:-self.spike_steps][-self.window:]
        if len(recent) == self.spike_steps and len(before) >= self.min_history:
            jump, ref = statistics.median(recent), statistics.median(before)
            if ref > 0 and jump > self.spike_factor * ref and jump > start:
                return (step, jump, self.spike_factor * ref,
                        f"the median loss of the last {self.spike_steps} steps ({jump:.4g}) is "
                        f"{jump / ref:.3g}x the median of the {len(before)} steps before "
                        f"({ref:.4g})", "jump")
        return None

    def _rise(self, step: int) -> tuple[int, float, float, str, str] | None:
        start = self._start_median
        assert start is not None
        losses = self._losses
        if len(losses) >= self.min_history and start > 0:
            rise = statistics.median(list(losses)[-self.min_history:])
            if rise > self.rise_factor * start:
                first = self._start[0]
                also = (f"; the very first loss was {first:.4g}"
                        if abs(first - start) > 0.1 * abs(start) else "")
                return (step, rise, self.rise_factor * start,
                        f"the median loss of the last {self.min_history} steps ({rise:.4g}) is "
                        f"{rise / start:.3g}x the median of the first {len(self._start)} "
                        f"({start:.4g}{also})", "rise")
        return None


class UpdateRatioDetector(Detector):
    """Weight updates far too small (stalled) or far too large for the weights they change.

    The ratio ``||W_after - W_before|| / ||W_before||`` of the check step, per layer. The rule of
    thumb (CS231n) is ~1e-3. A layer is *stalled* when its ratio is below ``stall_threshold``
    while its gradient is not small next to its weights (``||g|| / ||W|| >= min_grad_to_weight``),
    so a tiny learning rate is told apart from vanishing gradients and from a converged model.
    It *updates too much* above ``large_threshold``; that test reads only layers with a weight
    matrix or kernel: the rule of thumb is about weights, and a bias or a norm gain that starts
    at 0 (a tied decoder's bias alone) has a ratio that divides by almost nothing. Either needs
    ``patience`` consecutive checks. Whether a stall is a problem or the LR schedule's decay is
    the severity rules' call. The stall test, like the large-update test, reads only layers with
    a weight matrix or kernel: a LayerNorm gain under Adam at a fine-tuning learning rate has a
    ratio near 4e-6 although it trains as it should.

    Args:
        stall_threshold: Defaults to ``1e-5`` (100x below the 1e-3 rule of thumb).
        large_threshold: Defaults to ``0.1`` (100x above it).
        min_grad_to_weight: Defaults to ``1e-3``.
        patience: Defaults to ``3``.
    """

    kinds = ("stalled_update", "large_update")

    def __init__(self, stall_threshold: float = 1e-5, large_threshold: float = 0.1,
                 min_grad_to_weight: float = 1e-3, patience: int = 3) -> None:
        super().__init__()
        self.stall_threshold = v.positive_float("stall_threshold", stall_threshold)
        self.large_threshold = v.positive_float("large_threshold", large_threshold)
        if self.stall_threshold >= self.large_threshold:
            raise ValueError(f"stall_threshold ({stall_threshold}) must be < large_threshold "
                             f"({large_threshold})")
        self.min_grad_to_weight = v.positive_float("min_grad_to_weight", min_grad_to_weight)
        self.patience = v.positive_int("patience", patience)
        self.reset()

    def reset(self) -> None:
        self._stalled = _Sustained()
        self._large = _Sustained()

    def update(self, stats: StepStats) -> list[Finding] | None:
        if stats.update_ratio is None:
            return None
        r = stats.update_ratio
        ok = stats.last_has_grad & np.isfinite(r)
        with np.errstate(all="ignore"):
            # Without weight norms the stall test cannot tell a tiny step from a converged
            # model, so only large updates are judged.
            g_to_w = (stats.last_grad_norm / stats.weight_norm if stats.weight_norm is not None
                      else np.zeros_like(r))
        stalled = ok & (r < self.stall_threshold) & (g_to_w >= self.min_grad_to_weight)
        large = ok & (r > self.large_threshold)
        layers = self.context.layers
        if len(layers) == len(r):
            # Both tests read weight matrices and kernels only. The rule of thumb is about
            # them; a norm gain starting at 1 moves lr/1 per step where a matrix entry of
            # 0.02 moves lr/0.02 (under Adam, whose steps are about lr per entry): at the
            # fine-tuning default lr 5e-5 a healthy LayerNorm's ratio is 4e-6 (measured on a
            # GPT-2 under the Hugging Face Trainer), below the stall threshold.
            matrices = np.array([layer.matrix is not False for layer in layers], dtype=bool)
            stalled &= matrices
            large &= matrices
        out = []
        for kind, mask, tracker, thr in (("stalled_update", stalled, self._stalled, self.stall_threshold),
                                         ("large_update", large, self._large, self.large_threshold)):
            counts = tracker.update(set(np.flatnonzero(mask).tolist()))
            hits = sorted(i for i, c in counts.items() if c >= self.patience)
            if hits:
                out.append(self._finding(stats, kind, hits, counts, thr, g_to_w))
        return out

    def _finding(self, stats, kind, hits, counts, thr, g_to_w) -> Finding:
        ctx = self.context
        i = hits[0]
        r = stats.update_ratio
        change = ""
        if stats.weight_change is not None and np.isfinite(stats.weight_change[i]):
            change = f"; its weights changed {100 * stats.weight_change[i]:.3g}% since the start"
        if kind == "stalled_update":
            what = (f"update/weight ratio {_fmt(r[i])} is below {_fmt(thr)} for {counts[i]} "
                    f"consecutive checks while its gradient is healthy (||g||/||W|| = "
                    f"{_fmt(g_to_w[i])}){change}. The weights of {ctx.span(hits)} barely move: "
                    "the step size, not the gradient, is too small.")
            advice = _advice.stalled(ctx)
        else:
            what = (f"update/weight ratio {_fmt(r[i])} is above {_fmt(thr)} for {counts[i]} "
                    f"consecutive checks{change}. The weights of {ctx.span(hits)} change by a "
                    "large share of their size every step.")
            advice = _advice.large_update(ctx)
        return Finding(
            kind=kind, step=stats.step, layer=stats.layers[i], value=r[i], threshold=thr,
            message=f"step {stats.step}: layer {ctx.describe(i)}: {what}", advice=advice,
            evidence={"layers": [stats.layers[j] for j in hits],
                      "update_ratio": {stats.layers[j]: r[j] for j in hits}},
        )


class _ActivationDetector(Detector):
    _site_kinds: tuple[str, ...] = ()
    _field = ""

    def __init__(self, threshold: float = 0.5, patience: int = 2) -> None:
        super().__init__()
        self.threshold = v.fraction("threshold", threshold)
        self.patience = v.positive_int("patience", patience)
        self.reset()

    def reset(self) -> None:
        self._sustained = _Sustained()

    def update(self, stats: StepStats) -> list[Finding] | None:
        sites = {name: a for name, a in stats.activations.items() if a.kind in self._site_kinds}
        if not sites:
            return None
        values = {name: getattr(a, self._field) for name, a in sites.items()}
        holding = {n for n, x in values.items() if math.isfinite(x) and x >= self.threshold}
        counts = self._sustained.update(holding)
        hits = [n for n in sites if counts.get(n, 0) >= self.patience]  # forward order
        if not hits:
            return []
        return [self._finding(stats, hits, sites, values, counts)]

    def _finding(self, stats, hits, sites, values, counts) -> Finding:
        raise NotImplementedError


class DeadUnitsDetector(_ActivationDetector):
    """ReLU layers where a large share of units output zero for a whole sampled batch.

    A unit (feature, or channel of a conv map) is dead when it is zero for every example and
    position of the batch. Sampled every ``activation_every`` steps from forward activations.

    Args:
        threshold: Fraction of dead units in a layer. Defaults to ``0.5`` (SageMaker DeadRelu's
            ``threshold_layer=50``).
        patience: Consecutive samples. Defaults to ``2``.
    """

    kinds = ("dead_units",)
    _site_kinds = ("relu",)
    _field = "dead_fraction"

    def _finding(self, stats, hits, sites, values, counts) -> Finding:
        name = hits[0]
        a = sites[name]
        others = f" Also: {', '.join(repr(h) for h in hits[1:])}." if len(hits) > 1 else ""
        message = (f"step {stats.step}: activation '{name}' (ReLU): {100 * values[name]:.3g}% of its "
                   f"{a.units} units output zero for the whole batch, for {counts[name]} "
                   f"consecutive samples; dead units pass no gradient and do not recover.{others}")
        return Finding(kind="dead_units", step=stats.step, layer=name, value=values[name],
                       threshold=self.threshold, message=message,
                       advice=_advice.dead_units(self.context),
                       evidence={"sites": {h: values[h] for h in hits}})


class SaturationDetector(_ActivationDetector):
    """Sigmoid/tanh layers whose outputs sit in the flat region, where the derivative is < 1%
    of its peak (sigmoid output outside [0.0025, 0.9975], tanh |output| > 0.995).

    Args:
        threshold: Fraction of saturated outputs in a layer. Defaults to ``0.5`` (as SageMaker
            SaturatedActivation's ``threshold_layer=50``).
        patience: Consecutive samples. Defaults to ``2``.
    """

    kinds = ("saturated_units",)
    _site_kinds = ("sigmoid", "tanh")
    _field = "saturated_fraction"

    def _finding(self, stats, hits, sites, values, counts) -> Finding:
        name = hits[0]
        a = sites[name]
        others = f" Also: {', '.join(repr(h) for h in hits[1:])}." if len(hits) > 1 else ""
        message = (f"step {stats.step}: activation '{name}' ({a.kind}): {100 * values[name]:.3g}% "
                   f"of its outputs are saturated (derivative < 1% of its peak) for {counts[name]} "
                   f"consecutive samples; almost no gradient passes through them.{others}")
        return Finding(kind="saturated_units", step=stats.step, layer=name, value=values[name],
                       threshold=self.threshold, message=message,
                       advice=_advice.saturated(self.context),
                       evidence={"sites": {h: values[h] for h in hits}})


#: Derivative below this fraction of its peak counts as saturated (adapters use it).
SATURATION_DERIVATIVE = 0.01


def default_detectors() -> list[Detector]:
    """A fresh instance of every built-in detector with its default thresholds."""
    return [
        NonFiniteDetector(),
        VanishingGradientDetector(),
        ExplodingGradientDetector(),
        LossPlateauDetector(),
        LossDivergenceDetector(),
        UpdateRatioDetector(),
        DeadUnitsDetector(),
        SaturationDetector(),
    ]
