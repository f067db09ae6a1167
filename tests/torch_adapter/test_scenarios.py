"""Real small models that train for real: each detector fires on the broken run and stays
quiet on the healthy one."""

from __future__ import annotations

import pytest
import torch
from conftest import UNHEALTHY, kinds, mlp, train
from torch import nn

import gradwatch


@pytest.mark.parametrize("build, scale", [
    pytest.param(lambda: mlp(10, act=nn.Sigmoid), 1.0, id="sigmoid-10-layers"),
    pytest.param(lambda: mlp(10, act=nn.Sigmoid), 100.0, id="sigmoid-10-layers-inputs-x100"),
    pytest.param(lambda: mlp(10, act=nn.Tanh, init="small"), 1.0, id="tanh-10-layers-tiny-init"),
])
def test_deep_saturating_nets_report_vanishing_gradients_in_the_first_layers(build, scale):
    torch.manual_seed(0)
    w = train(build(), scale=scale)
    vanishing = [f for f in w.findings if f.kind == "vanishing_gradient"]
    assert vanishing, w.report()
    f = vanishing[0]
    assert f.layer == "0"  # the first Linear: furthest from the loss
    assert f.value < 1e-4 and f.evidence["ratio_to_largest"]["0"] < 1e-3
    assert "first of 11" in f.message
    # Advice comes from the model: it names the saturating activation and the structural fixes.
    advice = " ".join(f.advice)
    assert "ReLU" in advice and "BatchNorm" in advice and "residual" in advice
    assert any(issubclass(c.category, gradwatch.VanishingGradientWarning) for c in w.caught)
    # It is not mistaken for a learning-rate problem.
    assert "stalled_update" not in kinds(w)


def test_saturated_inputs_are_reported_as_saturated_sigmoid_units():
    torch.manual_seed(0)
    w = train(mlp(10, act=nn.Sigmoid), scale=100.0)
    sat = [f for f in w.findings if f.kind == "saturated_units"]
    assert sat and sat[0].layer == "1"  # the sigmoid right after the first Linear
    assert sat[0].value > 0.5


@pytest.mark.parametrize("build, lr", [
    pytest.param(lambda: mlp(10, act=nn.ReLU, init="he"), 0.05, id="relu-he-10-layers"),
    pytest.param(lambda: mlp(3, act=nn.ReLU), 0.1, id="relu-3-layers-default-init"),
    pytest.param(lambda: mlp(10, act=nn.ReLU, init="he", bn=True), 0.1, id="relu-batchnorm-10"),
])
def test_healthy_converging_mlps_stay_quiet(build, lr):
    torch.manual_seed(0)
    w = train(build(), lr=lr, steps=300)
    assert not kinds(w) & UNHEALTHY, w.report()
    assert w.last_loss < 0.3  # it really trained


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )


def test_small_cnn_with_batchnorm_stays_quiet():
    # Synthetic 12x12 images: class 1 has a bright horizontal bar, class 0 a vertical one.
    g = torch.Generator().manual_seed(0)
    n = 256
    x = torch.randn(n, 1, 12, 12, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(2, 10, (n,), generator=g)
    for i in range(n):
        if y[i]:
            x[i, 0, pos[i], :] += 2
        else:
            x[i, 0, :, pos[i]] += 2
    model = small_cnn()
    torch.manual_seed(0)
    w = train(model, lr=0.05, steps=150, batch=32, data=(x, y),
              loss_fn=lambda out, t: nn.functional.cross_entropy(out, t.long()))
    assert not kinds(w) & UNHEALTHY, w.report()
    assert w.last_loss < 0.5


def test_tiny_learning_rate_is_stalled_updates_not_vanishing_gradients():
    torch.manual_seed(0)
    w = train(mlp(3, act=nn.ReLU, init="he"), lr=1e-7)
    assert "stalled_update" in kinds(w)
    assert "vanishing_gradient" not in kinds(w)
    f = next(f for f in w.findings if f.kind == "stalled_update")
    assert f.value < 1e-5
    assert "learning rate (now 1e-07" in f.advice[0]
    assert any(issubclass(c.category, gradwatch.UpdateRatioWarning) for c in w.caught)


def test_huge_learning_rate_is_reported_without_crashing_training():
    torch.manual_seed(0)
    w = train(mlp(3, act=nn.ReLU, init="he"), lr=50.0, steps=60)
    assert w.step == 60  # training ran to the end
    assert kinds(w) & {"nonfinite", "loss_divergence", "exploding_gradient"}
    nonfinite = [f for f in w.findings if f.kind == "nonfinite"]
    assert len(nonfinite) == 1  # one condition, not one per check
    assert w.report().internal_errors == ()


class ReluRNN(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(1, 16, nonlinearity="relu", batch_first=True)
        with torch.no_grad():
            # IRNN-style identity recurrence (Le et al. 2015) scaled: spectral radius = gain.
            self.rnn.weight_hh_l0.copy_(gain * torch.eye(16))
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("gain, explodes", [
    pytest.param(1.5, True, id="recurrent-gain-1.5"),
    pytest.param(0.9, False, id="recurrent-gain-0.9"),
])
def test_relu_rnn_with_recurrent_gain_above_one_explodes(gain, explodes):
    torch.manual_seed(0)
    x = torch.rand(256, 40, 1)
    y = (x.sum(dim=(1, 2)) > 20).float()
    model = ReluRNN(gain)
    w = train(model, lr=1e-4, steps=40, data=(x, y))
    found = [f for f in w.findings if f.kind == "exploding_gradient"]
    assert bool(found) == explodes, w.report()
    if explodes:
        assert found[0].layer == "rnn"
        assert any("clip" in a for a in found[0].advice)
        assert any("spectral radius" in a for a in found[0].advice)
