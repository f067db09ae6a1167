"""Built-in detectors: each rule against a plain-numpy reference, the behaviours users rely on,
constructor validation, and robustness on arbitrary streams of statistics."""

from __future__ import annotations

import collections
import math
import statistics

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradwatch import (
    ActivationStats,
    DeadUnitsDetector,
    ExplodingGradientDetector,
    Finding,
    LossDivergenceDetector,
    LossPlateauDetector,
    NonFiniteDetector,
    SaturationDetector,
    StepStats,
    UpdateRatioDetector,
    VanishingGradientDetector,
    make_step_stats,
)
from gradwatch._context import empty_context

NAN = math.nan
INF = math.inf


# -- helpers ---------------------------------------------------------------------------------


def layer_names(n: int) -> tuple[str, ...]:
    return tuple(f"l{i}" for i in range(n))


def window(steps, layers, grad_norm, *, has_grad=None, loss=None, has_loss=None,
           **extras) -> StepStats:
    """A multi-step StepStats: one row per step of ``steps``, the last one being the check."""
    steps = np.asarray(steps, dtype=int)
    shape = (len(steps), len(layers))
    g = np.asarray(grad_norm, dtype=float).reshape(shape)
    hg = np.ones(shape, bool) if has_grad is None else np.asarray(has_grad, bool).reshape(shape)
    lo = np.full(len(steps), np.nan) if loss is None else np.asarray(loss, float).reshape(-1)
    hl = None if has_loss is None else np.asarray(has_loss, bool).reshape(-1)
    arrays = {k: (None if v is None else np.asarray(v, float)) for k, v in extras.items()
              if k != "activations"}
    return StepStats(step=int(steps[-1]), layers=tuple(layers), steps=steps, grad_norm=g,
                     has_grad=hg, loss=lo, has_loss=hl, grad_size=np.ones(len(layers)),
                     activations=extras.get("activations", {}), **arrays)


def bound(detector, layers=()):
    detector.bind(empty_context(tuple(layers)))
    return detector


def losses_stream(losses, *, per_check=1, start=0):
    """Single-loss steps grouped into checks of ``per_check`` steps (no layers)."""
    out = []
    for i in range(0, len(losses), per_check):
        chunk = losses[i:i + per_check]
        steps = np.arange(start + i, start + i + len(chunk))
        out.append(window(steps, (), np.zeros((len(chunk), 0)), loss=chunk))
    return out


def only(result) -> Finding:
    assert result is not None and len(result) == 1, result
    return result[0]


def first_firing(detector, stream):
    """(index of the first check with a finding, that finding), or (None, None)."""
    for i, stats in enumerate(stream):
        result = detector.update(stats)
        if result:
            return i, result[0]
    return None, None


def acts(**sites) -> dict[str, ActivationStats]:
    """``acts(a=("relu", 0.7))`` -> {"a": ActivationStats(kind="relu", <its fraction>=0.7)}."""
    out = {}
    for name, (kind, frac) in sites.items():
        field = "dead_fraction" if kind == "relu" else "saturated_fraction"
        out[name] = ActivationStats(kind=kind, units=8, **{field: frac})
    return out


# -- plain-numpy references, written from the docstrings and docs/detectors.md ---------------


def ref_window_median(stats: StepStats) -> list[float | None]:
    out: list[float | None] = []
    for j in range(len(stats.layers)):
        vals = [float(stats.grad_norm[r, j]) for r in range(len(stats.steps))
                if stats.has_grad[r, j] and math.isfinite(stats.grad_norm[r, j])]
        out.append(statistics.median(vals) if vals else None)
    return out


class RefVanishing:
    """Starved = median < abs AND median/best < rel; hits after `patience` starved checks in a row.

    Returns the starved-long-enough layer indices, split into (those preceded only by starved
    layers: a warning, those with a fed layer before them: info), or None when the check cannot
    be judged (fewer than two layers with a finite median, or best <= 0)."""

    def __init__(self, rel_threshold=1e-3, abs_threshold=1e-4, patience=3):
        self.rel, self.abs, self.patience = rel_threshold, abs_threshold, patience
        self.streak: dict[int, int] = {}

    def update(self, stats):
        med = ref_window_median(stats)
        judged = [j for j, m in enumerate(med) if m is not None]
        if len(judged) < 2 or max(med[j] for j in judged) <= 0:
            return None
        best = max(med[j] for j in judged)
        starved = {j for j in judged if med[j] < self.abs and med[j] / best < self.rel}
        self.streak = {j: self.streak.get(j, 0) + 1 for j in starved}
        hits = sorted(j for j, c in self.streak.items() if c >= self.patience)
        # From the input side, the layers preceded only by starved layers: the vanishing ones.
        prefix = set()
        for j in judged:
            if j not in starved:
                break
            prefix.add(j)
        return [j for j in hits if j in prefix], [j for j in hits if j not in prefix]


class RefExploding:
    """Sudden (vs the larger of the median of the layer's finite norms over the last `window`
    steps before this check's window and the median of its first `early_steps` norms, once that
    many steps were seen; and above spike_floor), huge, or depth ratio. Returns {layer index:
    (step, value)}, first hits."""

    def __init__(self, spike_factor=100.0, window=50, min_history=10, abs_threshold=1e3,
                 depth_ratio=70.0, patience=3, spike_floor=1.0, early_steps=100):
        self.spike, self.min_history, self.floor = spike_factor, min_history, spike_floor
        self.abs, self.depth, self.patience = abs_threshold, depth_ratio, patience
        self.rows: collections.deque[list[float | None]] = collections.deque(maxlen=window)
        self.early_steps = early_steps
        self.all_rows: list[list[float | None]] = []
        self.deep = 0

    def update(self, stats):
        n = len(stats.layers)

        def usable(r, j):
            return bool(stats.has_grad[r, j]) and math.isfinite(stats.grad_norm[r, j])

        ref = []
        early_rows = self.all_rows[:self.early_steps]
        for j in range(n):
            seen = [row[j] for row in self.rows if row[j] is not None]
            ref.append(statistics.median(seen) if len(seen) >= self.min_history else None)
            first = [row[j] for row in early_rows if row[j] is not None]
            if ref[j] is not None and len(early_rows) == self.early_steps and first:
                ref[j] = max(ref[j], statistics.median(first))
        hits: dict[int, tuple[int, float]] = {}
        for r, step in enumerate(stats.steps):
            for j in range(n):
                if not usable(r, j):
                    continue
                g = float(stats.grad_norm[r, j])
                if (ref[j] is not None and ref[j] > 0 and g > self.spike * ref[j]
                        and g > self.floor):
                    hits.setdefault(j, (int(step), g))
                if g > self.abs:
                    hits.setdefault(j, (int(step), g))
        for r in range(len(stats.steps)):
            self.rows.append([float(stats.grad_norm[r, j]) if usable(r, j) else None
                              for j in range(n)])
            self.all_rows.append(self.rows[-1])
        live = [j for j in range(n) if usable(-1, j)]
        g = stats.grad_norm[-1]
        if len(live) >= 2 and g[live[-1]] > 0 and g[live[0]] / g[live[-1]] > self.depth:
            self.deep += 1
        else:
            self.deep = 0
        if self.deep >= self.patience:
            hits.setdefault(live[0], (stats.step, float(g[live[0]] / g[live[-1]])))
        return hits


def ref_nonfinite_scan(stats):
    """(step, acceptable layer names) of the first bad step of the window, or None."""
    last = len(stats.steps) - 1
    for r in range(len(stats.steps)):
        with_grad = [j for j in range(len(stats.layers)) if stats.has_grad[r, j]]
        bad = [j for j in with_grad if not math.isfinite(stats.grad_norm[r, j])]
        loss_bad = bool(stats.has_loss[r]) and not math.isfinite(stats.loss[r])
        w = stats.weight_nonfinite
        # Bad weights after a step whose gradient was bad in that layer are its consequence.
        w_bad = [j for j in range(len(stats.layers))
                 if r == last and w is not None and w[j] > 0 and j not in bad]
        if bad or loss_bad or w_bad:
            if w_bad:
                layer = stats.layers[w_bad[0]]
            elif bad and not (loss_bad and len(bad) == len(with_grad)):
                layer = stats.layers[bad[-1]]
            else:
                layer = None
            return int(stats.steps[r]), layer
    return None


class RefNonFinite:
    def __init__(self):
        self.active = None

    def update(self, stats):
        """(step, layer, persisted) or None when everything was finite."""
        found = ref_nonfinite_scan(stats)
        if found is None:
            self.active = None
            return None
        persisted = self.active is not None
        if not persisted:
            self.active = found
        return (*self.active, persisted)


