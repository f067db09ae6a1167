"""Ordinary setups that real training uses: float64, accelerate's and Lightning's optimizer
wrappers, clipping that never needs to clip, skip connections written inline, transformers'
activation modules, L2 penalties, zero-initialised biases. Each checked against what the model
really is, read without gradwatch."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch


def train(model, opt, watcher, steps, *, clip=None, dtype=torch.float32, penalty=0.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=gen, dtype=dtype)
        y = x[:, :1].sin()
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        if penalty:
            loss = loss + penalty * sum((p * p).sum() for p in model.parameters() if p.dim() > 1)
        loss.backward()
        watcher.observe_loss(loss)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()


def mlp(depth=3, width=16, act=nn.Tanh):
    layers, d = [], 8
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


def test_a_float64_model_is_watched_like_a_float32_one():
    torch.manual_seed(0)
    model = mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.GradWatchInternalWarning)
        with gradwatch.torch.watch(model, optimizer=opt, check_every=5) as w:
            train(model, opt, w, 20, dtype=torch.float64)
    assert w.step == 20 and w.report().checks == 4
    # the gradient norms it reports are the model's own, read back in float64
    x = torch.randn(16, 8, dtype=torch.float64)
    model.zero_grad()
    ((model(x) - x[:, :1].sin()) ** 2).mean().backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert math.isfinite(w.report().layers[0].grad_norm)


class Bare(torch.optim.SGD):
    """An Optimizer subclass that never ran Optimizer.__init__ (as accelerate's wrapper)."""

    def __init__(self, inner):  # noqa: D107 - deliberately skips super().__init__
        self.inner = inner


def test_an_optimizer_without_hooks_is_a_clear_type_error():
    model = mlp()
    with pytest.raises(TypeError, match=r"optimizer: .*Bare.*Optimizer.__init__"):
        gradwatch.torch.watch(model, optimizer=Bare(torch.optim.SGD(model.parameters(), 0.1)))


def test_accelerates_optimizer_wrapper_is_looked_through():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    acc = accelerate.Accelerator(cpu=True)
    model = mlp()
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert type(opt).__name__ == "AcceleratedOptimizer"
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5) as w:
        train(model, opt, w, 10)
    assert w.step == 10  # the real optimizer's steps, seen through the wrapper


def test_lightnings_optimizer_wrapper_is_looked_through():
    core = pytest.importorskip("lightning.pytorch.core.optimizer")
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    wrapped = core.LightningOptimizer(inner)
    with gradwatch.torch.watch(model, optimizer=wrapped, check_every=5) as w:
        train(model, inner, w, 10)
    assert w.step == 10


@pytest.mark.parametrize("clip, expected", [
    pytest.param(100.0, True, id="clip-norm-above-the-gradient-never-clips"),
    pytest.param(0.01, True, id="clip-norm-that-clips"),
    pytest.param(None, None, id="no-clipping"),
])
def test_clipping_is_noticed_even_when_it_never_has_to_clip(clip, expected):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5) as w:
        train(model, opt, w, 10, clip=clip)
        assert w.monitor.context.model.clipping is expected
    if clip == 100.0:  # the gradient really is below the clip norm (the label's own check)
        model.zero_grad()
        x = torch.randn(16, 8)
        ((model(x) - x[:, :1].sin()) ** 2).mean().backward()
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        assert total < 100.0


def test_advice_stops_suggesting_clipping_once_clipping_is_seen():
    from gradwatch._advice import exploding

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5) as w:
        assert any("clip" in a for a in exploding(w.monitor.context))
        train(model, opt, w, 10, clip=100.0)
        assert not any("clip" in a for a in exploding(w.monitor.context))


class Block(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))  # the skip, written inline


