"""A two-minute preview of the reference experiments: the deep-sigmoid failure and its repair."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch
from torch import nn

import gradwatch


def moons(n: int = 512, noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half-circles, made in code (nothing is downloaded)."""
    rng = np.random.default_rng(seed)
    half = n // 2
    t = rng.uniform(0, math.pi, n)
    x = np.concatenate([np.c_[np.cos(t[:half]), np.sin(t[:half])],
                        np.c_[1 - np.cos(t[half:]), 0.5 - np.sin(t[half:])]])
    x += rng.normal(0, noise, x.shape)
    y = np.r_[np.zeros(half), np.ones(n - half)]
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def mlp(depth: int, width: int, activation: type[nn.Module], he_init: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if he_init:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        layers += [lin, activation()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


CASES = {
    "deep-sigmoid": (lambda: mlp(10, 32, nn.Sigmoid), {"vanishing_gradient"}),
    "deep-relu-he": (lambda: mlp(10, 32, nn.ReLU, he_init=True), set()),
}


def run_case(name: str, steps: int = 300, seed: int = 0) -> dict:
    build, expected = CASES[name]
    torch.manual_seed(seed)
    model = build()
    x, y = moons(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.BCEWithLogitsLoss()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(model, optimizer=opt) as watcher:
            for _ in range(steps):
                idx = torch.randint(0, len(x), (64,))
                opt.zero_grad()
                loss = loss_fn(model(x[idx]).squeeze(-1), y[idx])
                loss.backward()
                watcher.observe_loss(loss)
                opt.step()
    with torch.no_grad():
        logits = model(x).squeeze(-1)
        acc = float(((logits > 0).float() == y).float().mean())
        final = float(loss_fn(logits, y))
    kinds = {f.kind for f in watcher.findings}
    verdict = "vanishing_gradient" in kinds if expected else "vanishing_gradient" not in kinds
    return {"name": name, "findings": sorted(kinds), "loss": final, "accuracy": acc,
            "seconds": time.perf_counter() - start, "pass": verdict,
            "report": watcher.report()}
