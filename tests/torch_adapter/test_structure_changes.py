"""The model or the optimizer changes after watch(): unfreezing, a replaced module, tensors the
model does not own. Training goes on, the new layers are watched and named, the old ones
are let go, and one log record says what changed."""

from __future__ import annotations

import logging
import math

import pytest

torch = pytest.importorskip("torch")
from conftest import mlp  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch.experiments import moons  # noqa: E402

CHECK_EVERY = 5


class Recorder:
    """Every step's per-layer gradient norm, by layer name."""

    def __init__(self) -> None:
        self.norms: dict[int, dict[str, float]] = {}

    @gradwatch.hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        for step, row in zip(stats.steps, stats.grad_norm):
            self.norms[int(step)] = dict(zip(stats.layers, row.tolist()))


def loop(net, opt, w, steps, gen=None):
    x, y = map(torch.from_numpy, moons(seed=0))
    gen = gen or torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        if opt is not None:
            opt.zero_grad()
        else:
            net.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(-1), y[idx])
        loss.backward()
        w.observe_loss(loss)
        if opt is not None:
            opt.step()


def hooks_of(tensor: torch.Tensor) -> int:
    return len(getattr(tensor, "_post_accumulate_grad_hooks", None) or {})


def changes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "gradwatch" and "model changed" in r.getMessage()]


def test_unfreezing_the_backbone_with_add_param_group_watches_its_gradients(caplog):
    """Fine-tuning schedule: the head trains first, then the head is frozen and the backbone
    unfrozen. At watch time no backbone tensor could take a gradient hook, and after the switch
    no hooked tensor gets a gradient: without picking up the change nothing would be read."""
    caplog.set_level(logging.INFO, logger="gradwatch")
    torch.manual_seed(0)
    model = mlp(3, width=16)  # Linear layers "0", "2", "4", head "6"
    backbone = [p for name, p in model.named_parameters() if not name.startswith("6.")]
    for p in backbone:
        p.requires_grad_(False)
    opt = torch.optim.SGD(model[6].parameters(), lr=0.05)
    recorder = Recorder()
    with gradwatch.torch.watch(model, optimizer=opt, check_every=CHECK_EVERY,
                               plugins=[recorder]) as w:
        loop(model, opt, w, 30)
        model[6].requires_grad_(False)
        for p in backbone:
            p.requires_grad_(True)
        opt.add_param_group({"params": backbone})
        loop(model, opt, w, 30)
        # No hook per tensor, on the backbone or the frozen head: with an optimizer one hook
        # per backward pass (on the model's output) reads every gradient.
        assert [hooks_of(p) for p in model.parameters()] == [0] * 8
    before = [recorder.norms[s] for s in range(1, 31)]
    after = [recorder.norms[s] for s in range(36, 61)]  # picked up at the check of step 35
    assert all(math.isnan(r["0"]) and r["6"] > 0 for r in before)
    assert all(r["0"] > 0 and r["2"] > 0 and r["4"] > 0 and math.isnan(r["6"]) for r in after)
    assert w.step == 60
    (record,) = changes(caplog)
    assert "step 35" in record and "tensors with gradients: 2 -> 6" in record


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(2, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.act(self.body(x)))


def deep_sigmoid_body() -> nn.Sequential:
    layers: list[nn.Module] = []
    d = 2
    for _ in range(10):
        layers += [nn.Linear(d, 16), nn.Sigmoid()]
        d = 16
    return nn.Sequential(*layers)


@pytest.mark.parametrize("how", [
    pytest.param("add_param_group", id="replaced-and-added-to-the-optimizer"),
    pytest.param("module-only", id="replaced-optimizer-untouched"),
    pytest.param("no-optimizer", id="replaced-watched-without-optimizer"),
])
def test_a_replaced_module_is_watched_and_named_in_findings(how, caplog):
    """A healthy 2-layer net; its body is then replaced by 10 sigmoid layers whose first
    layers' gradients vanish. The finding must name the new 'body.0'."""
    caplog.set_level(logging.INFO, logger="gradwatch")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if how != "no-optimizer" else None
    old = model.body
    gen = torch.Generator().manual_seed(1)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=CHECK_EVERY,
                               on_finding="log") as w:
        loop(model, opt, w, 40, gen)
        assert not w.findings
        model.body = deep_sigmoid_body()
        if how == "add_param_group":
            opt.add_param_group({"params": model.body.parameters()})
        loop(model, opt, w, 60, gen)
        assert list(w.layers()) == [f"body.{i}" for i in range(0, 20, 2)] + ["head"]
        assert hooks_of(old.weight) == hooks_of(old.bias) == 0  # let go of the old module
        # Without an optimizer every tensor's hook tells a backward pass; with one, the
        # model's output does.
        per_tensor = 1 if opt is None else 0
        assert all(hooks_of(p) == per_tensor for p in model.parameters())
        report = str(w.report())
    assert w.step == 100
    vanishing = [f for f in w.findings if f.kind == "vanishing_gradient"]
    assert vanishing and vanishing[0].layer == "body.0", [str(f) for f in w.findings]
    assert "'body.0'" in report
    (record,) = changes(caplog)
    # A changed optimizer is seen at the next check (step 45); otherwise the periodic rescan
    # finds it (every 10th check: step 50).
    at = 45 if how == "add_param_group" else 50
    assert f"at step {at}" in record
    assert "layers added: 'body.0', 'body.2'" in record and "removed: 'body'" in record
    # remove() leaves the changed model exactly as it was: no hook anywhere.
    assert all(hooks_of(p) == 0 for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_optimizer_tensors_outside_the_model_are_reported_not_watched(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    torch.manual_seed(0)
    model = mlp(2, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    temperature = nn.Parameter(torch.ones(()))

    class Scaled(nn.Module):
        def forward(self, x):
            return model(x) * temperature

    with gradwatch.torch.watch(model, optimizer=opt, check_every=CHECK_EVERY) as w:
        loop(Scaled(), opt, w, 12)
        opt.add_param_group({"params": [temperature]})
        loop(Scaled(), opt, w, 12)
    assert w.step == 24 and list(w.layers()) == ["0", "2", "4"]
    (record,) = changes(caplog)
    assert "step 15" in record and "1 tensor(s) that are not parameters of the model" in record
