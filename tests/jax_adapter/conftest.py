"""Small real JAX models (plain pytrees and flax) and a jitted training loop shared by the
optax adapter tests; the data is the other adapters' two moons, made in code."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.experiments import moons  # noqa: E402

#: What a healthy run must never report.
UNHEALTHY = {"vanishing_gradient", "exploding_gradient", "nonfinite", "stalled_update",
             "loss_divergence"}


def mlp_params(depth: int, width: int = 32, d_in: int = 2, init: str = "he",
               seed: int = 0) -> dict[str, dict[str, jax.Array]]:
    """``{'layer0': {'w', 'b'}, ...}``: ``depth`` hidden layers and a 1-unit head."""
    key = jax.random.key(seed)
    params, d = {}, d_in
    for i in range(depth + 1):
        key, k = jax.random.split(key)
        out = 1 if i == depth else width
        std = {"he": np.sqrt(2.0 / d), "xavier": np.sqrt(2.0 / (d + out)), "small": 0.01}[init]
        params[f"layer{i}"] = {"w": jax.random.normal(k, (d, out)) * std, "b": jnp.zeros(out)}
        d = out
    return params


def mlp_apply(act: Callable[[jax.Array], jax.Array]) -> Callable[..., jax.Array]:
    def apply(params: Any, x: jax.Array) -> jax.Array:
        n = len(params)
        for i in range(n):
            p = params[f"layer{i}"]
            x = x @ p["w"] + p["b"]
            if i < n - 1:
                x = act(x)
        return x[:, 0]

    return apply


def bce(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()


def train(params: Any, apply: Callable[..., jax.Array], tx: Any, *, steps: int = 200,
          batch: int = 64, seed: int = 0, data: tuple[np.ndarray, np.ndarray] | None = None,
          loss_fn: Callable[..., jax.Array] = bce, micro: int = 1) -> Any:
    """Train with ``tx`` (a watcher, or something holding one) under ``jax.jit``; returns
    what ran: ``.params``, ``.state``, ``.loss``, ``.caught`` (gradwatch's warnings)."""
    x, y = data if data is not None else moons(seed=seed)
    rng = np.random.default_rng(seed)

    def objective(p: Any, xb: jax.Array, yb: jax.Array) -> jax.Array:
        return loss_fn(apply(p, xb), yb)

    @jax.jit
    def step(p: Any, state: Any, xb: jax.Array, yb: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(objective)(p, xb, yb)
        updates, state = tx.update(grads, state, p, value=loss)
        return optax.apply_updates(p, updates), state, loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = tx.init(params)
        loss = None
        for _ in range(steps * micro):
            idx = rng.integers(0, len(x), batch)
            params, state, loss = step(params, state, x[idx], y[idx])
        jax.effects_barrier()
    return Run(params, state, float(loss),
               [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)])


class Run:
    def __init__(self, params: Any, state: Any, loss: float, caught: list) -> None:
        self.params, self.state, self.loss, self.caught = params, state, loss, caught


def kinds(watcher: Any) -> set[str]:
    return {f.kind for f in watcher.findings}


def warned(watcher: Any) -> set[str]:
    return {f.kind for f in watcher.findings if f.is_warning}
