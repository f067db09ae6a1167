"""Every statistic the PyTorch adapter reports, against a hand computation from its definition in
docs/detectors.md, on tensors the test captures itself (gradients after backward, weights before
and after ``opt.step()``, activation outputs from its own forward hooks); and finite gradients
too large for float32 sums, which must read as huge, not as non-finite."""

from __future__ import annotations

import gc
import json
import math
import warnings
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from references import orthogonal_norm, ratio, sq  # noqa: E402
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402

CHECK_EVERY = 2
ACTIVATION_EVERY = 4  # also the detail steps (max |g|, zero fractions): steps 4 and 8
STEPS = 8
#: Gradient and weight norms: on the CPU gradwatch sums float32 elements in float32 while no sum
#: overflows (float64 otherwise); the reference sums the same elements in float64. Measured gap
#: of float32 ``_foreach_norm`` on 12 to 262,144 normal elements: <= 1.6e-6 relative. Ratios and
#: the orthogonal norm combine a few such numbers: 1e-5 leaves room and still fails on any real
#: slip (a missing tensor, a stride off by one, the wrong W).
RTOL = 1e-5


class Keep:
    """The StepStats of every check, as the core hands them to sinks."""

    def __init__(self) -> None:
        self.stats: list[gradwatch.StepStats] = []

    @gradwatch.hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        self.stats.append(stats)