class RefPlateau:
    """Block means; improvement beyond max(min_delta, min_delta_rel*|best|); patience; cooldown.
    Stuck: the best block within 10 % of the start (the smaller of the first loss and the
    median of the first 3); a stuck
    run also fires once `patience` steps have passed since its first loss, and an improvement
    that leaves it stuck does not clear it.

    Returns None (no block completed), False (judged, quiet) or (step, waited, stuck)."""

    def __init__(self, window=25, patience=200, min_delta=1e-4, min_delta_rel=1e-2,
                 cooldown=100):
        self.window, self.patience, self.min_delta = window, patience, min_delta
        self.min_delta_rel, self.cooldown = min_delta_rel, cooldown
        self.block: list[float] = []
        self.head: list[float] = []
        self.first_step = None
        self.first = self.best = None
        self.best_step = self.last_step = 0
        self.active = False
        self.quiet_until = -math.inf

    def stuck(self):
        start = min(self.head[0], statistics.median(self.head))
        return self.best > start - 0.1 * abs(start)

    def update(self, stats):
        evaluated = False
        for step, x, seen in zip(stats.steps, stats.loss, stats.has_loss):
            if not (seen and math.isfinite(x)):
                continue
            if self.first_step is None:
                self.first_step = int(step)
            if len(self.head) < 3:
                self.head.append(float(x))
            self.block.append(float(x))
            if len(self.block) < self.window:
                continue
            mean = sum(self.block) / len(self.block)
            self.block = []
            evaluated, self.last_step = True, int(step)
            if self.first is None:
                self.first, self.best, self.best_step = mean, mean, int(step)
                continue
            if self.best - mean > max(self.min_delta, self.min_delta_rel * abs(self.best)):
                was_stuck = self.stuck()
                self.best, self.best_step = mean, int(step)
                if self.active and not (was_stuck and self.stuck()):
                    self.active = False
                    self.quiet_until = int(step) + self.cooldown
        if not evaluated:
            return None
        waited = self.last_step - self.best_step
        stuck = self.stuck()
        if waited < self.patience and stuck and self.last_step - self.first_step >= self.patience:
            waited = self.last_step - self.first_step
        if waited < self.patience or self.last_step <= self.quiet_until:
            return False
        self.active = True
        return self.last_step, waited, stuck


class RefDivergence:
    """Jump (median of last spike_steps vs median of up to `window` older losses — at least
    min_history of them — and > start) or rise (median of last min_history vs
    rise_factor * median of the first min_history), judged once those first losses are in.
    Returns None (no finite loss), False, or (step, value)."""

    def __init__(self, spike_factor=10.0, spike_steps=5, window=50, min_history=10,
                 rise_factor=1.5):
        self.spike, self.s, self.window = spike_factor, spike_steps, window
        self.m, self.rise = min_history, rise_factor
        self.losses: list[float] = []

    def update(self, stats):
        obs = [(int(s), float(x)) for s, x, h in zip(stats.steps, stats.loss, stats.has_loss)
               if h and math.isfinite(x)]
        if not obs:
            return None
        hit = False
        for step, x in obs:
            self.losses.append(x)
            n = len(self.losses)
            history = self.losses[max(0, n - self.s - self.window):max(0, n - self.s)]
            if hit or n < self.m:
                continue
            start = statistics.median(self.losses[:self.m])
            rise = statistics.median(self.losses[-self.m:])
            if len(history) >= self.m and n >= self.s:
                med = statistics.median(history)
                jump = statistics.median(self.losses[-self.s:])
                if med > 0 and jump > self.spike * med and jump > start:
                    hit = (step, jump)
                    continue
            if start > 0 and rise > self.rise * start:
                hit = (step, rise)
        return hit


class RefUpdateRatio:
    """Stalled: r < stall and ||g||/||W|| >= min_g2w; large: r > large; patience checks each."""

    def __init__(self, stall_threshold=1e-5, large_threshold=0.1, min_grad_to_weight=1e-3,
                 patience=3):
        self.stall, self.large, self.g2w = stall_threshold, large_threshold, min_grad_to_weight
        self.patience = patience
        self.streaks = {"stalled_update": {}, "large_update": {}}

    def update(self, stats):
        if stats.update_ratio is None or stats.weight_norm is None:
            return None
        cond = {"stalled_update": set(), "large_update": set()}
        for j in range(len(stats.layers)):
            r = float(stats.update_ratio[j])
            if not (stats.has_grad[-1, j] and math.isfinite(r)):
                continue
            g, w = float(stats.grad_norm[-1, j]), float(stats.weight_norm[j])
            if r < self.stall and w > 0 and g / w >= self.g2w:
                cond["stalled_update"].add(j)
            if r > self.large:
                cond["large_update"].add(j)
        out = {}
        for kind, holding in cond.items():
            old = self.streaks[kind]
            self.streaks[kind] = {j: old.get(j, 0) + 1 for j in holding}
            hits = sorted(j for j, c in self.streaks[kind].items() if c >= self.patience)
            if hits:
                out[kind] = hits
        return out


class RefActivation:
    def __init__(self, kinds, field, threshold=0.5, patience=2):
        self.kinds, self.field, self.threshold, self.patience = kinds, field, threshold, patience
        self.streak: dict[str, int] = {}

    def update(self, stats):
        sites = [(n, a) for n, a in stats.activations.items() if a.kind in self.kinds]
        if not sites:
            return None
        holding = {n for n, a in sites
                   if math.isfinite(getattr(a, self.field))
                   and getattr(a, self.field) >= self.threshold}
        self.streak = {n: self.streak.get(n, 0) + 1 for n in holding}
        return [n for n, _ in sites if self.streak.get(n, 0) >= self.patience]


# -- random streams for the reference comparisons ---------------------------------------------


def vanishing_stream(rng, n_checks=60):
    n = int(rng.integers(2, 7))
    layers = layer_names(n)
    frozen = rng.random(n) < 0.15
    regime = rng.integers(0, 3, size=n)  # 0 healthy, 1 starved, 2 near the absolute threshold
    stream, step = [], 0
    for _ in range(n_checks):
        switch = rng.random(n) < 0.15
        regime = np.where(switch, rng.integers(0, 3, size=n), regime)
        rows = int(rng.integers(1, 5))
        steps = np.arange(step, step + rows)
        step += rows
        lo = np.select([regime == 0, regime == 1], [-2, -10], -5.5)
        hi = np.select([regime == 0, regime == 1], [1, -6], -3.5)
        g = 10 ** rng.uniform(lo, hi, size=(rows, n))
        if rng.random() < 0.1:  # converged: every layer uniformly tiny
            g = 10 ** rng.uniform(-9, -7) * 10 ** rng.normal(0, 0.1, size=(rows, n))
        g[rng.random((rows, n)) < 0.03] = 0.0
        g[rng.random((rows, n)) < 0.03] = rng.choice([NAN, INF])
        hg = ~frozen & (rng.random((rows, n)) > 0.05)
        if rng.random() < 0.05:
            hg[:] = False
        g = np.where(hg, g, rng.choice([NAN, 0.0]))
        stream.append(window(steps, layers, g, has_grad=hg))
    return layers, stream


def exploding_stream(rng, n_checks=60):
    n = int(rng.integers(2, 6))
    layers = layer_names(n)
    frozen = np.zeros(n, bool)
    if rng.random() < 0.3:
        frozen[rng.integers(0, n)] = True
    base = 10 ** rng.uniform(-0.5, 0.5, size=n)
    deep = False
    stream, step = [], 0
    for _ in range(n_checks):
        rows = int(rng.integers(1, 6))
        steps = np.arange(step, step + rows)
        step += rows
        deep = (rng.random() < 0.3) if not deep else (rng.random() < 0.8)
        g = base * 10 ** rng.normal(0, 0.15, size=(rows, n))
        if deep:
            g[:, 0] *= 10 ** rng.uniform(1.5, 2.5)
        spikes = rng.random((rows, n)) < 0.03
        g[spikes] *= 10 ** rng.uniform(1, 3.5, size=spikes.sum())
        huge = rng.random((rows, n)) < 0.01
        g[huge] = 10 ** rng.uniform(2.5, 4, size=huge.sum())
        g[rng.random((rows, n)) < 0.03] = rng.choice([NAN, INF])
        hg = ~frozen & (rng.random((rows, n)) > 0.1)
        stream.append(window(steps, layers, np.where(hg, g, NAN), has_grad=hg))
    return layers, stream


def nonfinite_stream(rng, n_checks=40):
    n = int(rng.integers(0, 6))
    layers = layer_names(n)
    stream, step = [], 0
    for _ in range(n_checks):
        rows = int(rng.integers(1, 5))
        steps = np.arange(step, step + rows)
        step += rows
        hg = rng.random((rows, n)) < 0.85
        g = 10 ** rng.uniform(-3, 1, size=(rows, n))
        loss = rng.uniform(0.1, 2.0, size=rows)
        has_loss = rng.random(rows) < 0.8
        w_bad = None
        if rng.random() < 0.5:  # an unhealthy check
            p = rng.choice([0.2, 1.0])
            mask = rng.random((rows, n)) < p
            g[mask] = rng.choice([NAN, INF, -INF], size=mask.sum())
            bad_loss = rng.random(rows) < 0.2
            loss[bad_loss] = rng.choice([NAN, INF], size=bad_loss.sum())
            if rng.random() < 0.3:
                w_bad = (rng.random(n) < 0.3) * rng.integers(1, 50, size=n)
        loss = np.where(has_loss | (rng.random(rows) < 0.5), loss, NAN)
        g = np.where(hg | (rng.random((rows, n)) < 0.5), g, NAN)  # NaN where no grad, mostly
        weights = w_bad if w_bad is not None else (np.zeros(n) if rng.random() < 0.5 else None)
        stream.append(window(steps, layers, g, has_grad=hg, loss=loss, has_loss=has_loss,
                             weight_nonfinite=weights))
    return layers, stream


