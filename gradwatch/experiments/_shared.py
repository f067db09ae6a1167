"""The numpy source every framework's run shares: layer sizes and names, initial weights, batch
order, and the loss and accuracy measured after training.

Each framework's runner builds the model an :class:`~gradwatch.experiments.Experiment`
describes, loads the weights :func:`initial_weights` made, trains on the batches
:func:`batch_indices` lists, and measures with :func:`bce_with_logits` and :func:`accuracy`; so a
PyTorch run and a Keras run of one experiment start from the same weights and see the same data
in the same order.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ._table import Experiment


class BatchPlan(Protocol):
    """What :func:`batch_indices` reads: an :class:`Experiment`, or any spec with these fields
    (the seeded benchmark suite passes its own)."""

    seed: int
    n: int
    batch: int
    steps: int


def layer_dims(exp: Experiment) -> list[tuple[int, int]]:
    """``(fan_in, fan_out)`` of every linear layer, input side first (the last is ``out``)."""
    dims = [2] + [exp.width] * exp.depth + [1]
    return list(zip(dims[:-1], dims[1:]))


def layer_names(exp: Experiment) -> list[str]:
    """The layers gradwatch watches (those owning parameters), input side first; the same in
    every framework."""
    names = []
    for i in range(exp.depth):
        names.append(f"fc{i}")
        if exp.batchnorm:
            names.append(f"bn{i}")
        if exp.activation == "prelu":
            names.append(f"act{i}")
    return names + ["out"]


def initial_weights(exp: Experiment) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(W [fan_in, fan_out], b [fan_out])`` per linear layer, float32, from the spec's seed.

    PyTorch's ``nn.Linear`` stores ``W.T``; Keras' ``Dense`` stores ``W``.
    """
    rng = np.random.default_rng([exp.seed, 1])
    out = []
    layers = layer_dims(exp)
    for i, (fan_in, fan_out) in enumerate(layers):
        if exp.init == "default":
            bound = 1 / math.sqrt(fan_in)
            w = rng.uniform(-bound, bound, (fan_in, fan_out))
            b = rng.uniform(-bound, bound, fan_out)
        elif exp.init == "xavier":
            bound = math.sqrt(6 / (fan_in + fan_out))
            w = rng.uniform(-bound, bound, (fan_in, fan_out))
            b = np.zeros(fan_out)
        else:  # he
            w = rng.normal(0, math.sqrt(2 / fan_in), (fan_in, fan_out))
            b = np.zeros(fan_out)
        w = w * exp.init_scale
        if exp.bias_init is not None and i < len(layers) - 1:
            b = np.full(fan_out, exp.bias_init)
        out.append((w.astype(np.float32), b.astype(np.float32)))
    return out


def batch_indices(exp: BatchPlan) -> np.ndarray:
    """``[steps, batch]`` example indices: one shuffled pass over the data after another."""
    rng = np.random.default_rng([exp.seed, 2])
    per_epoch = exp.n // exp.batch
    epochs = -(-exp.steps // per_epoch)
    idx = [rng.permutation(exp.n)[:per_epoch * exp.batch].reshape(per_epoch, exp.batch)
           for _ in range(epochs)]
    return np.concatenate(idx)[:exp.steps]


def bce_with_logits(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean binary cross-entropy of logits, computed stably (as both frameworks do)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    with np.errstate(all="ignore"):
        return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    """The fraction of examples whose logit has the label's side (a logit of 0 is class 0)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    return float(np.mean((z > 0) == (np.asarray(y).reshape(-1) > 0.5)))


