"""Statistics written from their definitions in docs/detectors.md, in numpy float64, for the
adapters' reference tests (each adapter captures its own tensors and converts them to numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradwatch import kit


def sq(a: np.ndarray) -> float:
    """||a||^2, summed in float64."""
    return float(np.square(np.asarray(a, dtype=np.float64)).sum())


def sampled_sq(a: np.ndarray, fraction: float | None) -> float:
    """||a||^2 estimated from the strided sample ``a.reshape(-1)[::stride]`` that update ratios
    are defined on (the public ``kit.sample_stride``), scaled by elements / elements kept so
    that it estimates the whole tensor's; ``fraction=None``: the whole tensor."""
    if fraction is None:
        return sq(a)
    flat = np.asarray(a).reshape(-1)
    kept = flat[::kit.sample_stride(flat.size, fraction)]
    return sq(kept) * flat.size / kept.size


def ratio(now: Sequence[np.ndarray], base: Sequence[np.ndarray], fraction: float | None) -> float:
    """sqrt(sum ||now - base||^2 / sum ||base||^2) over a layer's tensors, from the sample."""
    top = sum(sampled_sq(np.asarray(a, np.float64) - np.asarray(b, np.float64), fraction)
              for a, b in zip(now, base))
    return math.sqrt(top / sum(sampled_sq(b, fraction) for b in base))


def orthogonal_norm(grads: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> float:
    """A layer's ||g|| less each tensor's component along its own (pre-update) weights:
    sqrt(sum_t ||g_t||^2 - (g_t . W_t)^2 / ||W_t||^2)."""
    total = 0.0
    for g, w in zip(grads, weights):
        g64 = np.asarray(g, np.float64).reshape(-1)
        w64 = np.asarray(w, np.float64).reshape(-1)
        total += float(g64 @ g64 - (g64 @ w64) ** 2 / (w64 @ w64))
    return math.sqrt(total)


class StatsLog:
    """A run plugin (``plugins=[log]``) keeping every check's StepStats, in order: the numbers
    the sinks were handed, for tests that compare what a sink wrote with them."""

    def __init__(self) -> None:
        self.stats: list[kit.StepStats] = []

    @kit.hookimpl
    def gradwatch_step_stats(self, stats: kit.StepStats) -> None:
        self.stats.append(stats)


class FakeWriter:
    """Records calls like a SummaryWriter would receive them."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.texts: list[tuple[str, str, int]] = []
        self.flushes = 0
        self.closes = 0

    def add_scalar(self, tag, value, global_step):
        assert isinstance(value, float) and isinstance(global_step, int)
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text, global_step):
        self.texts.append((tag, text, global_step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closes += 1