def plateau_losses(rng, n=600):
    x, out = 1.0 * 10 ** rng.uniform(-1, 1), []
    while len(out) < n:
        kind, length = rng.choice(["decay", "flat", "rise"], p=[0.45, 0.45, 0.1]), \
            int(rng.integers(5, 120))
        target = x * {"decay": rng.uniform(0.2, 0.97), "flat": 1.0,
                      "rise": rng.uniform(1.02, 1.5)}[kind]
        for t in range(length):
            level = x + (target - x) * (t + 1) / length
            out.append(level * (1 + rng.normal(0, 0.01)))
        x = target
    return np.array(out[:n])


def divergence_losses(rng, warmup, n=500):
    out = list(rng.uniform(0.95, 1.05, size=warmup))
    level = 1.0
    while len(out) < n:
        kind = rng.choice(["flat", "decay", "spike", "jump", "rise"], p=[.3, .2, .2, .15, .15])
        if kind == "flat":
            out += list(level * rng.uniform(0.95, 1.05, size=int(rng.integers(5, 60))))
        elif kind == "decay":
            target = level * 10 ** rng.uniform(-3, -0.5)
            length = int(rng.integers(10, 80))
            out += list(np.geomspace(level, target, length) * rng.uniform(0.97, 1.03, length))
            level = target
        elif kind == "spike":
            out.append(level * 10 ** rng.uniform(0.3, 3))
        elif kind == "jump":
            length = int(rng.integers(1, 15))
            out += list(level * 10 ** rng.uniform(0.5, 2) * rng.uniform(0.95, 1.05, length))
        else:
            target = level * rng.uniform(1.2, 3)
            length = int(rng.integers(10, 60))
            out += list(np.linspace(level, target, length))
            level = target
    return np.array(out[:n])


def checks_of(rng, losses, *, drop=0.05, nan=0.02):
    """Group per-step losses into checks of 1..6 steps, with some unobserved and NaN losses."""
    stream, i = [], 0
    while i < len(losses):
        rows = int(rng.integers(1, 7))
        chunk = np.array(losses[i:i + rows], float)
        steps = np.arange(i, i + len(chunk))
        has_loss = rng.random(len(chunk)) > drop
        chunk[rng.random(len(chunk)) < nan] = NAN
        stream.append(window(steps, (), np.zeros((len(chunk), 0)),
                             loss=np.where(has_loss, chunk, NAN), has_loss=has_loss))
        i += rows
    return stream


def update_ratio_stream(rng, n_checks=60):
    n = int(rng.integers(1, 6))
    layers = layer_names(n)
    frozen = rng.random(n) < 0.15
    regime = rng.integers(0, 5, size=n)
    stream = []
    for c in range(n_checks):
        regime = np.where(rng.random(n) < 0.15, rng.integers(0, 5, size=n), regime)
        # healthy, tiny learning rate, vanishing gradient, too large, near the thresholds
        r = np.choose(regime, [1e-3 * 10 ** rng.uniform(-1, 1, n), 10 ** rng.uniform(-9, -5.2, n),
                               10 ** rng.uniform(-12, -8, n), 10 ** rng.uniform(-0.9, 0.5, n),
                               10 ** rng.uniform(-5.3, -4.7, n)])
        g = np.choose(regime, [10 ** rng.uniform(-1, 1, n), 10 ** rng.uniform(-1, 1, n),
                               10 ** rng.uniform(-10, -6, n), 10 ** rng.uniform(-1, 1, n),
                               10 ** rng.uniform(-3.5, -1.5, n)])
        w = 10 ** rng.uniform(0, 1.5, n)
        r[rng.random(n) < 0.05] = NAN
        hg = ~frozen & (rng.random(n) > 0.05)
        r = np.where(hg, r, 0.0)
        measured = rng.random() > 0.05
        stream.append(window([c], layers, np.where(hg, g, NAN), has_grad=hg,
                             update_ratio=r if measured else None,
                             weight_norm=w if measured else None))
    return layers, stream


def activation_stream(rng, kinds, n_checks=50):
    n = int(rng.integers(1, 6))
    sites = [(f"act{i}", str(rng.choice(kinds))) for i in range(n)]
    high = rng.random(n) < 0.5
    stream = []
    for c in range(n_checks):
        high ^= rng.random(n) < 0.2
        present = {}
        if rng.random() > 0.1:
            for (name, kind), hi in zip(sites, high):
                if rng.random() < 0.05:
                    continue  # a site missing from this sample
                frac = rng.choice([0.5, 0.7, 1.0, NAN]) if rng.random() < 0.15 else (
                    rng.uniform(0.6, 1.0) if hi else rng.uniform(0.0, 0.5))
                present[name] = (kind, float(frac))
        stream.append(make_step_stats(c, (), [], activations=acts(**present)))
    return stream


SEEDS = [pytest.param(seed, id=f"seed{seed}") for seed in range(12)]


# -- VanishingGradientDetector ---------------------------------------------------------------


class TestVanishingGradient:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        layers, stream = vanishing_stream(rng)
        params = dict(rel_threshold=float(rng.choice([1e-3, 1e-2])),
                      abs_threshold=float(rng.choice([1e-4, 1e-5])),
                      patience=int(rng.integers(1, 5)))
        det, ref = bound(VanishingGradientDetector(**params), layers), RefVanishing(**params)
        for stats in stream:
            result, expected = det.update(stats), ref.update(stats)
            if not expected or not any(expected):
                assert not result, (stats.step, result)
                continue
            by_severity = {f.severity: f for f in result}
            assert len(by_severity) == len(result)
            for severity, want in zip(("warning", "info"), expected):
                if not want:
                    assert severity not in by_severity
                    continue
                f = by_severity[severity]
                assert (f.kind, f.step, f.layer) == ("vanishing_gradient", stats.step,
                                                     layers[want[0]])
                assert f.evidence["layers"] == [layers[j] for j in want]

    @pytest.mark.parametrize("patience", [pytest.param(p, id=f"patience-{p}") for p in (1, 3, 5)])
    def test_fires_after_patience_consecutive_starved_checks(self, patience):
        det = bound(VanishingGradientDetector(patience=patience), layer_names(3))
        results = [det.update(make_step_stats(s, layer_names(3), [1e-9, 0.5, 1.0]))
                   for s in range(patience + 2)]
        assert [bool(r) for r in results] == [False] * (patience - 1) + [True] * 3
        f = results[patience - 1][0]
        assert (f.layer, f.step, f.evidence["checks"]) == ("l0", patience - 1, patience)

    def test_a_healthy_check_restarts_the_count(self):
        det = bound(VanishingGradientDetector(patience=3), layer_names(2))
        norms = [1e-9, 1e-9, 1.0, 1e-9, 1e-9, 1e-9]
        results = [det.update(make_step_stats(s, layer_names(2), [g, 1.0]))
                   for s, g in enumerate(norms)]
        assert [bool(r) for r in results] == [False] * 5 + [True]

    @pytest.mark.parametrize("norms, fires", [
        pytest.param([1e-6, 1e-5], False, id="absolute-only-every-layer-small"),
        pytest.param([1e-3, 10.0], False, id="relative-only-still-learning"),
        pytest.param([1e-6, 10.0], True, id="both-absolute-and-relative"),
        pytest.param([0.0, 1.0], True, id="exactly-zero-gradient-is-starved"),
    ])
    def test_needs_both_absolute_and_relative_tests(self, norms, fires):
        det = bound(VanishingGradientDetector(patience=1), layer_names(2))
        result = det.update(make_step_stats(7, layer_names(2), norms))
        assert bool(result) is fires
        if fires:
            assert only(result).layer == "l0"

    def test_converged_model_with_uniformly_tiny_gradients_is_not_vanishing(self):
        det = bound(VanishingGradientDetector(patience=1), layer_names(6))
        rng = np.random.default_rng(0)
        for step in range(50):
            assert det.update(make_step_stats(step, layer_names(6),
                                              1e-8 * rng.uniform(0.5, 2, 6))) == []

    @pytest.mark.parametrize("frozen_norm", [pytest.param(0.0, id="zero"),
                                             pytest.param(NAN, id="nan")])
    def test_layers_without_gradient_are_never_vanishing(self, frozen_norm):
        det = bound(VanishingGradientDetector(patience=1), layer_names(3))
        for step in range(10):
            stats = make_step_stats(step, layer_names(3), [frozen_norm, 1e-9, 1.0],
                                    has_grad=[False, True, True])
            assert only(det.update(stats)).evidence["layers"] == ["l1"]

    def test_uses_the_window_median_not_single_steps(self):
        det = bound(VanishingGradientDetector(patience=1), layer_names(2))
        one_quiet_step = window([0, 1, 2], layer_names(2), [[1e-9, 1], [0.5, 1], [0.5, 1]])
        assert det.update(one_quiet_step) == []
        mostly_quiet = window([3, 4, 5], layer_names(2), [[1e-9, 1], [0.5, 1], [1e-9, 1]])
        f = only(det.update(mostly_quiet))
        assert (f.step, f.layer, f.value) == (5, "l0", 1e-9)

    def test_non_finite_and_missing_steps_are_left_out_of_the_median(self):
        det = bound(VanishingGradientDetector(patience=1), layer_names(2))
        stats = window([0, 1, 2], layer_names(2), [[NAN, 1], [INF, 1], [1e-9, 1]],
                       has_grad=[[True, True], [True, True], [True, True]])
        assert only(det.update(stats)).value == 1e-9

    def test_names_the_input_most_starved_layer_and_lists_all(self):
        det = bound(VanishingGradientDetector(patience=1), layer_names(5))
        f = only(det.update(make_step_stats(0, layer_names(5), [0.3, 1e-8, 1e-9, 1.0, 1e-7])))
        assert f.layer == "l1"
        assert f.evidence["layers"] == ["l1", "l2", "l4"]
        assert f.evidence["largest_layer"] == "l3"

    def test_check_without_gradient_is_not_judged(self):
        """Nothing to judge must be None, so the monitor does not clear the condition."""
        det = bound(VanishingGradientDetector(patience=1), layer_names(2))
        assert det.update(make_step_stats(0, layer_names(2), [1e-9, 1.0]))
        no_gradient = make_step_stats(1, layer_names(2), [NAN, NAN], has_grad=[False, False])
        assert det.update(no_gradient) is None