class Stack(nn.Module):
    """No module name hints at a skip connection."""

    def __init__(self, residual: bool):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(Block() if residual else nn.Sequential(
            nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(3))
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


@pytest.mark.parametrize("residual", [True, False], ids=["inline-skips", "plain-stack"])
def test_skip_connections_are_read_from_the_autograd_graph(residual):
    model = Stack(residual)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.torch.watch(model, optimizer=opt) as w:
        assert w.monitor.context.model.residual is None  # not known before a forward pass
        train(model, opt, w, 2)
        assert w.monitor.context.model.residual is residual


def test_transformers_blocks_are_residual_and_their_activations_known():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with gradwatch.torch.watch(model, optimizer=opt) as w:
        out = model(input_ids=torch.randint(0, 50, (4, 6)), labels=torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        opt.step()
        info = w.monitor.context.model
    assert info.residual is True
    # GELUActivation in every block; the only tanh is the pooler's
    assert info.activation_counts == {"gelu": 2, "tanh": 1}
    from gradwatch._advice import vanishing

    advice = " ".join(vanishing(w.monitor.context, [0]))
    assert "tanh" not in advice and "fewer layers" not in advice
    assert "residual" not in advice and "unit gain" not in advice


def test_the_gradient_across_the_weights_matches_an_independent_computation():
    """grad_norm_orthogonal: per tensor ||g||^2 - (g.W)^2/||W||^2, summed per layer, from the
    definition, with the model's own tensors."""
    torch.manual_seed(0)
    model = mlp(depth=2)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # a large step: before != after
    seen = []
    keep = type("Keep", (), {"gradwatch_step_stats": gradwatch.hookimpl(
        lambda self, stats: seen.append(stats))})()
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=1, plugins=[keep])
    x = torch.randn(16, 8)
    opt.zero_grad()
    loss = ((model(x) - x[:, :1].sin()) ** 2).mean() + 1e-2 * sum(
        (p * p).sum() for p in model.parameters() if p.dim() > 1)
    loss.backward()
    linear = [m for m in model if isinstance(m, nn.Linear)]
    expected = [math.sqrt(sum(float((p.grad ** 2).sum() - (p.grad * p).sum() ** 2 / (p ** 2).sum())
                              for p in m.parameters())) for m in linear]
    norms = [math.sqrt(sum(float((p.grad ** 2).sum()) for p in m.parameters())) for m in linear]
    opt.step()
    w.remove()
    stats = seen[-1]
    np.testing.assert_allclose(stats.grad_norm[-1], norms, rtol=1e-4)
    # with the weights the gradient was computed at (before the step), not the updated ones
    np.testing.assert_allclose(stats.grad_norm_orthogonal, expected, rtol=1e-3)
    moved = [math.sqrt(sum(float((p.grad ** 2).sum() - (p.grad * p).sum() ** 2 / (p ** 2).sum())
                           for p in m.parameters())) for m in linear]
    assert not np.allclose(moved, expected, rtol=1e-3)
    assert all(o < n for o, n in zip(expected, norms))


def test_an_l2_penalty_does_not_hide_a_vanishing_gradient():
    """The penalty's pull 2λW keeps the first layers' gradient above the absolute threshold;
    with the part parallel to W set aside, the vanished data gradient shows."""
    torch.manual_seed(0)
    model = mlp(depth=10, act=nn.Sigmoid)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradwatch.torch.watch(model, optimizer=opt, on_finding="log") as w:
        train(model, opt, w, 50, penalty=1e-3)
    # the label, from the raw gradients: the first layer's gradient is the penalty's pull
    x = torch.randn(64, 8)
    model.zero_grad()
    ((model(x) - x[:, :1].sin()) ** 2).mean().backward()
    data = model[0].weight.grad.norm().item()
    pull = (2e-3 * model[0].weight).norm().item()
    assert data < 1e-3 * pull and pull > 1e-4
    found = [f for f in w.findings if f.kind == "vanishing_gradient" and f.is_warning]
    assert found and found[0].layer == "0" and found[0].step <= 50
    assert found[0].evidence["l2_penalty"] is True and "L2 penalty" in found[0].message


def test_a_layer_that_starts_at_zero_has_no_relative_change():
    """A tied decoder leaves a bias-only layer that starts at 0: no ratio divides by ~0."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Embedding(20, 8)
            self.dec = nn.Linear(8, 20)
            self.dec.weight = self.enc.weight
            nn.init.zeros_(self.dec.bias)

        def forward(self, ids):
            return self.dec(self.enc(ids))

    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=2, on_finding="log") as w:
        for _ in range(10):
            ids = torch.randint(0, 20, (32,))
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(ids), (ids + 1) % 20)
            loss.backward()
            w.observe_loss(loss)
            opt.step()
    dec = next(r for r in w.report().layers if r.name == "dec")
    assert math.isnan(dec.weight_change)  # started at 0: no "inf %"
    assert not [f for f in w.findings if f.kind == "large_update" and f.layer == "dec"]


@pytest.mark.parametrize("update_ratio", ["sampled", "exact"])
def test_remove_releases_the_models_tensors_while_the_watcher_lives(update_ratio):
    """The documented use keeps the watcher (``print(w.report())`` after the block): its
    parameters and their gradients must not be held by it."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5,
                               update_ratio=update_ratio) as w:
        train(model, opt, w, 12)
    weight, grad = weakref.ref(model[0].weight), weakref.ref(model[0].weight.grad)
    del model, opt
    gc.collect()
    assert weight() is None and grad() is None
    assert w.report().steps == 12 and "0" in str(w.report())  # the report still works


def test_the_event_file_carries_the_gradient_across_the_weights(tmp_path):
    import json

    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "run.jsonl"
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5, events=path) as w:
        train(model, opt, w, 10, penalty=1e-2)
    stats = [json.loads(x) for x in path.read_text().splitlines()]
    stats = [e for e in stats if e["event"] == "stats"]
    assert len(stats) == 2
    for e in stats:
        orth, norms = np.array(e["grad_norm_orthogonal"]), np.array(e["grad_norm"])
        assert orth.shape == norms.shape and (orth <= norms * (1 + 1e-6)).all() and (orth > 0).all()
