"""Real small JAX models that train for real under jax.jit: each detector fires on the broken
run and stays quiet on the healthy one (the detection is the core's, through kit.step_stats)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import UNHEALTHY, jax, jnp, kinds, mlp_apply, mlp_params, optax, train, warned

import gradwatch

flax_linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")


@pytest.mark.parametrize("init", [pytest.param("he", id="sigmoid-10-layers-he"),
                                  pytest.param("small", id="sigmoid-10-layers-tiny-init")])
def test_deep_sigmoid_mlp_reports_vanishing_gradients_in_the_first_layers(init):
    w = gradwatch.jax.watch(optax.sgd(0.05))
    run = train(mlp_params(10, init=init), mlp_apply(jax.nn.sigmoid), w)
    vanishing = [f for f in w.findings if f.kind == "vanishing_gradient"]
    assert vanishing, w.report()
    f = vanishing[0]
    assert f.layer == "layer0"  # the first layer: furthest from the loss
    assert f.is_warning and f.value < 1e-3
    assert "first of 11" in f.message
    assert any(issubclass(c.category, gradwatch.VanishingGradientWarning) for c in run.caught)
    assert "stalled_update" not in kinds(w)  # not mistaken for a learning-rate problem


class SigmoidMLP(flax_linen.Module):
    depth: int = 10

    @flax_linen.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = flax_linen.sigmoid(flax_linen.Dense(32)(x))
        return flax_linen.Dense(1)(x)[:, 0]


def test_flax_linen_deep_sigmoid_names_flax_module_paths():
    model = SigmoidMLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 2)))
    w = gradwatch.jax.watch(optax.sgd(0.05))
    train(params, model.apply, w)
    assert w.layers() == tuple(f"Dense_{i}" for i in range(11))  # depth order: 2 before 10
    vanishing = [f for f in w.findings if f.kind == "vanishing_gradient"]
    assert vanishing and vanishing[0].layer == "Dense_0", w.report()


def test_relu_he_mlp_stays_quiet_and_trains():
    w = gradwatch.jax.watch(optax.sgd(0.05))
    run = train(mlp_params(10, init="he"), mlp_apply(jax.nn.relu), w, steps=300)
    assert not warned(w), w.report()
    assert not kinds(w) & UNHEALTHY, w.report()
    assert run.loss < 0.3  # it really trained


def test_relu_he_mlp_with_adamw_stays_quiet():
    w = gradwatch.jax.watch(optax.adamw(1e-3))
    run = train(mlp_params(3, init="he"), mlp_apply(jax.nn.relu), w, steps=300)
    assert not warned(w), w.report()
    assert run.loss < 0.35


class SmallCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        x = nnx.relu(self.conv2(x))
        return self.head(x.mean(axis=(1, 2)))


def bars(n: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The torch tests' synthetic 12x12 images: class 1 a horizontal bar, class 0 a vertical."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12, 12, 1)).astype(np.float32) * 0.3
    y = rng.integers(0, 2, n)
    pos = rng.integers(2, 10, n)
    for i in range(n):
        if y[i]:
            x[i, pos[i], :, 0] += 2
        else:
            x[i, :, pos[i], 0] += 2
    return x, y


def test_flax_nnx_cnn_stays_quiet_with_nnx_optimizer():
    model = SmallCNN(nnx.Rngs(0))
    w = gradwatch.jax.watch(optax.sgd(0.05, momentum=0.9))
    opt = nnx.Optimizer(model, w, wrt=nnx.Param)
    x, y = bars()

    @nnx.jit
    def step(model, opt, xb, yb):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads, value=loss)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(150):
        idx = rng.integers(0, len(x), 32)
        loss = step(model, opt, x[idx], y[idx])
    assert w.layers() == ("conv1", "conv2", "head")
    assert w.step == 140  # step 150's check is sent at the step after it
    assert not warned(w), w.report()
    assert float(loss) < 0.5


def test_tiny_learning_rate_is_stalled_updates_not_vanishing_gradients():
    w = gradwatch.jax.watch(optax.sgd(1e-7))
    train(mlp_params(3, init="he"), mlp_apply(jax.nn.relu), w)
    assert "stalled_update" in kinds(w), w.report()
    assert "vanishing_gradient" not in kinds(w)
    f = next(f for f in w.findings if f.kind == "stalled_update")
    assert f.value < 1e-5


def test_tiny_learning_rate_is_named_in_the_advice_with_inject_hyperparams():
    w = gradwatch.jax.watch(optax.inject_hyperparams(optax.sgd)(learning_rate=1e-7))
    train(mlp_params(3, init="he"), mlp_apply(jax.nn.relu), w)
    f = next(f for f in w.findings if f.kind == "stalled_update")
    assert "learning rate (now 1e-07" in f.advice[0]
    assert w.monitor.context.model.learning_rates == pytest.approx((1e-7,))


def test_huge_learning_rate_is_reported_without_crashing_training():
    w = gradwatch.jax.watch(optax.sgd(50.0))
    run = train(mlp_params(3, init="he"), mlp_apply(jax.nn.relu), w, steps=60)
    w.flush(run.state, run.params)
    assert w.step == 60  # training ran to the end
    assert kinds(w) & {"nonfinite", "loss_divergence", "exploding_gradient"}, w.report()
    assert len([f for f in w.findings if f.kind == "nonfinite"]) <= 1  # one condition
    assert w.report().internal_errors == ()
    assert not math.isfinite(run.loss) or run.loss > 1


def test_guarded_by_apply_if_finite_still_reports_the_nonfinite_steps():
    w = gradwatch.jax.watch(optax.apply_if_finite(optax.sgd(50.0), max_consecutive_errors=1000))
    train(mlp_params(3, init="he"), mlp_apply(jax.nn.relu), w, steps=60)
    assert kinds(w) & {"nonfinite", "loss_divergence", "exploding_gradient"}, w.report()
    assert w.report().internal_errors == ()
