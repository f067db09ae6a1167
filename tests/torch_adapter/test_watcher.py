"""The PyTorch adapter's mechanics: steps, where gradients are read, hooks, syncs, failures."""

from __future__ import annotations

import gc
import json
import math
import sys
import warnings
import weakref

import pytest
import torch
from conftest import kinds, mlp, train
from torch import nn

import gradwatch
from gradwatch import hookimpl


class StatsRecorder:
    """A run plugin that keeps every StepStats the monitor receives."""

    def __init__(self) -> None:
        self.stats = []

    @hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        self.stats.append(stats)


def loop(model, opt, watcher, steps, batch=16, micro=1, before_step=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(batch, 2, generator=g)
            loss = model(x).pow(2).mean() / micro
            loss.backward()
            watcher.observe_loss(loss)
        if before_step is not None:
            before_step()
        opt.step()


def test_gradient_accumulation_counts_optimizer_steps_not_backward_passes():
    torch.manual_seed(0)
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = StatsRecorder()
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5, plugins=[rec]) as w:
        loop(model, opt, w, steps=20, micro=4)
    assert w.step == 20
    assert [list(s.steps) for s in rec.stats] == [list(range(k, k + 5)) for k in (1, 6, 11, 16)]
    assert w.report().steps == 20 and w.report().checks == 4


def test_accumulated_gradient_is_what_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = StatsRecorder()
    norms = []
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, plugins=[rec]) as w:
        loop(model, opt, w, steps=3, micro=3, before_step=lambda: norms.append(
            float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())))
    measured = [float(s.grad_norm[-1, 0]) for s in rec.stats]
    assert measured == pytest.approx(norms, rel=1e-5)


def test_a_step_without_backward_reports_no_gradient():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = StatsRecorder()
    with gradwatch.torch.watch(model, optimizer=opt, check_every=2, plugins=[rec]) as w:
        loop(model, opt, w, steps=2)
        opt.step()  # e.g. a scheduler-driven loop that steps without a new backward
        loop(model, opt, w, steps=1)
    assert w.step == 4
    assert not rec.stats[-1].has_grad[0].any()  # step 3: nothing stale from step 1
    assert rec.stats[-1].has_grad[1].all()


def test_without_optimizer_every_backward_is_a_step():
    model = mlp(2)
    rec = StatsRecorder()
    with gradwatch.torch.watch(model, check_every=2, plugins=[rec]) as w:
        for _ in range(6):
            model.zero_grad()
            model(torch.randn(8, 2)).sum().backward()
    assert w.step == 6
    assert [list(s.steps) for s in rec.stats] == [[1, 2], [3, 4], [5, 6]]


def test_gradients_are_measured_before_clipping():
    torch.manual_seed(0)
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = StatsRecorder()
    unclipped = []

    def clip():
        unclipped.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-3)))

    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, plugins=[rec]) as w:
        loop(model, opt, w, steps=4, before_step=clip)
    total = [float(math.sqrt(sum(n * n for n in s.grad_norm[-1]))) for s in rec.stats]
    assert total == pytest.approx(unclipped, rel=1e-4)
    assert all(t > 1e-2 for t in total)  # the clipped norm would be 1e-3
    assert w.monitor.context.model.clipping is True  # and the advice knows clipping is on


@pytest.mark.parametrize("explicit", [pytest.param(False, id="scaler-found"),
                                      pytest.param(True, id="scaler-passed")])