# -- ExplodingGradientDetector ---------------------------------------------------------------


class TestExplodingGradient:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        layers, stream = exploding_stream(rng)
        win = int(rng.integers(3, 21))
        params = dict(spike_factor=float(10 ** rng.uniform(0.5, 2)), window=win,
                      min_history=int(rng.integers(1, win + 1)), abs_threshold=1e3,
                      depth_ratio=70.0, patience=int(rng.integers(1, 4)))
        det, ref = bound(ExplodingGradientDetector(**params), layers), RefExploding(**params)
        fired = 0
        for stats in stream:
            result, expected = det.update(stats), ref.update(stats)
            if not expected:
                assert result == [], stats.step
                continue
            fired += 1
            f, first = only(result), min(expected)
            assert (f.kind, f.layer, f.step) == ("exploding_gradient", layers[first],
                                                 expected[first][0])
            assert f.value == pytest.approx(expected[first][1])
            assert f.evidence["layers"] == [layers[j] for j in sorted(expected)]
        assert fired

    def test_sudden_spike_against_history(self):
        det = bound(ExplodingGradientDetector(min_history=10), layer_names(2))
        for step in range(10):
            assert det.update(make_step_stats(step, layer_names(2), [1.0, 1.0])) == []
        assert det.update(make_step_stats(10, layer_names(2), [1.0, 90.0])) == []
        f = only(det.update(make_step_stats(11, layer_names(2), [1.0, 150.0])))
        assert (f.layer, f.step, f.value, f.threshold) == ("l1", 11, 150.0, 100.0)

    def test_no_sudden_test_before_min_history(self):
        det = bound(ExplodingGradientDetector(min_history=10), layer_names(1))
        for step in range(9):
            det.update(make_step_stats(step, layer_names(1), [1.0]))
        assert det.update(make_step_stats(9, layer_names(1), [500.0])) == []

    def test_reports_the_step_of_a_spike_inside_the_window(self):
        det = bound(ExplodingGradientDetector(min_history=5, window=10), layer_names(2))
        det.update(window(range(10), layer_names(2), np.ones((10, 2))))
        g = np.ones((5, 2))
        g[2, 0] = 1000.0
        g[3, 1] = 500.0
        f = only(det.update(window(range(10, 15), layer_names(2), g)))
        assert (f.layer, f.step) == ("l0", 12)
        assert f.evidence["layers"] == ["l0", "l1"]
        assert f.evidence["values"] == {"l0": 1000.0, "l1": 500.0}

    def test_absolute_threshold_needs_no_history(self):
        det = bound(ExplodingGradientDetector(abs_threshold=1e3), layer_names(3))
        f = only(det.update(make_step_stats(0, layer_names(3), [1.0, 2e3, 1.0])))
        assert (f.layer, f.value, f.threshold) == ("l1", 2e3, 1e3)
        det.reset()
        assert det.update(make_step_stats(0, layer_names(3), [1.0, 999.0, 1.0])) == []

    def test_depth_ratio_must_be_sustained_for_patience_checks(self):
        det = bound(ExplodingGradientDetector(patience=3, depth_ratio=70), layer_names(3))
        grows = [100.0, 10.0, 1.0]
        flat = [1.0, 1.0, 1.0]
        norms = [grows, grows, flat, grows, grows, grows, grows]
        results = [det.update(make_step_stats(s, layer_names(3), g)) for s, g in enumerate(norms)]
        assert [bool(r) for r in results] == [False] * 5 + [True] * 2
        f = results[5][0]
        assert (f.layer, f.step, f.value, f.threshold) == ("l0", 5, 100.0, 70.0)

    def test_depth_ratio_uses_the_layers_that_got_a_gradient(self):
        det = bound(ExplodingGradientDetector(patience=1), layer_names(4))
        # stale norms where has_grad is False would make l0/l3 the pair compared
        stats = make_step_stats(0, layer_names(4), [1.0, 100.0, 1.0, 1e-6],
                                has_grad=[False, True, True, False])
        f = only(det.update(stats))
        assert (f.layer, f.value) == ("l1", 100.0)

    def test_a_rise_through_the_window_does_not_raise_its_own_reference(self):
        det = bound(ExplodingGradientDetector(window=4, min_history=2), layer_names(1))
        det.update(window(range(4), layer_names(1), [1.0] * 4))
        f = only(det.update(window(range(4, 8), layer_names(1), [90.0, 95.0, 99.0, 150.0])))
        assert (f.step, f.value, f.threshold) == (7, 150.0, 100.0)

    def test_sudden_test_needs_min_history_finite_norms_in_the_window(self):
        det = bound(ExplodingGradientDetector(window=10, min_history=5), layer_names(2))
        for step in range(30):  # l0 gets a gradient on 3 or 4 of any 10 steps
            fed = step % 3 == 0
            det.update(make_step_stats(step, layer_names(2), [1.0 if fed else NAN, 1.0],
                                       has_grad=[fed, True]))
        assert det.update(make_step_stats(30, layer_names(2), [500.0, 1.0])) == []
        assert only(det.update(make_step_stats(31, layer_names(2), [1.0, 500.0]))).layer == "l1"


# -- NonFiniteDetector -----------------------------------------------------------------------


