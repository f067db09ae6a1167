"""What a user asks after a spike (which batch?) and "is this normal?" (how big are my gradients,
how often does my clipping act?), answered from a real torch run.

The labels are the test's own evidence, gathered without gradwatch: the data set's NaN is at a
known index, and ``clip_grad_norm_`` returns each step's whole-model norm before it clips."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch._events import read_runs  # noqa: E402
from gradwatch._results import run_summary_text, window_line  # noqa: E402

BAD_BATCH = 23  # index of the batch holding a NaN in the shuffled data set


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 2))


def batches(n: int = 40):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 16, 8, generator=gen)
    y = (x[..., 0] > 0).long()
    x[BAD_BATCH, 0, 0] = float("nan")
    order = torch.randperm(n, generator=gen).tolist()  # the loader shuffles
    return x, y, order


def test_the_window_before_a_warning_names_each_steps_batch(tmp_path):
    path = tmp_path / "run.jsonl"
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y, order = batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(model, optimizer=opt, check_every=10,
                                   events=str(path)) as watcher:
            for index in order[:20]:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[index]), y[index])
                loss.backward()
                watcher.observe_loss(loss, batch_id=index)
                opt.step()
    bad_step = order.index(BAD_BATCH) + 1
    assert bad_step <= 20  # the label: the NaN batch is trained on in this run
    [run] = read_runs(path)
    windows = [w for w in run.windows if w["kind"] == "nonfinite"]
    assert windows, [json.loads(line)["event"] for line in path.read_text().splitlines()]
    window = windows[0]
    steps = window["steps"].tolist()
    assert window["batch_ids"] == [order[s - 1] for s in steps]
    line = window_line(window, run.layers)
    assert f"at step {bad_step}, batch {BAD_BATCH} (non-finite)" in line
    assert line in run_summary_text(run)


def clipped_run(max_norm: float, steps: int = 60):
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(steps, 16, 8, generator=gen)
    y = (x[..., 0] > 0).long()
    pre_clip = []
    with gradwatch.torch.watch(model, optimizer=opt, check_every=5) as watcher:
        for i in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i]), y[i])
            loss.backward()
            watcher.observe_loss(loss)
            pre_clip.append(float(nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
            opt.step()
    return watcher.report(), np.array(pre_clip)


def test_the_report_says_how_often_clipping_acted_and_how_large_the_norms_were():
    report, pre_clip = clipped_run(max_norm=0.05)
    norms = report.grad_norms
    assert (pre_clip > 0.05).all()  # the label: every step was clipped
    assert norms.clip_checks == report.checks == 12 and norms.clip_active == 12
    # the distribution is of the norms before clipping, as clip_grad_norm_ reported them
    assert norms.steps == 60
    assert norms.median == pytest.approx(np.median(pre_clip), rel=1e-4)
    assert norms.p90 == pytest.approx(np.percentile(pre_clip, 90), rel=1e-4)
    assert norms.max == pytest.approx(pre_clip.max(), rel=1e-4)
    text = str(report)
    assert "clipping: active at 12 of 12 checks (100%)" in text
    assert f"median {np.median(pre_clip):.3g}" in text
    assert report.summary()["grad_norms"]["clip_active"] == 12


def test_a_clip_that_never_acts_is_not_reported_as_clipping():
    report, pre_clip = clipped_run(max_norm=1e6)
    assert (pre_clip < 1e6).all()  # the label: the threshold was never reached
    norms = report.grad_norms
    assert norms.clip_checks == 12 and norms.clip_active == 0
    assert "clipping: active" not in str(report)
    assert norms.median == pytest.approx(np.median(pre_clip), rel=1e-4)
