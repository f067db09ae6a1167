"""guard="skip": an optimizer step with non-finite gradients is not applied.

Each test labels its run with the test's own evidence: without the guard the same NaN batch
does make the weights NaN (so the guard is what kept them finite), and the state compared is
the optimizer's own (every floating tensor of ``optimizer.state``)."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402

BAD_STEP = 7  # the optimizer step (1-based) whose batch holds a NaN


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def data(n_steps: int, batch: int = 32):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n_steps, batch, 8, generator=gen)
    y = (x[..., 0] > x[..., 1]).long()
    x[BAD_STEP - 1, 3, 2] = float("nan")  # one NaN input in the 7th step's batch
    return x, y


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    state = {f"param{i}": p.detach().clone() for i, p in enumerate(net.parameters())}
    for i, p in enumerate(net.parameters()):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                state[f"state{i}.{k}"] = v.detach().clone()
    return state


def train(guard, steps: int = 40, *, opt_class=torch.optim.Adam, lr: float = 1e-2,
          batch_ids: bool = False, **options):
    """Train, keeping the state before and after the bad step; returns what happened."""
    net = model()
    opt = opt_class(net.parameters(), lr=lr)
    x, y = data(steps)
    losses, before, after = [], None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watcher = gradwatch.torch.watch(net, optimizer=opt, guard=guard, **options)
        for step in range(1, steps + 1):
            if step == BAD_STEP:
                before = snapshot(net, opt)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[step - 1]), y[step - 1])
            loss.backward()
            # the batch's index into the data set, as a user names it
            watcher.observe_loss(loss, batch_id=step - 1 if batch_ids else None)
            opt.step()
            losses.append(float(loss))
            if step == BAD_STEP:
                after = snapshot(net, opt)
        report = watcher.remove()
    told = [w for w in caught if issubclass(w.category, gradwatch.GradientHealthWarning)]
    return dict(net=net, opt=opt, losses=losses, before=before, after=after, report=report,
                told=told)


def test_without_the_guard_the_nan_batch_ruins_the_weights():
    run = train(None)
    assert any(not torch.isfinite(v).all() for v in run["after"].values())
    assert run["report"].skipped_steps == 0


def test_the_guard_skips_the_nan_step_leaving_weights_and_optimizer_state_untouched():
    run = train("skip")
    before, after = run["before"], run["after"]
    assert before.keys() == after.keys() and any(k.startswith("state") for k in before)
    for key in before:
        assert torch.equal(before[key], after[key]), key  # bit for bit, Adam's moments too
    assert all(torch.isfinite(p).all() for p in run["net"].parameters())
    report = run["report"]
    assert report.skipped_steps == 1
    # told at that step, naming the first layer whose gradient went bad
    (finding,) = [f for f in report.findings if f.kind == "nonfinite"]
    assert finding.is_warning and finding.step == BAD_STEP and finding.layer == "0"
    assert finding.evidence["skipped"] is True
    assert [w.category for w in run["told"]] == [gradwatch.NonFiniteWarning]
    # the skipped step is no step: 39 applied, the run goes on learning
    assert report.steps == 39
    finite = [v for v in run["losses"] if math.isfinite(v)]
    assert sum(finite[-5:]) / 5 < 0.6 * sum(finite[:5]) / 5
    assert "1 optimizer step with non-finite gradients skipped" in str(report)


def test_the_skip_is_in_the_event_file(tmp_path):
    path = tmp_path / "run.jsonl"
    train("skip", events=str(path))
    events = [json.loads(line) for line in path.read_text().splitlines()]
    (finding,) = [e for e in events if e["event"] == "finding" and e["kind"] == "nonfinite"]
    assert finding["step"] == BAD_STEP and finding["evidence"]["skipped"] is True
    assert events[-1]["event"] == "end" and events[-1]["summary"]["skipped_steps"] == 1


def test_the_skip_names_the_batch_the_user_named():
    run = train("skip", batch_ids=True)
    (finding,) = [f for f in run["report"].findings if f.kind == "nonfinite"]
    # the 7th optimizer step trained on x[6]: the batch holding the NaN
    assert finding.step == BAD_STEP and finding.evidence["batch_id"] == BAD_STEP - 1
    assert f"step {BAD_STEP} (batch {BAD_STEP - 1})" in finding.message
    assert torch.isnan(data(40)[0][finding.evidence["batch_id"]]).any()  # it holds the NaN


def test_a_healthy_run_is_the_same_with_and_without_the_guard():
    # No NaN: the guard only looks, so the trained weights are identical.
    def clean(guard):
        net = model()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        x, y = data(20)
        x = torch.nan_to_num(x)
        with gradwatch.torch.watch(net, optimizer=opt, guard=guard) as w:
            for step in range(20):
                opt.zero_grad()
                nn.functional.cross_entropy(net(x[step]), y[step]).backward()
                opt.step()
        return net, w.report()

    (a, ra), (b, rb) = clean(None), clean("skip")
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert ra.skipped_steps == rb.skipped_steps == 0 and rb.steps == 20


def test_a_closure_step_is_guarded_too():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = data(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(net, optimizer=opt, guard="skip") as watcher:
            for step in range(1, 11):
                def closure(step=step):
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(net(x[step - 1]), y[step - 1])
                    loss.backward()
                    return loss

                returned = opt.step(closure)
                assert torch.is_tensor(returned)  # the closure's loss, as step() returns it
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert watcher.report().skipped_steps == 1 and watcher.report().steps == 9


def test_gradient_accumulation_skips_the_step_a_bad_micro_batch_belongs_to():
    net = model()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x, y = data(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(net, optimizer=opt, guard="skip") as watcher:
            for i in range(20):  # two micro-batches a step: the NaN batch (index 6) is step 4
                nn.functional.cross_entropy(net(x[i]), y[i]).backward()
                if i % 2 == 1:
                    opt.step()
                    opt.zero_grad()
    report = watcher.report()
    assert report.skipped_steps == 1 and report.steps == 9
    assert [f.step for f in report.findings if f.kind == "nonfinite"] == [4]
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_the_gradscalers_own_skips_are_not_counted():
    # An overflow the GradScaler finds makes it skip optimizer.step() itself: the guard never
    # sees that step, so nothing is counted twice (and nothing the scaler handles is warned).
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    x, y = data(12)
    scale_before = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(net, optimizer=opt, guard="skip", scaler=scaler) as watcher:
            for step in range(1, 13):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x[step - 1]), y[step - 1])
                scaler.scale(loss).backward()
                if step == BAD_STEP:
                    scale_before = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
    assert scaler.get_scale() < scale_before  # the scaler skipped step 7 and backed off
    assert watcher.report().skipped_steps == 0
    # ... the scaler's own skips are counted apart, as the scaler's (normal under AMP)
    assert watcher.report().scaler_skipped_steps >= 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_remove_gives_the_optimizer_its_step_back():
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    watcher = gradwatch.torch.watch(net, optimizer=opt, guard="skip")
    assert "step" in vars(opt)
    watcher.remove()
    assert "step" not in vars(opt)
    clean = copy.deepcopy(opt)  # still a plain optimizer: copies and pickles as one
    assert opt.step.__func__ is type(opt).step and clean.step.__func__ is type(opt).step


@pytest.mark.parametrize("options, message", [
    pytest.param({"guard": "on"}, "guard must be one of", id="unknown-value"),
    pytest.param({"guard": "skip", "optimizer": None}, "needs the optimizer", id="no-optimizer"),
])
def test_bad_guard_settings_are_refused_by_name(options, message):
    net = model()
    opt = options.pop("optimizer", torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=message):
        gradwatch.torch.watch(net, optimizer=opt, **options)


def test_lbfgs_is_refused_with_the_guard():
    net = model()
    with pytest.raises(ValueError, match="does not support LBFGS"):
        gradwatch.torch.watch(net, optimizer=torch.optim.LBFGS(net.parameters()), guard="skip")
