"""The seeded-bug benchmark in PyTorch: build a spec's model, train it, gather raw evidence.

The evidence is read from PyTorch itself, never from gradwatch: ``p.grad`` after every
training step's ``backward`` (with ``torch.linalg.vector_norm``), and at the probe steps the
gradient of the data loss on the probe batch (``torch.autograd.grad``, which fires no
post-accumulate hook, so gradwatch sees nothing of it) and the activations of a forward pass
that calls each module's ``forward`` directly (no module hooks run, so gradwatch samples nothing).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gradwatch

from . import families as fm

FRAMEWORK = "torch"


class Exp(nn.Module):
    """``exp`` as an activation module (what a Keras ``activation="exponential"`` is)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


class ChannelsLastFlatten(nn.Module):
    """Flattens an NCHW map in NHWC order, as Keras' ``Flatten`` does on channels-last maps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


_ACT = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "exp": Exp}


class Net(nn.Module):
    """The spec's layers as named modules: ``fc{i}``/``conv{i}`` (then ``act{i}``), ``pool{i}``,
    ``flatten``, ``out``; the parameterised layers carry :func:`families.initial_weights`."""

    def __init__(self, spec: fm.ModelSpec) -> None:
        super().__init__()
        names = iter(fm.param_layers(spec))
        weights = iter(fm.initial_weights(spec))
        #: ``(module name, relu site name or None)`` in forward order.
        self.order: list[tuple[str, str | None]] = []
        for i, layer in enumerate(spec.layers):
            if layer.kind in ("dense", "conv"):
                name, _ = next(names)
                w, b = next(weights)
                if layer.kind == "dense":
                    mod = nn.Linear(w.shape[0], w.shape[1])
                    wt = w.T
                else:
                    mod = nn.Conv2d(w.shape[2], w.shape[3], w.shape[0])
                    wt = w.transpose(3, 2, 0, 1)
                with torch.no_grad():
                    mod.weight.copy_(torch.from_numpy(np.ascontiguousarray(wt)))
                    mod.bias.copy_(torch.from_numpy(b))
                self.add_module(name, mod)
                self.order.append((name, None))
                if layer.activation is not None:
                    self.add_module(f"act{i}", _ACT[layer.activation]())
                    self.order.append((f"act{i}", name if layer.activation == "relu" else None))
            elif layer.kind == "pool":
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
                self.order.append((f"pool{i}", None))
            else:
                self.add_module("flatten", ChannelsLastFlatten())
                self.order.append(("flatten", None))
        self.param_names = [n for n, _ in fm.param_layers(spec)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, _ in self.order:
            x = getattr(self, name)(x)
        return x

    def trace(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The same forward through each module's ``forward`` (no hooks run): the logits and the
        output of every ReLU, keyed by the layer it follows."""
        acts = {}
        for name, site in self.order:
            x = getattr(self, name).forward(x)
            if site is not None:
                acts[site] = x
        return x, acts

    def layer_params(self) -> list[list[nn.Parameter]]:
        return [list(getattr(self, n).parameters()) for n in self.param_names]

    def kernels(self) -> list[nn.Parameter]:
        return [getattr(self, n).weight for n in self.param_names]


def build(spec: fm.ModelSpec) -> Net:
    return Net(spec)


def to_torch_x(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x)
    return t.permute(0, 3, 1, 2).contiguous() if t.ndim == 4 else t


def _dead_fraction(a: torch.Tensor) -> float:
    """Share of units (features; channels of a conv map) zero for every example and position."""
    per_unit = a.sum(dim=(0, 2, 3)) if a.ndim == 4 else a.sum(dim=0)
    return float((per_unit <= 0).float().mean())


def _layer_norms(grads: list[torch.Tensor | None], sizes: list[int]) -> list[float]:
    out, i = [], 0
    for n in sizes:
        parts = [g for g in grads[i:i + n] if g is not None]
        i += n
        out.append(float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in parts]))) if parts else 0.0)
    return out


def _penalty(model: Net, l2: float) -> torch.Tensor:
    return l2 * sum(torch.sum(w * w) for w in model.kernels())


def _probe(spec: fm.ModelSpec, model: Net, step: int, x: torch.Tensor, y: torch.Tensor,
           px: torch.Tensor, py: torch.Tensor) -> fm.Probe:
    params = [p for ps in model.layer_params() for p in ps]
    sizes = [len(ps) for ps in model.layer_params()]
    with torch.no_grad():
        logits, _ = model.trace(x)
        loss = float(F.cross_entropy(logits, y))
        acc = float((logits.argmax(-1) == y).float().mean())
    logits, acts = model.trace(px)
    data = F.cross_entropy(logits, py)
    grads = torch.autograd.grad(data, params, retain_graph=bool(spec.l2), allow_unused=True)
    norms = _layer_norms(list(grads), sizes)
    penalty = 0.0
    total = norms
    if spec.l2:
        pen = _penalty(model, spec.l2)
        penalty = float(pen)
        tgrads = torch.autograd.grad(data + pen, params, allow_unused=True)
        total = _layer_norms(list(tgrads), sizes)
    dead = {site: _dead_fraction(a.detach()) for site, a in acts.items()}
    return fm.Probe(step=step, loss=loss, accuracy=acc, penalty=penalty, grad_norm=norms,
                    total_grad_norm=total, dead_fraction=dead)


def run(spec: fm.ModelSpec, watch: bool = True) -> fm.RunResult:
    """Train ``spec`` (watched by gradwatch with its defaults when ``watch``) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fm.run_spec(spec, FRAMEWORK, watch, _train)
    finally:
        torch.set_num_threads(threads)


def _train(spec: fm.ModelSpec, watch: bool, ev: fm.Evidence) -> list:
    torch.manual_seed(spec.seed)
    data = fm.dataset(spec)
    x, y = to_torch_x(data.x), torch.from_numpy(data.y)
    pidx = torch.from_numpy(fm.probe_indices(spec))
    px, py = x[pidx], y[pidx]
    batches = torch.from_numpy(fm.batch_indices(spec))
    probe_at = set(fm.probe_steps(spec))
    model = build(spec)
    params = [p for ps in model.layer_params() for p in ps]
    sizes = [len(ps) for ps in model.layer_params()]
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    watcher = gradwatch.torch.watch(model, optimizer=opt, on_finding="log") if watch else None
    ratios, grad_max, loss_max, nonfinite = [], 0.0, -np.inf, False
    try:
        for step, idx in enumerate(batches):
            if step in probe_at:
                ev.probes.append(_probe(spec, model, step, x, y, px, py))
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            if spec.l2:
                loss = loss + _penalty(model, spec.l2)
            loss.backward()
            norms = np.array(_layer_norms([p.grad for p in params], sizes))
            lv = float(loss.detach())
            if not (np.all(np.isfinite(norms)) and np.isfinite(lv)):
                nonfinite = True
            else:
                grad_max, loss_max = max(grad_max, norms.max()), max(loss_max, lv)
                if step >= spec.steps // 2 and norms.max() > 0:
                    ratios.append(norms[0] / norms.max())
            if watcher is not None:
                watcher.observe_loss(loss)
            opt.step()
        ev.probes.append(_probe(spec, model, spec.steps, x, y, px, py))
    finally:
        if watcher is not None:
            watcher.remove()
    ev.train_ratio_median = float(np.median(ratios)) if ratios else float("nan")
    ev.train_grad_max = float(grad_max)
    ev.train_loss_max = float(loss_max)
    ev.train_nonfinite = nonfinite
    return list(watcher.findings) if watcher is not None else []


def versions() -> str:
    return f"torch {torch.__version__}"
