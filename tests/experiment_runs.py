"""What the frameworks' reference-experiment tests share: the runners, the repairs, one run."""

from __future__ import annotations

from gradwatch import experiments as ex
from gradwatch._events import read_runs

#: The runners the plugins give the command line.
RUNNERS = ex.experiment_runners()
NAMES = [e.name for e in ex.EXPERIMENTS]
#: The repaired runs: gradient reaches the first layer and the loss falls below ln 2.
REPAIRS = ["shallow-sigmoid", "deep-relu", "deep-leaky-relu", "deep-prelu", "deep-tanh-xavier",
           "deep-sigmoid-batchnorm", "deep-sigmoid-residual", "explode-repaired",
           "dying-relu-leaky-0.3"]


def train(exp, tmp_path, framework, settings=ex.EXACT):
    """One watched run: the runner's result and the run read back from its event file."""
    events = tmp_path / f"{exp.name}-{framework}-{settings.name}.jsonl"
    raw = RUNNERS[framework].run(exp, events, settings)
    [run] = read_runs(events)
    return raw, run


def assert_first_steps_agree_with_pytorch(name, tmp_path, framework):
    """Same initial weights, batches and SGD as the PyTorch run: the first step's per-layer
    gradients and the first five losses agree to float32 noise. (Later steps drift apart as
    rounding differences grow, fastest with BatchNorm.)"""
    import numpy as np

    exp = ex.get(name).with_(steps=5, check_every=1)
    _, other = train(exp, tmp_path, framework)
    _, torch = train(exp, tmp_path, "torch")
    assert other.loss_steps.tolist() == torch.loss_steps.tolist() == [1, 2, 3, 4, 5]
    assert list(other.layers) == list(torch.layers)
    np.testing.assert_allclose(other.loss, torch.loss, rtol=1e-4)
    np.testing.assert_allclose(other.grad_norm[0], torch.grad_norm[0], rtol=1e-4)


def assert_meets_its_verdict(name, raw, run):
    """What every framework's run of experiment ``name`` must show: its expected verdict, the
    same findings in the event file as in the result, the spec's layers in depth order, and
    for the repairs and the failure the evidence the lesson is about."""
    import math

    import pytest

    from gradwatch._events import first_last_ratio

    exp = ex.get(name)
    assert ex.judge(exp, run.kinds) == [], raw.report
    assert [(f.kind, f.step, f.layer) for f in run.findings] == [
        (f.kind, f.step, f.layer) for f in raw.findings]
    assert list(run.layers) == ex.layer_names(exp)
    if name in REPAIRS:
        assert first_last_ratio(run) > 1e-2, raw.report
        assert raw.final_loss < 0.69
    if name == "deep-sigmoid":
        assert first_last_ratio(run) < 1e-6
        assert run.findings[0].kind == "vanishing_gradient" and run.findings[0].layer == "fc0"
        assert raw.final_loss == pytest.approx(math.log(2), abs=0.01)