def test_grad_scaler_amp_is_unscaled_and_quiet(explicit):
    def run(use_scaler: bool):
        torch.manual_seed(0)
        model = mlp(3, width=64, init="he")
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", enabled=use_scaler, init_scale=2.0**16)
        rec = StatsRecorder()
        options = {"scaler": scaler} if (explicit and use_scaler) else {}
        g = torch.Generator().manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", gradwatch.GradientHealthWarning)
            with gradwatch.torch.watch(model, optimizer=opt, check_every=5, plugins=[rec],
                                       **options) as w:
                for _ in range(100):
                    x = torch.randn(64, 2, generator=g)
                    y = (x[:, 0] * x[:, 1] > 0).float()
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        loss = nn.functional.binary_cross_entropy_with_logits(
                            model(x).squeeze(-1).float(), y)
                    scaler.scale(loss).backward()
                    w.observe_loss(loss)
                    scaler.step(opt)
                    scaler.update()
        return w, rec

    w_amp, rec_amp = run(True)
    w_ref, rec_ref = run(False)
    assert w_amp.findings == []
    first_amp = rec_amp.stats[0].grad_norm[0]
    first_ref = rec_ref.stats[0].grad_norm[0]
    # Unscaled: the same magnitude as the run without loss scaling (not 65536x larger).
    assert first_amp == pytest.approx(first_ref, rel=0.1)


def test_frozen_layers_are_neither_vanishing_nor_stalled():
    torch.manual_seed(0)
    model = mlp(4, init="he")
    for p in list(model[0].parameters()) + list(model[2].parameters()):
        p.requires_grad_(False)
    rec = StatsRecorder()
    w = train(model, lr=0.05, steps=150, check_every=5, plugins=[rec])
    assert not kinds(w) & {"vanishing_gradient", "stalled_update"}, w.report()
    assert not rec.stats[-1].has_grad[-1][:2].any()
    assert rec.stats[-1].has_grad[-1][2:].all()
    rows = {r.name: r for r in w.report().layers}
    assert math.isnan(rows["0"].grad_norm) and rows["0"].flags == ()


def test_tied_weights_are_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.decode = nn.Linear(8, 10, bias=False)
            self.decode.weight = self.embed.weight

        def forward(self, tokens):
            return self.decode(self.embed(tokens))

    model = Tied()
    with gradwatch.torch.watch(model, check_every=1) as w:
        nn.functional.cross_entropy(model(torch.tensor([1, 2, 3])), torch.tensor([2, 3, 4])).backward()
    layers = w.report().layers
    assert [r.name for r in layers] == ["embed"]
    assert layers[0].num_params == 80
    assert w.step == 1


def _hook_count(model: nn.Module, opt=None) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    if opt is not None:
        n += len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    return n


def test_remove_detaches_every_hook_and_keeps_no_reference():
    model = mlp(3, act=nn.ReLU)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    assert _hook_count(model, opt) == 0
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=1, activation_every=1)
    assert _hook_count(model, opt) > 0
    loop(model, opt, w, steps=3)
    w.remove()
    assert _hook_count(model, opt) == 0
    ref = weakref.ref(model)
    del model, opt
    gc.collect()
    assert ref() is None
    assert w.report().steps == 3  # the record survives the model


def test_context_manager_detaches_and_watcher_is_collectable():
    model = mlp(2)
    with gradwatch.torch.watch(model) as w:
        model(torch.randn(4, 2)).sum().backward()
    assert _hook_count(model) == 0
    wref = weakref.ref(w)
    del w
    gc.collect()
    assert wref() is None


def test_an_abandoned_watcher_is_collected_and_takes_its_hooks_along():
    model = mlp(2)
    w = gradwatch.torch.watch(model)
    wref = weakref.ref(w)
    del w
    gc.collect()
    assert wref() is None
    assert _hook_count(model) == 0
    model(torch.randn(4, 2)).sum().backward()


def _inject_nan(module: nn.Module, at_backward: int):
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == at_backward else grad

    return module.weight.register_hook(hook)


def test_nan_in_one_layer_is_reported_at_its_step_naming_that_layer():
    torch.manual_seed(0)
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _inject_nan(model[2], at_backward=7)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with gradwatch.torch.watch(model, optimizer=opt, check_every=10) as w:
            loop(model, opt, w, steps=20)
    nonfinite = [f for f in w.findings if f.kind == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0].step == 7 and nonfinite[0].layer == "2"
    assert w.step == 20  # default mode never stops training


def test_strict_mode_raises_at_the_finding():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _inject_nan(model[0], at_backward=3)
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=1, on_finding="raise")
    with pytest.raises(gradwatch.GradientHealthError) as err:
        loop(model, opt, w, steps=10)
    assert err.value.finding.kind == "nonfinite" and err.value.finding.step == 3
    assert w.step == 3
    w.remove()


