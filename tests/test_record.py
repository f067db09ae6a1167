"""The adapter kit's per-tensor record -> StepStats arithmetic, against plain numpy written out
tensor by tensor (the reference every adapter used to carry its own copy of)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradwatch import kit


def _layout(tensor_layer, numel, scale=None):
    n_layers = max(tensor_layer) + 1
    return kit.TensorLayout([f"l{i}" for i in range(n_layers)], tensor_layer, numel, scale)


def _reference_norms(sq, present, tensor_layer, n_layers):
    """Per step, per layer: sqrt of the sum of squares of the tensors present; NaN without any."""
    out = np.full((sq.shape[0], n_layers), np.nan)
    for s in range(sq.shape[0]):
        for layer in range(n_layers):
            ts = [t for t, lay in enumerate(tensor_layer) if lay == layer and present[s, t]]
            if ts:
                out[s, layer] = math.sqrt(sum(sq[s, t] for t in ts))
    return out


@pytest.mark.parametrize("tensor_layer", [
    pytest.param([0, 0, 1, 2, 2, 2], id="adjacent"),
    pytest.param([2, 0, 1, 0, 2, 2], id="interleaved"),
])
def test_gradient_norms_are_summed_per_layer_over_present_tensors(tensor_layer):
    rng = np.random.default_rng(0)
    T = len(tensor_layer)
    sq = rng.uniform(0.1, 4.0, (3, T))
    present = rng.uniform(size=(3, T)) > 0.3
    present[:, 1] = False  # one tensor never has a gradient
    scale = np.array([1.0, 0.5, 0.25])
    record = kit.CheckRecord(steps=np.array([8, 9, 10]), grad_sq=sq, has_grad=present,
                             loss=np.array([1.0, np.nan, 0.5]),
                             has_loss=np.array([True, False, True]), grad_scale=scale)
    stats = kit.step_stats(record, _layout(tensor_layer, np.arange(1, T + 1)))
    want = _reference_norms(sq, present, tensor_layer, 3) * scale[:, None]
    np.testing.assert_allclose(stats.grad_norm, want, equal_nan=True)
    np.testing.assert_array_equal(stats.has_grad, ~np.isnan(want))
    assert stats.step == 10 and stats.layers == ("l0", "l1", "l2")
    want_size = [sum(i + 1 for i, lay in enumerate(tensor_layer) if lay == k) for k in range(3)]
    np.testing.assert_array_equal(stats.grad_size, want_size)
    # Nothing was measured at the check step beyond the norms: the optional fields say so.
    assert stats.grad_max is None and stats.update_ratio is None and stats.weight_norm is None


def test_check_step_numbers_follow_the_layers_and_never_divide_by_a_zero_start():
    tensor_layer = [0, 0, 1, 2]
    layout = _layout(tensor_layer, [100, 10, 50, 5], scale=[10.0, 1.0, 5.0, 1.0])
    sq = np.array([[4.0, 9.0, np.inf, 1.0]])
    present = np.array([[True, True, True, False]])
    record = kit.CheckRecord(
        steps=np.array([5]), grad_sq=sq, has_grad=present, loss=np.array([2.0]),
        has_loss=np.array([True]), grad_scale=np.array([0.5]),
        grad_max=np.array([1.0, 3.0, 2.0, 99.0]),  # the absent tensor's 99 is not the layer's
        grad_nonzero=np.array([50.0, 10.0, 25.0, 5.0]),
        grad_dot=np.array([2.0, np.nan, 0.0, 0.0]), weight_sq_before=np.array([4.0, 1.0, 1.0, 1.0]),
        weight_sq=np.array([1.0, 3.0, np.nan, 0.0]),
        update_sq=np.array([0.01, 0.04, 0.0, 0.0]), update_base_sq=np.array([1.0, 2.0, 0.0, 0.0]),
        change_sq=np.array([0.1, 0.1, 0.2, 0.0]), change_base_sq=np.array([1.0, 1.0, 0.0, 0.0]))
    stats = kit.step_stats(record, layout)
    np.testing.assert_allclose(stats.grad_max, [3.0 * 0.5, 2.0 * 0.5, np.nan], equal_nan=True)
    np.testing.assert_allclose(stats.grad_nonfinite, [0, 1, 0])
    np.testing.assert_allclose(stats.grad_zero_fraction, [1 - 60 / 110, 0.5, 1.0])
    # Tensor 0: 4 - 2^2/4 = 3 left orthogonal to W; tensor 1: dot unknown, all of its 9 stays.
    np.testing.assert_allclose(stats.grad_norm_orthogonal[0], math.sqrt(3 + 9) * 0.5)
    assert math.isnan(stats.grad_norm_orthogonal[2])  # no gradient in layer 2 at all
    np.testing.assert_allclose(stats.weight_norm[[0, 2]], [2.0, 0.0])
    np.testing.assert_allclose(stats.weight_nonfinite, [0, 1, 0])
    # Sample-scaled sums: (0.01*10 + 0.04) / (1*10 + 2) for layer 0; layer 1 started at zero.
    np.testing.assert_allclose(stats.update_ratio[0], math.sqrt(0.14 / 12))
    assert math.isnan(stats.update_ratio[1]) and math.isnan(stats.weight_change[1])
    np.testing.assert_allclose(stats.weight_change[0], math.sqrt(1.1 / 11))


def test_activation_sites_become_activation_stats_and_unmeasured_sites_are_left_out():
    sites = [kit.ActivationSite("relu1", "relu", 64), kit.ActivationSite("sig", "sigmoid", 8),
             kit.ActivationSite("tanh", "tanh", 4)]
    stats = kit.activation_stats(sites, [0.25, 0.9, np.nan])
    assert set(stats) == {"relu1", "sig"}
    assert stats["relu1"].dead_fraction == 0.25 and stats["relu1"].units == 64
    assert stats["sig"].saturated_fraction == 0.9 and math.isnan(stats["sig"].dead_fraction)


def test_a_layout_refuses_tensors_that_point_outside_the_layers():
    with pytest.raises(ValueError, match="tensor_layer must index the 2 layers"):
        kit.TensorLayout(["a", "b"], [0, 2], [1, 1])
    with pytest.raises(ValueError, match="one entry per tensor"):
        kit.TensorLayout(["a"], [0, 0], [1])


def test_a_layer_without_tensors_gets_zero_sums_and_no_gradient():
    layout = kit.TensorLayout(["a", "empty", "b"], [0, 2], [3, 4])
    record = kit.CheckRecord(steps=np.array([1]), grad_sq=np.array([[1.0, 4.0]]),
                             has_grad=np.array([[True, True]]), loss=np.array([np.nan]),
                             has_loss=np.array([False]))
    stats = kit.step_stats(record, layout)
    np.testing.assert_allclose(stats.grad_norm[0], [1.0, np.nan, 2.0])
    np.testing.assert_array_equal(stats.grad_size, [3, 0, 4])
