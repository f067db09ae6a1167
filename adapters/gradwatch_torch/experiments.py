"""The reference experiments in PyTorch: build the spec's model, train it watched, return what
happened. :class:`gradwatch_torch.plugin.TorchRunner` is the way in; this module imports torch."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

import gradwatch
from gradwatch import experiments as ex

FRAMEWORK = "torch"


def _activation(exp: ex.Experiment, width: int) -> nn.Module:
    name = exp.activation
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(exp.negative_slope)
    return nn.PReLU(num_parameters=width, init=0.25)  # one slope per unit, as Keras' PReLU


class MLP(nn.Module):
    """``fc{i} -> [bn{i}] -> act{i}`` per hidden layer, then ``out``."""

    def __init__(self, exp: ex.Experiment) -> None:
        super().__init__()
        self.depth = exp.depth
        self.skip = exp.residual
        for i, ((fan_in, fan_out), (w, b)) in enumerate(zip(ex.layer_dims(exp),
                                                            ex.initial_weights(exp))):
            lin = nn.Linear(fan_in, fan_out)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(w.T))
                lin.bias.copy_(torch.from_numpy(b))
            if i == exp.depth:
                self.out = lin
                break
            self.add_module(f"fc{i}", lin)
            if exp.batchnorm:
                # PyTorch's defaults; the Keras run sets momentum=0.9, epsilon=1e-5 to match.
                self.add_module(f"bn{i}", nn.BatchNorm1d(fan_out))
            self.add_module(f"act{i}", _activation(exp, fan_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(self.depth):
            z = getattr(self, f"fc{i}")(h)
            if hasattr(self, f"bn{i}"):
                z = getattr(self, f"bn{i}")(z)
            z = getattr(self, f"act{i}")(z)
            h = h + z if self.skip and i > 0 else z
        return self.out(h)


class ResidualMLP(MLP):
    """The same, with identity skips (the class name tells gradwatch's advice about them)."""


def build(exp: ex.Experiment) -> nn.Module:
    """The spec's model with the spec's initial weights."""
    return ResidualMLP(exp) if exp.residual else MLP(exp)


def run(exp: ex.Experiment, events: str | os.PathLike[str],
        settings: ex.Settings = ex.DEFAULT) -> ex.RunResult:
    """Train ``exp`` watched by gradwatch with ``settings``, writing the event file ``events``."""
    threads = torch.get_num_threads()
    # Models this small run fastest on one thread, and one thread cannot be oversubscribed.
    torch.set_num_threads(1)
    try:
        return _run(exp, events, settings)
    finally:
        torch.set_num_threads(threads)


def _run(exp: ex.Experiment, events: str | os.PathLike[str],
         settings: ex.Settings) -> ex.RunResult:
    torch.manual_seed(exp.seed)
    x_np, y_np = exp.dataset()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    batches = torch.from_numpy(ex.batch_indices(exp))
    start = time.perf_counter()
    model = build(exp)
    opt = torch.optim.SGD(model.parameters(), lr=exp.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    trained = 0
    with gradwatch.torch.watch(model, optimizer=opt, check_every=exp.check_every, events=events,
                               on_finding="log", name=f"{exp.name} ({FRAMEWORK})",
                               **settings.options()) as watcher:
        for idx in batches:
            opt.zero_grad()
            loss = loss_fn(model(x[idx]).squeeze(-1), y[idx])
            loss.backward()
            watcher.observe_loss(loss)
            if exp.clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), exp.clip_norm)
            opt.step()
            trained += 1
    model.eval()
    with torch.no_grad():
        logits = model(x).squeeze(-1).numpy().astype(np.float64)
    seconds = time.perf_counter() - start
    return ex.RunResult(
        experiment=exp.name, framework=FRAMEWORK, settings=settings.name,
        findings=tuple(watcher.findings), final_loss=ex.bce_with_logits(logits, y_np),
        final_accuracy=ex.accuracy(logits, y_np), seconds=seconds, batches=trained,
        report=watcher.report(), versions=versions())


def versions() -> str:
    return f"torch {torch.__version__}"
