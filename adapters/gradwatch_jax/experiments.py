"""The reference experiments in JAX with optax: the spec's model as a parameter pytree and a pure
function, trained by a jitted step through ``gradwatch.jax.watch(optax.sgd(lr))``.
:class:`gradwatch_jax.plugin.JaxRunner` is the way in; this module imports jax and optax.

The model, initial weights, batches and optimizer are the PyTorch run's (see
:mod:`gradwatch.experiments`); only the framework differs. Layers are named as in every
framework (``fc0``, ``bn0``, ``act0`` for PReLU's slopes, ``out``), and the parameter dict is
built in depth order, which is the order gradwatch reads its layers in. The ReLU, sigmoid and
tanh outputs are handed to the watcher (``update(activations=...)``) for dead and saturated
units, which an optax transformation cannot see by itself.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradwatch
from gradwatch import experiments as ex

FRAMEWORK = "jax"
#: PyTorch's BatchNorm1d defaults: running statistics keep 0.9 of the old value, eps 1e-5.
BN_MOMENTUM, BN_EPS = 0.9, 1e-5


def build(exp: ex.Experiment) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec's parameters (with the spec's initial weights) and BatchNorm's running
    statistics, as dicts in depth order."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for i, ((_, fan_out), (w, b)) in enumerate(zip(ex.layer_dims(exp), ex.initial_weights(exp))):
        dense = {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}
        if i == exp.depth:
            params["out"] = dense
            break
        params[f"fc{i}"] = dense
        if exp.batchnorm:
            params[f"bn{i}"] = {"scale": jnp.ones(fan_out), "bias": jnp.zeros(fan_out)}
            stats[f"bn{i}"] = {"mean": jnp.zeros(fan_out), "var": jnp.ones(fan_out)}
        if exp.activation == "prelu":
            # PyTorch's PReLU(num_parameters=width, init=0.25): one slope per unit.
            params[f"act{i}"] = {"alpha": jnp.full(fan_out, 0.25)}
    return params, stats


def _activation(exp: ex.Experiment, z: jax.Array, params: dict[str, Any], i: int) -> jax.Array:
    name = exp.activation
    if name == "sigmoid":
        return jax.nn.sigmoid(z)
    if name == "tanh":
        return jnp.tanh(z)
    if name == "relu":
        return jax.nn.relu(z)
    if name == "leaky_relu":
        return jnp.where(z >= 0, z, exp.negative_slope * z)
    return jnp.where(z >= 0, z, params[f"act{i}"]["alpha"] * z)


#: The activations gradwatch samples (dead ReLU units, saturated sigmoid/tanh outputs), as the
#: PyTorch and Keras adapters find them in the model.
SITES = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def sites(exp: ex.Experiment) -> dict[str, str] | None:
    """The activation sites of ``exp``'s model for ``watch(activations=...)``."""
    kind = SITES.get(exp.activation)
    return {f"act{i}": kind for i in range(exp.depth)} if kind else None


def forward(exp: ex.Experiment, params: dict[str, Any], stats: dict[str, Any], x: jax.Array,
            train: bool, outputs: dict[str, jax.Array] | None = None
            ) -> tuple[jax.Array, dict[str, Any]]:
    """Logits ``[n]`` and, in training, BatchNorm's updated running statistics; ``outputs``
    (when given) gets each activation's output."""
    h, new = x, {}
    for i in range(exp.depth):
        z = h @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"]
        if exp.batchnorm:
            bn, run = params[f"bn{i}"], stats[f"bn{i}"]
            if train:
                mean, var = jnp.mean(z, axis=0), jnp.var(z, axis=0)
                n = z.shape[0]
                new[f"bn{i}"] = {"mean": BN_MOMENTUM * run["mean"] + (1 - BN_MOMENTUM) * mean,
                                 # (the running variance is the unbiased one, as PyTorch's)
                                 "var": BN_MOMENTUM * run["var"]
                                 + (1 - BN_MOMENTUM) * var * n / (n - 1)}
            else:
                mean, var = run["mean"], run["var"]
            z = (z - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
        z = _activation(exp, z, params, i)
        if outputs is not None:
            outputs[f"act{i}"] = z
        h = h + z if exp.residual and i > 0 else z
    return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0], new or stats


def _loss(exp: ex.Experiment, params: dict[str, Any], stats: dict[str, Any], x: jax.Array,
          y: jax.Array) -> tuple[jax.Array, tuple[dict[str, Any], dict[str, jax.Array]]]:
    outputs: dict[str, jax.Array] = {}
    logits, new = forward(exp, params, stats, x, train=True, outputs=outputs)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)), (new, outputs)


def run(exp: ex.Experiment, events: str | os.PathLike[str],
        settings: ex.Settings = ex.DEFAULT) -> ex.RunResult:
    """Train ``exp`` watched by gradwatch with ``settings``, writing the event file ``events``."""
    x_np, y_np = exp.dataset()
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    batches = ex.batch_indices(exp)
    start = time.perf_counter()
    params, stats = build(exp)
    named = sites(exp)
    tx = optax.sgd(exp.lr)
    if exp.clip_norm is not None:
        # Clipped after gradwatch has measured (as clip_grad_norm_ after backward in PyTorch).
        tx = optax.chain(optax.clip_by_global_norm(exp.clip_norm), tx)
    w = gradwatch.jax.watch(tx, check_every=exp.check_every, events=events, on_finding="log",
                            name=f"{exp.name} ({FRAMEWORK})", activations=named,
                            **settings.options())
    state = w.init(params)

    @jax.jit
    def step(params, stats, state, idx):
        (loss, (stats, outputs)), grads = jax.value_and_grad(
            functools.partial(_loss, exp), has_aux=True)(params, stats, x[idx], y[idx])
        acts = {"activations": outputs} if named else {}
        updates, state = w.update(grads, state, params, value=loss, **acts)
        return optax.apply_updates(params, updates), stats, state

    for idx in batches:
        params, stats, state = step(params, stats, state, jnp.asarray(idx))
    w.flush(state, params)  # the last check (it is otherwise sent at the next step)
    report = w.remove()
    logits = np.asarray(forward(exp, params, stats, x, train=False)[0], dtype=np.float64)
    seconds = time.perf_counter() - start
    return ex.RunResult(
        experiment=exp.name, framework=FRAMEWORK, settings=settings.name,
        findings=tuple(report.findings), final_loss=ex.bce_with_logits(logits, y_np),
        final_accuracy=ex.accuracy(logits, y_np), seconds=seconds, batches=len(batches),
        report=report, versions=versions())


def versions() -> str:
    return f"jax {jax.__version__}, optax {optax.__version__}"