class TestNonFinite:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        layers, stream = nonfinite_stream(rng)
        det, ref = bound(NonFiniteDetector(), layers), RefNonFinite()
        previous = None
        for stats in stream:
            result, expected = det.update(stats), ref.update(stats)
            if expected is None:
                assert result == []
                previous = None
                continue
            f = only(result)
            step, layer, persisted = expected
            assert (f.kind, f.step, f.layer) == ("nonfinite", step, layer)
            if persisted:
                assert f is previous
            previous = f

    def test_reports_the_first_bad_step_inside_the_window(self):
        det = bound(NonFiniteDetector(), layer_names(2))
        g = [[1, 1], [1, 1], [1, NAN], [NAN, NAN], [NAN, NAN]]
        f = only(det.update(window(range(10, 15), layer_names(2), g)))
        assert (f.step, f.layer) == (12, "l1")

    def test_names_the_bad_layer_nearest_the_output(self):
        det = bound(NonFiniteDetector(), layer_names(4))
        f = only(det.update(make_step_stats(3, layer_names(4), [1, INF, NAN, 1], loss=NAN)))
        assert f.layer == "l2"
        assert f.evidence["layers"] == ["l1", "l2"]

    def test_every_layer_bad_with_finite_loss_names_the_last_layer(self):
        det = bound(NonFiniteDetector(), layer_names(3))
        f = only(det.update(make_step_stats(3, layer_names(3), [NAN, NAN, NAN], loss=0.5)))
        assert f.layer == "l2"

    def test_names_a_layer_with_non_finite_weights_first(self):
        det = bound(NonFiniteDetector(), layer_names(4))
        stats = make_step_stats(3, layer_names(4), [1, 1, 1, NAN], loss=1.0,
                                weight_nonfinite=[0, 7, 2, 0])
        f = only(det.update(stats))
        assert (f.layer, f.value) == ("l1", 7.0)

    @pytest.mark.parametrize("grads, has_grad", [
        pytest.param([NAN, INF, NAN], None, id="all-layers-bad"),
        pytest.param([NAN, NAN, 0.0], [True, True, False], id="all-layers-with-grad-bad"),
        pytest.param([1.0, 1.0, 1.0], None, id="only-loss-bad"),
    ])
    def test_no_layer_when_the_loss_is_bad_and_all_layers_are(self, grads, has_grad):
        det = bound(NonFiniteDetector(), layer_names(3))
        f = only(det.update(make_step_stats(4, layer_names(3), grads, has_grad=has_grad,
                                            loss=INF)))
        assert (f.step, f.layer, f.value) == (4, None, INF)

    def test_stays_one_condition_while_nan_persists(self):
        det = bound(NonFiniteDetector(), layer_names(3))
        first = only(det.update(make_step_stats(10, layer_names(3), [1, NAN, 1], loss=1.0)))
        spread = make_step_stats(20, layer_names(3), [NAN, NAN, NAN], loss=NAN)
        assert det.update(spread)[0] is first
        assert det.update(make_step_stats(30, layer_names(3), [NAN, 1, 1]))[0] is first
        assert det.update(make_step_stats(40, layer_names(3), [1, 1, 1], loss=1.0)) == []
        again = only(det.update(make_step_stats(50, layer_names(3), [NAN, 1, 1])))
        assert (again.step, again.layer) == (50, "l0")

    def test_nan_loss_not_observed_is_not_a_finding(self):
        det = bound(NonFiniteDetector(), layer_names(2))
        stats = make_step_stats(0, layer_names(2), [1.0, 1.0], loss=NAN, has_loss=False)
        assert det.update(stats) == []
        assert only(det.update(make_step_stats(1, layer_names(2), [1.0, 1.0],
                                               loss=NAN))).step == 1

    def test_nan_norm_of_a_layer_without_gradient_is_not_a_finding(self):
        det = bound(NonFiniteDetector(), layer_names(2))
        stats = make_step_stats(0, layer_names(2), [NAN, 1.0], has_grad=[False, True])
        assert det.update(stats) == []

    def test_weights_are_judged_at_the_check_step(self):
        det = bound(NonFiniteDetector(), layer_names(2))
        stats = window([5, 6, 7], layer_names(2), np.ones((3, 2)), loss=[1, 1, 1],
                       weight_nonfinite=[0, 3])
        f = only(det.update(stats))
        assert (f.step, f.layer) == (7, "l1")


# -- LossPlateauDetector ---------------------------------------------------------------------


