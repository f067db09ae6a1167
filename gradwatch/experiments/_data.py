"""The reference experiments' data sets, made in code with numpy: nothing is downloaded."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np


def moons(n: int = 512, noise: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaving half-circles (2 inputs, labels 0/1), made in code: nothing is downloaded.

    Returns ``(x, y)``: float32 arrays of shape ``[n, 2]`` and ``[n]``.
    """
    rng = np.random.default_rng(seed)
    half = n // 2
    t = rng.uniform(0, math.pi, n)
    x = np.concatenate([np.c_[np.cos(t[:half]), np.sin(t[:half])],
                        np.c_[1 - np.cos(t[half:]), 0.5 - np.sin(t[half:])]])
    x += rng.normal(0, noise, x.shape)
    y = np.r_[np.zeros(half), np.ones(n - half)]
    return x.astype(np.float32), y.astype(np.float32)


def circles(n: int = 512, noise: float = 0.1, factor: float = 0.5,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two concentric circles (inner radius ``factor``; label 1 inside), made in code.

    Returns ``(x, y)``: float32 arrays of shape ``[n, 2]`` and ``[n]``.
    """
    rng = np.random.default_rng(seed)
    half = n // 2
    t = rng.uniform(0, 2 * math.pi, n)
    r = np.r_[np.ones(half), np.full(n - half, factor)]
    x = np.c_[r * np.cos(t), r * np.sin(t)] + rng.normal(0, noise, (n, 2))
    y = np.r_[np.zeros(half), np.ones(n - half)]
    return x.astype(np.float32), y.astype(np.float32)


#: The data sets an :class:`~gradwatch.experiments.Experiment` can name in ``data``.
DATASETS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "moons": moons, "circles": circles}