class Net(nn.Module):
    """Tokens through an embedding, a GRU and a LayerNorm; an image through a Conv2d and a ReLU
    (two of its four channels dead by construction); both into a Linear, BatchNorm, Tanh
    (partly saturated), Linear, Sigmoid, Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 12, batch_first=True)
        self.ln = nn.LayerNorm(12)
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(12 + 4 * 4 * 4, 24)
        self.bn = nn.BatchNorm1d(24)
        self.tanh = nn.Tanh()
        self.fc2 = nn.Linear(24, 16)
        self.sig = nn.Sigmoid()
        self.head = nn.Linear(16, 1)
        with torch.no_grad():
            self.conv.bias[:2] = -50.0  # channels 0 and 1 never fire: dead fraction 0.5
            self.bn.weight.fill_(3.0)   # |BN output| ~ 3 sigma: part of the tanh saturates
            self.fc2.weight.mul_(8.0)   # and part of the sigmoid

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        seq, _ = self.gru(self.emb(tokens))
        a = self.ln(seq[:, -1])
        b = self.relu(self.conv(image)).flatten(1)
        h = self.tanh(self.bn(self.fc1(torch.cat([a, b], dim=1))))
        return self.head(self.sig(self.fc2(h)))


LAYERS = ("emb", "gru", "ln", "conv", "fc1", "bn", "fc2", "head")


def params_of(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    return {name: list(model.get_submodule(name).parameters(recurse=False)) for name in LAYERS}


def copy(tensors: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    return {k: [t.detach().clone() for t in v] for k, v in tensors.items()}


def run(update_ratio: str, sample_fraction: float, tmp_path):
    """Train STEPS steps while capturing, per step, what each statistic is defined on."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    acts: dict[str, torch.Tensor] = {}
    for name in ("relu", "tanh", "sig"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: acts.__setitem__(name, out.detach().clone()))
    ref: dict[int, dict] = {}
    keep = Keep()
    start = copy(params_of(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings are not what this test is about
        w = gradwatch.torch.watch(model, optimizer=opt, check_every=CHECK_EVERY,
                                  activation_every=ACTIVATION_EVERY, update_ratio=update_ratio,
                                  sample_fraction=sample_fraction, events=tmp_path / "run.jsonl",
                                  plugins=[keep])
        for step in range(1, STEPS + 1):
            tokens = torch.randint(0, 10, (16, 5), generator=gen)  # rows 10..19 never used
            image = torch.randn(16, 1, 6, 6, generator=gen)
            y = torch.randn(16, 1, generator=gen)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(tokens, image), y)
            loss.backward()
            w.observe_loss(loss)
            ps = params_of(model)
            grads = {k: [p.grad.detach().clone() for p in v] for k, v in ps.items()}
            before = copy(ps)
            opt.step()
            ref[step] = dict(loss=float(loss), grads=grads, before=before, after=copy(ps),
                             acts=dict(acts))
        w.remove()
    return w, keep.stats, ref, start


@pytest.mark.parametrize(("update_ratio", "fraction"), [
    pytest.param("exact", 0.02, id="exact"),
    pytest.param("sampled", 0.02, id="sampled-default-fraction"),
    pytest.param("sampled", 0.2, id="sampled-fraction-0.2"),
])
def test_every_reported_statistic_matches_a_hand_computation(update_ratio, fraction, tmp_path):
    w, stats, ref, start = run(update_ratio, fraction, tmp_path)
    sample = None if update_ratio == "exact" else fraction
    assert [s.step for s in stats] == list(range(CHECK_EVERY, STEPS + 1, CHECK_EVERY))
    for s in stats:
        assert s.layers == LAYERS
        assert s.steps.tolist() == list(range(s.step - CHECK_EVERY + 1, s.step + 1))
        # grad_size: gradient elements per layer.
        np.testing.assert_array_equal(
            s.grad_size, [sum(g.numel() for g in ref[s.step]["grads"][k]) for k in LAYERS])
        # Every step of the window: loss (a float32 scalar: exact) and each layer's
        # sqrt(sum_p ||g_p||^2) over its own parameters.
        np.testing.assert_array_equal(s.loss, [ref[t]["loss"] for t in s.steps])
        assert s.has_loss.all() and s.has_grad.all()
        expect = [[math.sqrt(sum(sq(g) for g in ref[t]["grads"][k])) for k in LAYERS]
                  for t in s.steps]
        np.testing.assert_allclose(s.grad_norm, expect, rtol=RTOL)
        r = ref[s.step]
        grads, before, after = r["grads"], r["before"], r["after"]
        np.testing.assert_array_equal(s.grad_nonfinite, 0)
        np.testing.assert_array_equal(s.weight_nonfinite, 0)
        # Weight norm after the check step.
        np.testing.assert_allclose(
            s.weight_norm, [math.sqrt(sum(sq(p) for p in after[k])) for k in LAYERS], rtol=RTOL)
        # ||g|| less each tensor's component along its own (pre-update) weights.
        np.testing.assert_allclose(
            s.grad_norm_orthogonal,
            [orthogonal_norm([g.double().numpy() for g in grads[k]],
                             [p.double().numpy() for p in before[k]]) for k in LAYERS],
            rtol=RTOL)
        # One-step update ratio and the change since watch(), on the sample they are defined on.
        np.testing.assert_allclose(
            s.update_ratio, [ratio(after[k], before[k], sample) for k in LAYERS], rtol=RTOL)
        np.testing.assert_allclose(
            s.weight_change, [ratio(after[k], start[k], sample) for k in LAYERS], rtol=RTOL)
        if s.step % ACTIVATION_EVERY:
            assert s.grad_max is None and s.grad_zero_fraction is None and not s.activations
            continue
        # Detail steps: max |g| and the share of exactly-zero gradient elements.
        np.testing.assert_array_equal(
            s.grad_max, [max(float(g.abs().max()) for g in grads[k]) for k in LAYERS])
        np.testing.assert_allclose(
            s.grad_zero_fraction,
            [sum(int((g == 0).sum()) for g in grads[k]) / sum(g.numel() for g in grads[k])
             for k in LAYERS], rtol=RTOL, atol=0)
        # Activation steps: a ReLU unit (a channel: dimension 1 of [B, C, H, W]) is dead when
        # it is > 0 for no example and no position; sigmoid/tanh outputs are saturated where
        # the derivative is under 1% of its peak.
        y_relu, y_tanh, y_sig = (r["acts"][k].double() for k in ("relu", "tanh", "sig"))
        alive = (y_relu > 0).any(dim=0).any(dim=-1).any(dim=-1)
        expected_acts = {
            "relu": ("dead_fraction", 1 - float(alive.double().mean()), 4),
            "tanh": ("saturated_fraction", float((1 - y_tanh**2 < 0.01).double().mean()), 24),
            "sig": ("saturated_fraction",
                    float((y_sig * (1 - y_sig) < 0.25 * 0.01).double().mean()), 16),
        }
        assert set(s.activations) == set(expected_acts)
        for site, (field, value, units) in expected_acts.items():
            a = s.activations[site]
            assert getattr(a, field) == pytest.approx(value, rel=RTOL, abs=1e-12), site
            assert a.units == units
    # The model is built so that each fraction is a real test: neither 0 nor 1.
    last = stats[-1]
    assert last.activations["relu"].dead_fraction == 0.5
    assert 0.05 < last.activations["tanh"].saturated_fraction < 0.95
    assert 0.05 < last.activations["sig"].saturated_fraction < 0.95
    assert 0 < last.grad_zero_fraction[LAYERS.index("emb")] < 1
    # The event file says the same as the StepStats handed to sinks.
    events = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    written = [e for e in events if e["event"] == "stats"]
    assert [e["step"] for e in written] == [s.step for s in stats]
    for e, s in zip(written, stats):
        for field in ("grad_norm_orthogonal", "weight_norm", "update_ratio", "weight_change"):
            np.testing.assert_allclose(e[field], getattr(s, field), rtol=1e-12)
        np.testing.assert_allclose(e["grad_norm"], s.grad_norm[-1], rtol=1e-12)
    # The report's weight change is the last check's.
    row = {r.name: r for r in w.report().layers}
    assert row["fc1"].weight_change == pytest.approx(last.weight_change[LAYERS.index("fc1")])


def test_a_rebuilt_model_and_remove_release_every_tensor(tmp_path):
    """The model changes after watch() (a layer replaced: the watcher re-scans); after
    remove() neither the old nor the new layer's parameters and gradients are held, nor the
    per-step history, while the watcher and its report stay usable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)

    def train(model, opt, steps):
        for _ in range(steps):
            x = torch.randn(16, 8, generator=gen)
            opt.zero_grad()
            loss = ((model(x) - x[:, :1]) ** 2).mean()
            loss.backward()
            w.observe_loss(loss)
            opt.step()

    w = gradwatch.torch.watch(model, optimizer=opt, check_every=5, update_ratio="exact",
                              events=tmp_path / "run.jsonl")
    train(model, opt, 10)
    old = model[2]
    refs = [weakref.ref(old.weight), weakref.ref(old.weight.grad)]
    model[2] = nn.Linear(16, 1)
    opt.param_groups[0]["params"] = list(model.parameters())  # the old layer leaves the optimizer
    train(model, opt, 20)
    assert list(w.layers()) == ["0", "2"] and w.extra_memory_bytes() > 0
    refs += [weakref.ref(t) for t in (model[2].weight, model[2].weight.grad, model[0].weight,
                                      model[0].weight.grad)]
    w.remove()
    assert w.extra_memory_bytes() == 0  # start-of-run copies and the per-step history gone
    del model, opt, old
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)
    report = w.report()
    assert report.steps == 30 and [r.name for r in report.layers] == ["0", "2"]
    assert "2" in str(report)


# -- finite gradients too large for float32 sums ----------------------------------------------

def blow_up(scale: float, poison: tuple[str, float] | None = None, steps: int = 30):
    """A tanh MLP whose loss is multiplied by ``scale`` (gradient elements ~ scale, all finite),
    at lr 0 so the weights stay as they are; ``poison``: one element of that layer's weight
    gradient set to NaN/Inf during backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 1))
    if poison is not None:
        layer, value = poison

        def spoil(g: torch.Tensor) -> torch.Tensor:
            g = g.clone()
            g.view(-1)[3] = value
            return g

        model.get_submodule(layer).weight.register_hook(spoil)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    keep = Keep()
    gen = torch.Generator().manual_seed(1)
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gradwatch.torch.watch(model, optimizer=opt, check_every=5, plugins=[keep]) as w:
            for _ in range(steps):
                x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 1, generator=gen)
                opt.zero_grad()
                loss = ((model(x) - y) ** 2).mean() * scale
                loss.backward()
                w.observe_loss(loss)
                grads.append({name: math.sqrt(sum(sq(p.grad) for p in m.parameters()))
                              for name, m in model.named_children() if isinstance(m, nn.Linear)})
                opt.step()
    return w, keep.stats, grads