class TestLossPlateau:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        win = int(rng.integers(1, 7))
        params = dict(window=win, patience=int(rng.integers(win, 8 * win + 30)),
                      min_delta=float(rng.choice([0.0, 10 ** rng.uniform(-5, -2)])),
                      min_delta_rel=float(10 ** rng.uniform(-4, -1.5)),
                      cooldown=int(rng.integers(0, 60)))
        det, ref = bound(LossPlateauDetector(**params)), RefPlateau(**params)
        for stats in checks_of(rng, plateau_losses(rng)):
            result, expected = det.update(stats), ref.update(stats)
            if expected is None or expected is False:
                assert result == (None if expected is None else []), stats.step
                continue
            f = only(result)
            step, waited, stuck = expected
            assert (f.kind, f.step, f.value, f.layer) == ("loss_plateau", step, waited, None)
            assert f.evidence["stuck"] is stuck

    def test_fires_once_patience_steps_pass_without_improvement(self):
        det = bound(LossPlateauDetector(window=5, patience=20))
        results = [det.update(s) for s in losses_stream([1.0] * 40)]
        fired = [i for i, r in enumerate(results) if r]
        assert fired[0] == 24  # best block ends at step 4; 20 steps later
        assert all(results[i] is None for i in range(40) if i % 5 != 4)
        assert all(results[i] == [] for i in range(4, 24, 5))
        assert only(results[24]).value == 20

    @pytest.mark.parametrize("kwargs, start, per_block, fires", [
        pytest.param(dict(min_delta=1e-3, min_delta_rel=1e-7), 100.0, 1e-4, True,
                     id="absolute-step-below-min_delta"),
        pytest.param(dict(min_delta=1e-4, min_delta_rel=1e-7), 0.01, 5e-4, False,
                     id="absolute-step-above-min_delta"),
        pytest.param(dict(min_delta=0.0, min_delta_rel=1e-2), 100.0, 0.1, True,
                     id="relative-step-below-min_delta_rel"),
        pytest.param(dict(min_delta=0.0, min_delta_rel=1e-3), 10.0, 0.5, False,
                     id="relative-step-above-min_delta_rel"),
    ])
    def test_improvement_tolerance(self, kwargs, start, per_block, fires):
        # block means fall by `per_block`; patience spans 6 blocks. The runs that do not fire
        # fall far below 90 % of their start: one that creeps within 10 % of it is stuck.
        det = bound(LossPlateauDetector(window=5, patience=30, cooldown=0, **kwargs))
        losses = [start - per_block * (i // 5) for i in range(100)]
        assert any(det.update(s) for s in losses_stream(losses)) is fires

    @pytest.mark.parametrize("cooldown, refires_at", [pytest.param(0, 7, id="no-cooldown"),
                                                      pytest.param(10, 15, id="cooldown-10")])
    def test_cooldown_after_the_plateau_clears(self, cooldown, refires_at):
        det = bound(LossPlateauDetector(window=1, patience=3, min_delta=0.0, min_delta_rel=0.01,
                                        cooldown=cooldown))
        results = [det.update(s) for s in losses_stream([1.0] * 4 + [0.5] * 20)]
        assert [i for i, r in enumerate(results) if r][:2] == [3, refires_at]
        assert results[4] == []  # cleared by the improvement

    def test_cooldown_only_follows_a_plateau_that_was_reported(self):
        det = bound(LossPlateauDetector(window=1, patience=3, min_delta=0.0, cooldown=50))
        results = [det.update(s) for s in losses_stream([1.0, 1.0, 0.5] + [0.5] * 10)]
        assert [i for i, r in enumerate(results) if r][0] == 5

    @pytest.mark.parametrize("losses, stuck", [
        pytest.param([1.0] * 60, True, id="flat-from-the-start"),
        pytest.param([1.0] * 5 + [0.95] * 55, True, id="within-10-percent"),
        pytest.param(list(np.geomspace(1.0, 0.1, 20)) + [0.1] * 60, False, id="fell-then-flat"),
    ])
    def test_says_stuck_or_converged(self, losses, stuck):
        det = bound(LossPlateauDetector(window=5, patience=20))
        f = next(r[0] for r in (det.update(s) for s in losses_stream(losses)) if r)
        assert f.evidence["stuck"] is stuck
        assert ("stuck" in f.message) is stuck
        assert ("converged" in f.message) is not stuck

    def test_returns_none_until_a_block_completes(self):
        det = bound(LossPlateauDetector(window=5, patience=5))
        no_loss = window([0, 1], (), np.zeros((2, 0)), loss=[NAN, NAN])
        assert det.update(no_loss) is None
        assert det.update(window([2, 3, 4], (), np.zeros((3, 0)), loss=[1, 1, 1])) is None
        assert det.update(window([5, 6], (), np.zeros((2, 0)), loss=[1, 1])) == []

    def test_blocks_cross_checks_and_skip_unobserved_losses(self):
        det = bound(LossPlateauDetector(window=3, patience=3))
        stats = [window([0, 1], (), np.zeros((2, 0)), loss=[1, 1]),
                 window([2, 3], (), np.zeros((2, 0)), loss=[1, 50.0], has_loss=[True, False]),
                 window([4, 5, 6], (), np.zeros((3, 0)), loss=[1, 1, INF]),
                 window([7, 8], (), np.zeros((2, 0)), loss=[1, 1])]
        results = [det.update(s) for s in stats]
        # blocks: steps 0, 1, 2 (50.0 at step 3 unobserved) and steps 4, 5, 7 (Inf skipped)
        assert results[:3] == [None, [], None]
        f = only(results[3])
        assert (f.step, f.value) == (7, 5)


# -- LossDivergenceDetector ------------------------------------------------------------------


class TestLossDivergence:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        m = int(rng.integers(2, 13))
        params = dict(spike_factor=float(10 ** rng.uniform(0.5, 1.5)),
                      spike_steps=int(rng.integers(1, 15)), window=int(rng.integers(m, 61)),
                      min_history=m, rise_factor=float(rng.uniform(1.3, 3)))
        det, ref = bound(LossDivergenceDetector(**params)), RefDivergence(**params)
        warmup = m + params["spike_steps"] + 3
        for stats in checks_of(rng, divergence_losses(rng, warmup)):
            result, expected = det.update(stats), ref.update(stats)
            if expected is None or expected is False:
                assert result == (None if expected is None else []), stats.step
                continue
            f = only(result)
            assert (f.kind, f.step, f.layer) == ("loss_divergence", expected[0], None)
            assert f.value == pytest.approx(expected[1])

    # start 1.0, converged to 0.01 by step 40
    CONVERGED = [1.0] * 10 + list(np.geomspace(1.0, 0.01, 30)) + [0.01] * 30

    @pytest.mark.parametrize("spike", [pytest.param(3.0, id="3x-start"),
                                       pytest.param(20.0, id="20x-start")])
    def test_ignores_a_single_bad_minibatch(self, spike):
        """docs: 'One bad minibatch is noise' / 'Spikes shorter than spike_steps are ignored'."""
        det = bound(LossDivergenceDetector())
        losses = self.CONVERGED + [spike] + [0.01] * 30
        assert first_firing(det, losses_stream(losses)) == (None, None)

    def test_fires_on_a_sustained_jump(self):
        det = bound(LossDivergenceDetector())
        losses = self.CONVERGED + [2.0] * 10
        index, f = first_firing(det, losses_stream(losses))
        # the median of the last 5 passes the start (1.0) once 3 of them are 2.0
        assert (index, f.step) == (72, 72)
        assert f.value == pytest.approx(2.0)
        assert f.threshold == pytest.approx(10 * 0.01)

    @pytest.mark.parametrize("per_check", [1, 10])
    def test_a_jump_says_how_long_it_held_and_whether_it_still_holds(self, per_check):
        det = bound(LossDivergenceDetector())
        # 6 steps at 1.2 (above the start, below the rise test's 1.5x): the median of the last 5
        # is above the start from the third of them
        # until the third low loss after them: 6 steps in a row
        losses = self.CONVERGED + [1.2] * 6 + [0.01] * 20
        found = [f for s in losses_stream(losses, per_check=per_check)
                 for f in (det.update(s) or [])]
        assert found and {f.evidence["test"] for f in found} == {"jump"}
        assert max(f.evidence["held"] for f in found) == 6
        assert found[-1].evidence["ongoing"] is False or per_check == 1
        rise = bound(LossDivergenceDetector(rise_factor=1.5))
        f = next(f for s in losses_stream([1.0] * 20 + [2.0] * 20) for f in (rise.update(s) or []))
        assert f.evidence["test"] == "rise" and "held" not in f.evidence

    @pytest.mark.parametrize("spike_steps, min_history", [
        pytest.param(5, 10, id="spike_steps-below-min_history"),
        pytest.param(10, 10, id="spike_steps-equal-to-min_history"),
        pytest.param(20, 10, id="spike_steps-above-min_history"),
        pytest.param(5, 3, id="short-min_history"),
    ])
    def test_fires_on_a_sustained_jump_whatever_spike_steps(self, spike_steps, min_history):
        det = bound(LossDivergenceDetector(spike_steps=spike_steps, min_history=min_history))
        index, _ = first_firing(det, losses_stream([1.0] * 60 + [100.0] * 60))
        assert index is not None and 60 <= index < 60 + spike_steps

    def test_fires_on_a_rise_above_the_starting_loss(self):
        det = bound(LossDivergenceDetector(rise_factor=1.5))
        losses = [1.0] * 20 + [2.0] * 20
        index, f = first_firing(det, losses_stream(losses))
        # the median of the last 10 losses passes 1.5 once 6 of them are 2.0
        assert index == 25
        assert f.value == pytest.approx(2.0)
        assert f.threshold == pytest.approx(1.5)
        assert f.evidence["start"] == pytest.approx(1.0)

    def test_slow_drift_below_rise_factor_is_not_divergence(self):
        det = bound(LossDivergenceDetector(rise_factor=1.5))
        losses = list(np.linspace(1.0, 1.4, 200))
        assert not any(det.update(s) for s in losses_stream(losses))

    def test_ignores_jumps_of_a_converged_loss_below_the_start(self):
        det = bound(LossDivergenceDetector())
        losses = [1.0] * 10 + list(np.geomspace(1.0, 1e-3, 40)) + [1e-3] * 60 + [5e-2] * 20
        assert not any(det.update(s) for s in losses_stream(losses))

    def test_non_finite_losses_belong_to_the_non_finite_detector(self):
        det = bound(LossDivergenceDetector())
        for s in losses_stream([1.0] * 30):
            det.update(s)
        assert det.update(window([30, 31], (), np.zeros((2, 0)), loss=[NAN, INF])) is None
        assert det.update(window([32], (), np.zeros((1, 0)), loss=[1e9],
                                 has_loss=[False])) is None

    def test_judges_once_the_history_holds_min_history_losses(self):
        """The reference is 'the window losses before' the last spike_steps, and 'no test runs
        until the history holds min_history losses': with the defaults, 15 losses are enough."""
        det = bound(LossDivergenceDetector())
        losses = [1.0] * 10 + [100.0] * 10
        index, f = first_firing(det, losses_stream(losses))
        assert (index, f.step) == (14, 14)


# -- UpdateRatioDetector ---------------------------------------------------------------------


class TestUpdateRatio:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, seed):
        rng = np.random.default_rng(seed)
        layers, stream = update_ratio_stream(rng)
        params = dict(patience=int(rng.integers(1, 4)))
        det, ref = bound(UpdateRatioDetector(**params), layers), RefUpdateRatio(**params)
        for stats in stream:
            result, expected = det.update(stats), ref.update(stats)
            if expected is None:
                assert result is None
                continue
            assert [f.kind for f in result] == list(expected)
            for f in result:
                hits = expected[f.kind]
                assert (f.step, f.layer) == (stats.step, layers[hits[0]])
                assert f.evidence["layers"] == [layers[j] for j in hits]

    @staticmethod
    def tiny_lr(step):
        # healthy gradients, weights of norm 10, updates 1e-7 of the weights
        return make_step_stats(step, layer_names(3), [0.5, 1.0, 2.0], weight_norm=[10.0] * 3,
                               update_ratio=[1e-7] * 3)

    def test_tiny_learning_rate_is_stalled_not_vanishing(self):
        ratio = bound(UpdateRatioDetector(patience=3), layer_names(3))
        vanishing = bound(VanishingGradientDetector(patience=1), layer_names(3))
        results = []
        for step in range(6):
            results.append(ratio.update(self.tiny_lr(step)))
            assert vanishing.update(self.tiny_lr(step)) == []
        assert [bool(r) for r in results] == [False, False, True, True, True, True]
        f = only(results[2])
        assert (f.kind, f.layer, f.step) == ("stalled_update", "l0", 2)
        assert f.evidence["layers"] == ["l0", "l1", "l2"]

    def test_norm_gains_and_biases_are_not_judged_stalled(self):
        # A LayerNorm gain (matrix=False) under Adam at a fine-tuning LR: ratio 4e-6, healthy.
        from gradwatch import LayerInfo, ModelInfo, RunContext

        det = UpdateRatioDetector(patience=1)
        det.bind(RunContext(model=ModelInfo(framework="test"), layers=(
            LayerInfo("ln", "LayerNorm", 64, matrix=False),
            LayerInfo("fc", "Linear", 4096, matrix=True),
            LayerInfo("unknown", "Layer", 10))))  # matrix=None: judged, as before
        stats = make_step_stats(0, ("ln", "fc", "unknown"), [0.5, 1.0, 1.0],
                                weight_norm=[8.0, 10.0, 10.0], update_ratio=[4e-6, 4e-6, 4e-6])
        f = only(det.update(stats))
        assert f.kind == "stalled_update" and f.evidence["layers"] == ["fc", "unknown"]

    def test_vanishing_gradient_is_not_a_stalled_update(self):
        layers = layer_names(3)
        ratio = bound(UpdateRatioDetector(patience=1), layers)
        vanishing = bound(VanishingGradientDetector(patience=1), layers)
        stats = make_step_stats(0, layers, [1e-9, 1e-8, 1.0], weight_norm=[10.0] * 3,
                                update_ratio=[1e-10, 1e-9, 1e-3])
        assert ratio.update(stats) == []
        assert only(vanishing.update(stats)).evidence["layers"] == ["l0", "l1"]

    def test_large_updates_after_patience(self):
        ratio = bound(UpdateRatioDetector(patience=2), layer_names(2))
        stats = [make_step_stats(s, layer_names(2), [1, 1], weight_norm=[1, 1],
                                 update_ratio=[1e-3, r]) for s, r in enumerate([0.5, 0.05, 0.5,
                                                                                0.5])]
        results = [ratio.update(s) for s in stats]
        assert [bool(r) for r in results] == [False, False, False, True]
        f = only(results[3])
        assert (f.kind, f.layer, f.value, f.threshold) == ("large_update", "l1", 0.5, 0.1)

    def test_frozen_layers_are_never_stalled(self):
        ratio = bound(UpdateRatioDetector(patience=1), layer_names(2))
        for step in range(5):
            # a stale norm left where has_grad is False must not make the layer look healthy
            stats = make_step_stats(step, layer_names(2), [1.0, 1.0], has_grad=[False, True],
                                    weight_norm=[10.0, 10.0], update_ratio=[0.0, 1e-3])
            assert ratio.update(stats) == []

    def test_returns_none_without_update_ratio(self):
        ratio = bound(UpdateRatioDetector(patience=2), layer_names(3))
        assert ratio.update(self.tiny_lr(0)) == []
        assert ratio.update(make_step_stats(1, layer_names(3), [1, 1, 1])) is None
        # the check that measured nothing does not break the streak
        assert only(ratio.update(self.tiny_lr(2))).kind == "stalled_update"


# -- DeadUnitsDetector and SaturationDetector ------------------------------------------------

ACTIVATION_DETECTORS = [
    pytest.param(DeadUnitsDetector, ("relu",), "dead_fraction", "dead_units", id="dead-units"),
    pytest.param(SaturationDetector, ("sigmoid", "tanh"), "saturated_fraction",
                 "saturated_units", id="saturation"),
]


@pytest.mark.parametrize("cls, kinds, field, kind", ACTIVATION_DETECTORS)
class TestActivationDetectors:
    @pytest.mark.parametrize("seed", SEEDS)
    def test_matches_reference_on_random_streams(self, cls, kinds, field, kind, seed):
        rng = np.random.default_rng(seed)
        params = dict(threshold=float(rng.choice([0.5, 0.6, 0.7])),
                      patience=int(rng.integers(1, 4)))
        det, ref = bound(cls(**params)), RefActivation(kinds, field, **params)
        for stats in activation_stream(rng, [*kinds, "relu", "sigmoid", "tanh", "gelu"]):
            result, expected = det.update(stats), ref.update(stats)
            if not expected:
                assert result == (None if expected is None else [])
                continue
            f = only(result)
            assert (f.kind, f.step, f.layer) == (kind, stats.step, expected[0])
            assert list(f.evidence["sites"]) == expected

    def test_needs_patience_consecutive_samples(self, cls, kinds, field, kind):
        det = bound(cls(threshold=0.5, patience=2))
        k = kinds[0]
        fractions = [0.9, 0.1, 0.9, 0.5, 0.6]
        results = [det.update(make_step_stats(s, (), [], activations=acts(a=(k, x))))
                   for s, x in enumerate(fractions)]
        assert [bool(r) for r in results] == [False, False, False, True, True]
        f = results[3][0]
        assert (f.kind, f.layer, f.step, f.value) == (kind, "a", 3, 0.5)

    def test_none_without_an_activation_sample(self, cls, kinds, field, kind):
        det = bound(cls(patience=1))
        assert det.update(make_step_stats(0, layer_names(1), [1.0])) is None
        other = "gelu"
        assert det.update(make_step_stats(1, (), [], activations=acts(g=(other, 1.0)))) is None

    def test_steps_without_a_sample_do_not_break_the_streak(self, cls, kinds, field, kind):
        det = bound(cls(patience=2))
        assert det.update(make_step_stats(50, (), [], activations=acts(a=(kinds[0], 0.8)))) == []
        assert det.update(make_step_stats(60, (), [])) is None
        assert only(det.update(make_step_stats(100, (), [],
                                               activations=acts(a=(kinds[0], 0.8))))).step == 100

    def test_names_the_first_site_in_forward_order(self, cls, kinds, field, kind):
        det = bound(cls(patience=1))
        sites = acts(a=(kinds[-1], 0.1), b=(kinds[0], 0.9), c=("gelu", 1.0), d=(kinds[-1], 0.7))
        f = only(det.update(make_step_stats(0, (), [], activations=sites)))
        assert f.layer == "b"
        assert f.evidence["sites"] == {"b": 0.9, "d": 0.7}

    def test_nan_fraction_does_not_hold(self, cls, kinds, field, kind):
        det = bound(cls(patience=1))
        assert det.update(make_step_stats(0, (), [], activations=acts(a=(kinds[0], NAN)))) == []


# -- reset -------------------------------------------------------------------------------------


def _starved(step):
    return make_step_stats(step, layer_names(2), [1e-9, 1.0])


def _deep(step):
    return make_step_stats(step, layer_names(2), [100.0, 1.0])


def _stalled(step):
    return make_step_stats(step, layer_names(2), [1.0, 1.0], weight_norm=[1, 1],
                           update_ratio=[1e-8, 1e-3])


def _dead(step):
    return make_step_stats(step, (), [], activations=acts(a=("relu", 0.9)))


def _saturated(step):
    return make_step_stats(step, (), [], activations=acts(a=("tanh", 0.9)))


@pytest.mark.parametrize("make, stats, patience", [
    pytest.param(lambda: VanishingGradientDetector(patience=3), _starved, 3, id="vanishing"),
    pytest.param(lambda: ExplodingGradientDetector(patience=3), _deep, 3, id="exploding-depth"),
    pytest.param(lambda: UpdateRatioDetector(patience=3), _stalled, 3, id="update-ratio"),
    pytest.param(lambda: DeadUnitsDetector(patience=2), _dead, 2, id="dead-units"),
    pytest.param(lambda: SaturationDetector(patience=2), _saturated, 2, id="saturation"),
])
@pytest.mark.parametrize("how", ["reset", "bind"])
def test_reset_restarts_patience(make, stats, patience, how):
    det = bound(make(), layer_names(2))
    for step in range(patience - 1):
        assert not det.update(stats(step))
    det.reset() if how == "reset" else det.bind(empty_context(layer_names(2)))
    for step in range(10, 10 + patience - 1):
        assert not det.update(stats(step))
    assert det.update(stats(20))


def test_reset_forgets_exploding_history():
    det = bound(ExplodingGradientDetector(min_history=5), layer_names(1))
    for step in range(10):
        det.update(make_step_stats(step, layer_names(1), [1.0]))
    det.reset()
    for step in range(4):
        det.update(make_step_stats(step, layer_names(1), [1.0]))
    assert det.update(make_step_stats(4, layer_names(1), [500.0])) == []


def test_reset_forgets_the_active_non_finite_finding():
    det = bound(NonFiniteDetector(), layer_names(2))
    det.update(make_step_stats(5, layer_names(2), [NAN, 1.0]))
    det.reset()
    f = only(det.update(make_step_stats(9, layer_names(2), [1.0, NAN])))
    assert (f.step, f.layer) == (9, "l1")


def test_reset_forgets_the_best_plateau_loss():
    det = bound(LossPlateauDetector(window=1, patience=5, cooldown=0))
    for s in losses_stream([1.0] * 4):
        assert not det.update(s)
    det.reset()
    results = [det.update(s) for s in losses_stream([1.0] * 6, start=4)]
    assert [bool(r) for r in results] == [False] * 5 + [True]


def test_reset_forgets_the_starting_loss():
    det = bound(LossDivergenceDetector(spike_steps=1, window=2, min_history=2))
    for s in losses_stream([100.0] * 10):
        det.update(s)
    det.reset()
    # measured against the old start (100), 2.0 would not be a rise
    results = [det.update(s) for s in losses_stream([1.0, 1.0, 1.0, 2.0, 2.0], start=10)]
    assert results[-1] and only(results[-1]).evidence["start"] == 1.0


# -- constructor validation --------------------------------------------------------------------

POSITIVE = [(-1.0, ValueError), (0.0, ValueError), (NAN, ValueError), (INF, ValueError),
            (-INF, ValueError), (True, TypeError), ("1", TypeError), (None, TypeError)]
ABOVE_ONE = POSITIVE + [(1.0, ValueError), (0.5, ValueError)]
FRACTION = POSITIVE + [(1.5, ValueError)]
OPEN_FRACTION = FRACTION + [(1.0, ValueError)]
COUNT = [(0, ValueError), (-1, ValueError), (2.5, TypeError), (3.0, TypeError),
         (True, TypeError), ("3", TypeError), (None, TypeError)]

PARAMETERS = {
    VanishingGradientDetector: {"rel_threshold": OPEN_FRACTION, "abs_threshold": POSITIVE,
                                "patience": COUNT},
    ExplodingGradientDetector: {"spike_factor": ABOVE_ONE, "window": COUNT + [(1, ValueError)],
                                "min_history": COUNT, "abs_threshold": POSITIVE,
                                "depth_ratio": ABOVE_ONE, "patience": COUNT},
    LossPlateauDetector: {"window": COUNT, "patience": COUNT,
                          "min_delta": [(-1e-4, ValueError), (NAN, ValueError), (INF, ValueError),
                                        (True, TypeError), ("0", TypeError), (None, TypeError)],
                          "min_delta_rel": OPEN_FRACTION,
                          "cooldown": [(-1, ValueError), (2.5, TypeError), (True, TypeError),
                                       ("1", TypeError)]},
    LossDivergenceDetector: {"spike_factor": ABOVE_ONE, "spike_steps": COUNT,
                             "window": COUNT + [(1, ValueError)], "min_history": COUNT,
                             "rise_factor": ABOVE_ONE},
    UpdateRatioDetector: {"stall_threshold": POSITIVE, "large_threshold": POSITIVE,
                          "min_grad_to_weight": POSITIVE, "patience": COUNT},
    DeadUnitsDetector: {"threshold": FRACTION, "patience": COUNT},
    SaturationDetector: {"threshold": FRACTION, "patience": COUNT},
}

BAD_ARGUMENTS = [
    pytest.param(cls, {name: value}, exc, name, id=f"{cls.__name__}-{name}={value!r}")
    for cls, params in PARAMETERS.items()
    for name, cases in params.items()
    for value, exc in cases
] + [
    pytest.param(ExplodingGradientDetector, dict(window=10, min_history=11), ValueError,
                 "min_history", id="exploding-min_history-above-window"),
    pytest.param(LossDivergenceDetector, dict(window=10, min_history=11), ValueError,
                 "min_history", id="divergence-min_history-above-window"),
    pytest.param(UpdateRatioDetector, dict(stall_threshold=0.1, large_threshold=0.1), ValueError,
                 "stall_threshold", id="stall-equal-to-large"),
    pytest.param(UpdateRatioDetector, dict(stall_threshold=0.5, large_threshold=0.1), ValueError,
                 "stall_threshold", id="stall-above-large"),
    pytest.param(LossPlateauDetector, dict(window=25, patience=24), ValueError, "patience",
                 id="plateau-patience-below-window"),
]


@pytest.mark.parametrize("cls, kwargs, exc, name", BAD_ARGUMENTS)
def test_bad_argument_raises_naming_the_parameter(cls, kwargs, exc, name):
    # a value of the wrong type may be reported as either error, but must name the parameter
    expected = (TypeError, ValueError) if exc is TypeError else ValueError
    with pytest.raises(expected, match=name):
        cls(**kwargs)


@pytest.mark.parametrize("cls, kwargs", [
    pytest.param(VanishingGradientDetector, dict(rel_threshold=0.999, patience=1), id="vanishing"),
    pytest.param(ExplodingGradientDetector, dict(window=2, min_history=2), id="exploding"),
    pytest.param(LossPlateauDetector, dict(window=5, patience=5, min_delta=0, cooldown=0),
                 id="plateau"),
    pytest.param(LossDivergenceDetector, dict(window=3, min_history=3, spike_steps=1),
                 id="divergence"),
    pytest.param(UpdateRatioDetector, dict(stall_threshold=1e-9, large_threshold=1e9),
                 id="update-ratio"),
    pytest.param(DeadUnitsDetector, dict(threshold=1.0, patience=1), id="dead-units"),
    pytest.param(SaturationDetector, dict(threshold=1.0, patience=1), id="saturation"),
])
def test_boundary_arguments_are_accepted(cls, kwargs):
    det = cls(**kwargs)
    for name, value in kwargs.items():
        assert getattr(det, name) == value


NUMPY_SCALARS = [
    pytest.param(cls, name, dtype, id=f"{cls.__name__}-{name}-{dtype.__name__}")
    for cls, params in PARAMETERS.items()
    for name, cases in params.items()
    for dtype in ((np.int64,) if isinstance(cls().__dict__[name], int)
                  else (np.float64, np.float32))
]


@pytest.mark.parametrize("cls, name, dtype", NUMPY_SCALARS)
def test_numpy_scalars_are_accepted(cls, name, dtype):
    default = cls().__dict__[name]
    det = cls(**{name: dtype(default)})
    assert getattr(det, name) == pytest.approx(float(default))


# -- every detector on arbitrary streams -------------------------------------------------------

ODD_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, NAN, INF, -INF, 5e-324, 1e-300, 1e-9, 1e-4, 0.5, 1.0, 70.0, 1e3,
                     1e300, 1.7976931348623157e308, -1.0]),
    st.floats(),
)
FRACTIONS = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0, NAN]), st.floats(0.0, 1.0))


