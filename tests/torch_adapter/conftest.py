"""Small real models and a training loop shared by the PyTorch adapter tests."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.experiments import moons  # noqa: E402


def mlp(depth: int, width: int = 32, act: type[nn.Module] = nn.ReLU, init: str | None = None,
        bn: bool = False, d_in: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "small":
            nn.init.normal_(lin.weight, std=0.01)
        elif init == "xavier":
            nn.init.xavier_normal_(lin.weight)
        layers += [lin] + ([nn.BatchNorm1d(width)] if bn else []) + [act()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def train(model: nn.Module, *, lr: float = 0.05, steps: int = 200, scale: float = 1.0,
          opt: str = "sgd", batch: int = 64, seed: int = 0, data=None, loss_fn=None,
          **options) -> gradwatch.torch.watch:
    """Train on moons with gradwatch watching; warnings are recorded, not printed."""
    torch.manual_seed(seed)
    x, y = data if data is not None else map(torch.from_numpy, moons(seed=seed))
    x = x * scale
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=lr))
    loss_fn = loss_fn or nn.BCEWithLogitsLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with gradwatch.torch.watch(model, optimizer=optimizer, **options) as watcher:
            for _ in range(steps):
                idx = torch.randint(0, len(x), (batch,))
                optimizer.zero_grad()
                loss = loss_fn(model(x[idx]).squeeze(-1), y[idx])
                loss.backward()
                watcher.observe_loss(loss)
                optimizer.step()
    watcher.caught = [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)]
    watcher.last_loss = float(loss.detach())
    return watcher


def kinds(watcher) -> set[str]:
    return {f.kind for f in watcher.findings}


#: What a healthy run must never report.
UNHEALTHY = {"vanishing_gradient", "exploding_gradient", "nonfinite", "stalled_update",
             "loss_divergence"}