def test_warnings_point_at_the_users_line():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _inject_nan(model[0], at_backward=1)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1):
        model(torch.randn(4, 2)).sum().backward()
        with pytest.warns(gradwatch.NonFiniteWarning) as rec:
            opt.step()
    assert rec[0].filename == __file__


def test_warning_filters_work_as_python_users_expect():
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    _inject_nan(model[0], at_backward=2)
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", gradwatch.NonFiniteWarning)
        with pytest.raises(gradwatch.NonFiniteWarning):
            loop(model, opt, w, steps=5)
    w.remove()


def test_an_internal_failure_is_reported_once_and_training_continues(monkeypatch):
    class Broken(gradwatch.Detector):
        kinds = ("broken",)

        def update(self, stats):
            raise ZeroDivisionError("detector bug")

    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    detectors = [Broken(), gradwatch.NonFiniteDetector()]
    _inject_nan(model[0], at_backward=8)
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="detector bug") as rec:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", gradwatch.NonFiniteWarning)
            with gradwatch.torch.watch(model, optimizer=opt, check_every=2,
                                       detectors=detectors) as w:
                loop(model, opt, w, steps=10)
    internal = [r for r in rec if issubclass(r.category, gradwatch.GradWatchInternalWarning)]
    assert len(internal) == 1
    assert w.step == 10
    assert [f.kind for f in w.findings] == ["nonfinite"]  # the other detector kept working
    assert "ZeroDivisionError" in w.report().internal_errors[0]


def test_one_host_transfer_per_check_whatever_the_number_of_layers(monkeypatch):
    # Device-to-host reads. (.numpy() of the tensor .cpu() returned is not another transfer.)
    syncs = []
    methods = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")
    for name in methods:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "gradwatch" in caller and "tests" not in caller:
                syncs.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)

    from gradwatch_torch import _reduce

    def run(depth):
        syncs.clear()
        model = mlp(depth, width=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        w = gradwatch.torch.watch(model, optimizer=opt, check_every=5, activation_every=5)
        syncs.clear()  # watch() itself reads init scales once
        loop(model, opt, w, steps=20)
        w.remove()
        return list(syncs)

    # The code path every device takes (on the CPU, norms are summed in float32 first and the
    # float64 sum taken only if one overflowed: that reads a host scalar, see below).
    monkeypatch.setattr(_reduce, "FLOAT32_FIRST_ON_CPU", False)
    for depth in (2, 30):
        # 20 steps / 5 = 4 checks, 1 transfer each
        assert run(depth) == ["cpu"] * 4, depth
    # The CPU's float32-first norms read one CPU scalar per norm reduction (a host tensor: no
    # transfer), from _reduce.foreach_norm64 only: per step at most one per block of tensors
    # that no stacked block takes, whatever the number of layers.
    monkeypatch.setattr(_reduce, "FLOAT32_FIRST_ON_CPU", True)
    reads = {depth: run(depth) for depth in (2, 30)}
    for depth, r in reads.items():
        assert r.count("cpu") == 4 and set(r) <= {"cpu", "__float__"}, (depth, r)
    assert reads[2].count("__float__") == reads[30].count("__float__") > 0, reads


def test_observe_loss_rejects_what_is_not_a_scalar_loss():
    model = mlp(1)
    with gradwatch.torch.watch(model) as w:
        with pytest.raises(ValueError, match="scalar"):
            w.observe_loss(torch.ones(3))
        with pytest.raises(TypeError, match="tensor or a float"):
            w.observe_loss("0.5")
        w.observe_loss(0.5)
        w.observe_loss(torch.tensor(0.5))


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param({"check_every": 0}, ValueError, "check_every", id="check_every-0"),
    pytest.param({"check_every": 2.5}, TypeError, "check_every", id="check_every-float"),
    # a history of check_every rows per tensor: 10**9 steps would ask for GBs, not fail later
    pytest.param({"check_every": 10**9}, ValueError, r"check_every=1000000000: .* use "
                 r"check_every <= \d+", id="check_every-too-large"),
    pytest.param({"activation_every": 7}, ValueError, "activation_every", id="activation-not-multiple"),
    pytest.param({"on_finding": "shout"}, ValueError, "on_finding", id="on_finding"),
    pytest.param({"update_ratio": "approx"}, ValueError, "update_ratio", id="update_ratio"),
    pytest.param({"sample_fraction": 0}, ValueError, "sample_fraction", id="sample_fraction"),
    pytest.param({"scaler": object()}, TypeError, "scaler", id="scaler"),
    pytest.param({"optimizer": "sgd"}, TypeError, "optimizer", id="optimizer"),
    pytest.param({"check_evry": 5}, TypeError, "check_evry", id="misspelt-option"),
    pytest.param({"detectors": ["vanishing"]}, TypeError, "detectors", id="detectors"),
])
def test_bad_options_name_the_parameter(kwargs, error, match):
    model = mlp(1)
    with pytest.raises(error, match=match):
        gradwatch.torch.watch(model, **kwargs)
    assert _hook_count(model) == 0  # nothing was attached