@st.composite
def streams(draw):
    """(layer names, activation-site names, list of StepStats) with increasing steps."""
    n = draw(st.integers(0, 6))
    layers = tuple(f"layer{i}" for i in range(n))
    kinds = draw(st.lists(st.sampled_from(["relu", "sigmoid", "tanh", "gelu"]), max_size=4))
    sites = tuple(f"act{i}" for i in range(len(kinds)))
    step = draw(st.integers(0, 100))
    stream = []
    for _ in range(draw(st.integers(1, 6))):
        rows = draw(st.integers(1, 5))
        steps = []
        for _ in range(rows):
            steps.append(step)
            step += draw(st.integers(1, 3))

        def per_layer(elements, optional=True):
            values = st.lists(elements, min_size=n, max_size=n)
            return draw(st.none() | values if optional else values)

        g = draw(st.lists(ODD_FLOATS, min_size=rows * n, max_size=rows * n))
        hg = draw(st.lists(st.booleans(), min_size=rows * n, max_size=rows * n))
        loss = draw(st.lists(ODD_FLOATS, min_size=rows, max_size=rows))
        has_loss = draw(st.none() | st.lists(st.booleans(), min_size=rows, max_size=rows))
        activations = {}
        if draw(st.integers(0, 3)):  # most checks carry a sample
            activations = {
                name: ActivationStats(kind=kind, dead_fraction=draw(FRACTIONS),
                                      saturated_fraction=draw(FRACTIONS),
                                      units=draw(st.integers(0, 64)))
                for name, kind in zip(sites, kinds)}
        stream.append(window(
            steps, layers, np.reshape(g, (rows, n)), has_grad=np.reshape(hg, (rows, n)),
            loss=loss, has_loss=has_loss, update_ratio=per_layer(ODD_FLOATS),
            weight_norm=per_layer(ODD_FLOATS), weight_change=per_layer(ODD_FLOATS),
            weight_nonfinite=per_layer(st.integers(0, 5)), activations=activations))
    return layers, sites, stream


ALL_DETECTORS = [
    pytest.param(NonFiniteDetector, id="nonfinite"),
    pytest.param(VanishingGradientDetector, id="vanishing"),
    pytest.param(lambda: VanishingGradientDetector(patience=1), id="vanishing-patience-1"),
    pytest.param(ExplodingGradientDetector, id="exploding"),
    pytest.param(lambda: ExplodingGradientDetector(window=3, min_history=1, patience=1),
                 id="exploding-short"),
    pytest.param(lambda: LossPlateauDetector(window=1, patience=1, cooldown=0),
                 id="plateau-short"),
    pytest.param(LossDivergenceDetector, id="divergence"),
    pytest.param(lambda: LossDivergenceDetector(spike_steps=1, window=3, min_history=2),
                 id="divergence-short"),
    pytest.param(lambda: UpdateRatioDetector(patience=1), id="update-ratio-patience-1"),
    pytest.param(lambda: DeadUnitsDetector(patience=1), id="dead-units-patience-1"),
    pytest.param(lambda: SaturationDetector(patience=1), id="saturation-patience-1"),
]


@pytest.mark.parametrize("make", ALL_DETECTORS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=streams())
def test_any_stream_gives_well_formed_findings(make, data):
    layers, sites, stream = data
    det = make()
    det.bind(empty_context(layers))
    names = set(sites) if isinstance(det, (DeadUnitsDetector, SaturationDetector)) else set(layers)
    seen_steps: set[int] = set()
    for stats in stream:
        seen_steps |= {int(s) for s in stats.steps}
        result = det.update(stats)
        assert result is None or isinstance(result, list)
        # a persisting non-finite condition keeps the step where it started
        steps = seen_steps if isinstance(det, NonFiniteDetector) else {
            *(int(s) for s in stats.steps), stats.step}
        for f in result or []:
            assert isinstance(f, Finding)
            assert f.kind in det.kinds
            assert f.step in steps
            assert f.layer is None or f.layer in names
            assert isinstance(f.message, str) and f.message
            assert isinstance(f.advice, tuple) and f.advice
            assert all(isinstance(a, str) and a for a in f.advice)
        if isinstance(det, NonFiniteDetector):
            assert bool(result) is (ref_nonfinite_scan(stats) is not None)
        if isinstance(det, VanishingGradientDetector) and result:
            fed = {layers[j] for j, m in enumerate(ref_window_median(stats)) if m is not None}
            assert set(result[0].evidence["layers"]) <= fed
        if isinstance(det, UpdateRatioDetector) and result:
            for f in result:
                assert all(stats.last_has_grad[layers.index(x)] for x in f.evidence["layers"])


def test_a_converged_layer_returning_to_ordinary_gradients_is_not_an_explosion():
    """Near convergence norms shrink to ~1e-2: a norm of 2 is then 200x the median. It is a
    spike only if it also exceeds spike_floor."""
    layers = ("a", "b")
    history = [window([s], layers, [[0.01, 0.01]]) for s in range(1, 31)]
    spike = window([31], layers, [[2.0, 0.01]])
    for floor, fires in ((5.0, False), (1.0, True)):
        det = bound(ExplodingGradientDetector(spike_floor=floor), layers)
        for stats in history:
            det.update(stats)
        assert bool(det.update(spike)) == fires, floor
