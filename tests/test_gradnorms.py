"""'Is this normal?' in the core: the run's pre-clip gradient-norm distribution and the share of
checks at which clipping acted, from StepStats alone (any adapter gets them)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradwatch
from gradwatch._gradnorms import SAMPLE_SIZE, GradNormLog


def stats(step: int, norms: np.ndarray, clipped=None, batch_ids=None) -> gradwatch.StepStats:
    S, L = norms.shape
    return gradwatch.StepStats(step=step, layers=tuple(str(i) for i in range(L)),
                               steps=np.arange(step - S + 1, step + 1), grad_norm=norms,
                               has_grad=np.isfinite(norms) | np.isinf(norms), loss=np.ones(S),
                               grad_size=np.ones(L), clipped=clipped, batch_ids=batch_ids)


def test_whole_model_norms_are_summed_over_layers_and_skip_non_finite_steps():
    log = GradNormLog()
    norms = np.array([[3.0, 4.0], [6.0, 8.0], [math.inf, 1.0], [0.0, 1.0]])
    log.add(stats(4, norms, clipped=True))
    log.add(stats(8, norms, clipped=False))
    s = log.summary()
    assert s.steps == 6  # the two infinite steps are not in the distribution
    assert s.max == 10.0 and s.median == pytest.approx(5.0)
    assert (s.clip_checks, s.clip_active) == (2, 1)


def test_a_long_run_keeps_a_bounded_sample_with_the_exact_count_and_max():
    rng = np.random.default_rng(0)
    values = np.exp(rng.normal(size=40_000))
    log = GradNormLog()
    for i in range(0, len(values), 100):
        log.add(stats(i + 100, values[i:i + 100, None]))
    s = log.summary()
    assert s.steps == 40_000 and s.max == pytest.approx(values.max())
    assert log._sample.size == SAMPLE_SIZE  # memory does not grow with the run
    assert s.median == pytest.approx(np.median(values), rel=0.05)
    assert s.p90 == pytest.approx(np.percentile(values, 90), rel=0.05)
    assert s.clip_checks == 0 and not any(line.startswith("clipping") for line in s.lines())


def test_batch_ids_need_one_entry_per_step():
    with pytest.raises(ValueError, match="batch_ids"):
        stats(3, np.ones((3, 2)), batch_ids=(1, 2))
    assert stats(3, np.ones((3, 2)), batch_ids=[1, None, "b"]).batch_ids == (1, None, "b")