@pytest.mark.parametrize("scale", [
    pytest.param(1e20, id="elements-1e20-squares-overflow-float32"),
    pytest.param(1e37, id="norm-beyond-float32-range"),
])
def test_a_finite_gradient_too_large_for_float32_sums_is_exploding_not_nonfinite(scale):
    w, stats, grads = blow_up(scale)
    assert all(math.isfinite(v) for g in grads for v in g.values())  # every element finite
    kinds = {f.kind for f in w.findings}
    assert "nonfinite" not in kinds, [str(f) for f in w.findings]
    assert "exploding_gradient" in kinds, [str(f) for f in w.findings]
    f32_max = float(np.finfo(np.float32).max)
    for s in stats:
        assert not s.grad_nonfinite.any()
        assert np.isfinite(s.grad_norm).all()
        # The true norm where float32 holds it; beyond float32's range, a huge number.
        expect = [[grads[t - 1][k] for k in s.layers] for t in s.steps]
        if scale < 1e30:
            np.testing.assert_allclose(s.grad_norm, expect, rtol=RTOL)
        else:
            assert (s.grad_norm >= np.minimum(expect, f32_max) * (1 - RTOL)).all()


@pytest.mark.parametrize("value", [pytest.param(math.nan, id="nan"),
                                   pytest.param(math.inf, id="inf")])
@pytest.mark.parametrize("scale", [pytest.param(1.0, id="ordinary"),
                                   pytest.param(1e20, id="beside-huge-finite-layers")])
def test_a_real_nonfinite_gradient_element_is_nonfinite_in_its_layer(value, scale):
    w, stats, _ = blow_up(scale, poison=("2", value), steps=10)
    nonfinite = [f for f in w.findings if f.kind == "nonfinite"]
    assert nonfinite and nonfinite[0].step == 1 and nonfinite[0].layer == "2", \
        [str(f) for f in w.findings]
    # Step 1, before the poisoned update (0 * NaN) spreads NaN into every weight: only layer
    # "2" reads non-finite; its huge but finite neighbours do not.
    assert stats[0].steps[0] == 1
    assert (~np.isfinite(stats[0].grad_norm[0])).tolist() == [False, True, False]