def test_watch_dispatches_torch_modules_and_rejects_other_objects():
    model = mlp(1)
    w = gradwatch.watch(model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    assert type(w).__name__ == "TorchWatcher"
    w.remove()
    with pytest.raises(TypeError, match="torch"):
        gradwatch.torch.watch("not a model")
    with pytest.raises(TypeError, match="installed adapters: .*torch"):
        gradwatch.watch([1, 2, 3])


def test_event_file_records_the_run(tmp_path):
    path = tmp_path / "run.jsonl"
    torch.manual_seed(0)
    w = train(mlp(10, act=nn.Sigmoid), steps=60, events=path)
    events = [json.loads(line) for line in path.read_text().splitlines()]
    names = [e["event"] for e in events]
    assert names[0] == "start" and names[-1] == "end"
    assert names.count("stats") == 6
    found = [e for e in events if e["event"] == "finding"]
    assert [e["kind"] for e in found] == [f.kind for f in w.findings]
    assert events[0]["layers"][0]["name"] == "0"


def test_unwritable_event_file_is_reported_and_training_goes_on(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="events"):
        with gradwatch.torch.watch(model, optimizer=opt, check_every=1,
                                   events=blocker / "run.jsonl") as w:
            loop(model, opt, w, steps=5)
    assert w.step == 5


def test_a_shared_activation_module_is_sampled_per_call_site():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 8), nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model = Net()
    rec = StatsRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, activation_every=1,
                               plugins=[rec]) as w:
        loop(model, opt, w, steps=2)
    assert set(rec.stats[-1].activations) == {"act", "act#1"}
    assert rec.stats[-1].activations["act"].units == 8


def test_validation_forward_without_grad_is_not_sampled():
    model = mlp(2)
    rec = StatsRecorder()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, activation_every=1,
                               plugins=[rec]) as w:
        with torch.no_grad():
            model(torch.randn(4, 2))
        loop(model, opt, w, steps=1)
        assert rec.stats[-1].activations  # the training forward was sampled
        with torch.no_grad():
            model(-100 * torch.ones(4, 2))  # would read as 100 % dead
        loop(model, opt, w, steps=1)
    assert rec.stats[-1].activations["1"].dead_fraction < 1.0


def test_default_update_ratio_memory_is_bounded():
    model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with gradwatch.torch.watch(model) as w:
        assert w.extra_memory_bytes() <= 0.10 * param_bytes
    with gradwatch.torch.watch(model, update_ratio="exact") as w:
        assert w.extra_memory_bytes() >= param_bytes  # the documented cost of exact mode


def test_sampled_update_ratio_matches_the_exact_one():
    results = {}
    for mode in ("sampled", "exact"):
        torch.manual_seed(0)
        model = mlp(3, width=64, init="he")
        rec = StatsRecorder()
        train(model, lr=0.05, steps=20, check_every=10, update_ratio=mode, plugins=[rec])
        results[mode] = rec.stats[-1].update_ratio
    ratio = results["sampled"] / results["exact"]
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio
