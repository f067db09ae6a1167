"""'Is this normal?': the whole-model gradient norm of every step, as a distribution, and how
often clipping was active.

Every check hands the monitor each step's per-layer gradient norms (as the backward left them:
unscaled, before any clipping), so the run's pre-clip norm distribution costs nothing more to
measure. It is kept as a fixed-size uniform sample of the steps (reservoir sampling, seeded: the
same run gives the same report) plus the exact count and maximum, so a long run holds a few
kilobytes. Whether clipping was active is known at check steps only, where the adapter compares
the norm the optimizer received with the one the backward left (``StepStats.clipped``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from ._stats import StepStats

#: Steps kept for the percentiles; beyond it each new step replaces a random kept one.
SAMPLE_SIZE = 4096


@dataclasses.dataclass(frozen=True)
class GradNormSummary:
    """The run's whole-model gradient norm (pre-clip, one value per step with a gradient) and
    how often clipping was active at the checks that could tell."""

    #: Steps with a finite whole-model gradient norm.
    steps: int
    median: float
    p90: float
    p99: float
    max: float
    #: Check steps at which the adapter compared the pre- and post-clip norms.
    clip_checks: int = 0
    #: Of those, the checks at which the optimizer got a smaller norm than the backward left.
    clip_active: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(self).items()}

    def lines(self) -> list[str]:
        """The report's lines (none when no step had a finite norm)."""
        out = []
        if self.steps:
            out.append(f"gradient norm (whole model, before clipping) over {self.steps} steps: "
                       f"median {self.median:.3g}, p90 {self.p90:.3g}, p99 {self.p99:.3g}, "
                       f"max {self.max:.3g}")
        if self.clip_active:
            share = 100 * self.clip_active / max(self.clip_checks, 1)
            out.append(f"clipping: active at {self.clip_active} of {self.clip_checks} checks "
                       f"({share:.0f}%): the optimizer got a smaller gradient norm than the "
                       f"backward pass left")
        return out


class GradNormLog:
    """Collects :class:`GradNormSummary` over a run, one check at a time."""

    def __init__(self, size: int = SAMPLE_SIZE, seed: int = 0) -> None:
        self._size = size
        self._rng = np.random.default_rng(seed)
        self._sample = np.empty(size)
        self._seen = 0
        self._max = -math.inf
        self._clip_checks = 0
        self._clip_active = 0

    def add(self, stats: StepStats) -> None:
        with np.errstate(invalid="ignore", over="ignore"):
            sq = np.where(stats.has_grad, np.square(np.asarray(stats.grad_norm, float)), 0.0)
            total = np.sqrt(sq.sum(axis=1))
        total = total[np.isfinite(total) & np.asarray(stats.has_grad).any(axis=1)]
        for value in total:
            self._add(float(value))
        if stats.clipped is not None:
            self._clip_checks += 1
            self._clip_active += bool(stats.clipped)

    def _add(self, value: float) -> None:
        self._max = max(self._max, value)
        if self._seen < self._size:
            self._sample[self._seen] = value
        else:
            j = int(self._rng.integers(0, self._seen + 1))
            if j < self._size:
                self._sample[j] = value
        self._seen += 1

    def summary(self) -> GradNormSummary:
        kept = self._sample[:min(self._seen, self._size)]
        if kept.size:
            median, p90, p99 = (float(v) for v in np.percentile(kept, [50, 90, 99]))
        else:
            median = p90 = p99 = math.nan
        return GradNormSummary(steps=self._seen, median=median, p90=p90, p99=p99,
                               max=self._max if self._seen else math.nan,
                               clip_checks=self._clip_checks, clip_active=self._clip_active)
