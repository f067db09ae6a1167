"""gradwatch.torch.watch(..., tensorboard=...): event files TensorBoard reads back."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("tensorboard")
from references import StatsLog  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)
from torch import nn  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import GradWatchInternalWarning  # noqa: E402

CHECK_EVERY = 5
STEPS = 60


def deep_sigmoid(depth: int = 10, width: int = 16) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    d = 2
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.Sigmoid()]
        d = width
    layers.append(nn.Linear(d, 1))
    return nn.Sequential(*layers)


def train(model: nn.Module, steps: int = STEPS, **options):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 2, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        with gradwatch.torch.watch(model, optimizer=opt, check_every=CHECK_EVERY,
                                   **options) as watcher:
            for i in range(steps):
                idx = torch.arange(i * 32, (i + 1) * 32) % 256
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(
                    model(x[idx]).squeeze(-1), y[idx])
                loss.backward()
                watcher.observe_loss(loss)
                opt.step()
    return watcher


def events(logdir) -> EventAccumulator:
    files = list(Path(logdir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {logdir}"
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def test_deep_sigmoid_run_writes_check_step_scalars_and_findings(tmp_path):
    log = StatsLog()
    watcher = train(deep_sigmoid(), tensorboard=tmp_path / "run", plugins=[log])
    acc = events(tmp_path / "run")
    scalars = acc.Tags()["scalars"]
    names = list(watcher.layers())
    checks = list(range(CHECK_EVERY, STEPS + 1, CHECK_EVERY))
    assert [s.step for s in log.stats] == checks
    for i, layer in enumerate(names):
        tag = f"gradwatch/grad_norm/{layer}"
        assert tag in scalars
        got = acc.Scalars(tag)
        assert [e.step for e in got] == checks  # check steps only, never the steps between
        want = [float(s.grad_norm[-1][i]) for s in log.stats]
        np.testing.assert_allclose([e.value for e in got], want, rtol=1e-6)
        assert f"gradwatch/update_ratio/{layer}" in scalars
        assert f"gradwatch/weight_change/{layer}" in scalars
    # The last value is the report's.
    report = watcher.report()
    last = {row.name: row.grad_norm for row in report.layers}
    for layer in names:
        assert acc.Scalars(f"gradwatch/grad_norm/{layer}")[-1].value == pytest.approx(
            last[layer], rel=1e-6)
        assert acc.Scalars(f"gradwatch/weight_change/{layer}")[-1].value == pytest.approx(
            {r.name: r.weight_change for r in report.layers}[layer], rel=1e-5)
    loss = acc.Scalars("gradwatch/loss")
    assert [e.step for e in loss] == checks
    np.testing.assert_allclose([e.value for e in loss], [float(s.loss[-1]) for s in log.stats],
                               rtol=1e-6)
    vanishing = [f for f in watcher.findings if f.kind == "vanishing_gradient"]
    assert vanishing, report
    written = texts(acc, "gradwatch/findings/text_summary")  # SummaryWriter's text tag
    assert len(written) == len(watcher.findings)
    for finding in vanishing:
        assert any(step == finding.step and "vanishing_gradient" in text
                   and f"`{finding.layer}`" in text for step, text in written), written


def test_user_writer_is_used_and_left_open(tmp_path):
    writer = SummaryWriter(log_dir=str(tmp_path))
    closed = []
    writer.close = lambda: closed.append(True)  # gradwatch must not call it
    train(deep_sigmoid(depth=3), steps=20, tensorboard=writer)
    assert closed == []
    writer.add_scalar("mine", 1.0, 99)  # still the user's, still open
    writer.flush()
    acc = events(tmp_path)
    assert [e.step for e in acc.Scalars("gradwatch/grad_norm/0")] == [5, 10, 15, 20]
    assert [e.step for e in acc.Scalars("mine")] == [99]
    SummaryWriter.close(writer)


class BrokenWriter:
    def __init__(self) -> None:
        self.calls = 0

    def add_scalar(self, tag, value, global_step):
        self.calls += 1
        raise OSError("disk full")

    def add_text(self, tag, text, global_step):
        self.calls += 1
        raise OSError("disk full")

    def flush(self):
        self.calls += 1


def test_failing_writer_is_reported_once_and_training_continues(tmp_path):
    writer = BrokenWriter()
    with pytest.warns(GradWatchInternalWarning, match="disk full") as record:
        watcher = train(deep_sigmoid(depth=3), steps=30, tensorboard=writer)
    internal = [w for w in record if issubclass(w.category, GradWatchInternalWarning)]
    assert len(internal) == 1
    assert writer.calls == 1  # never written to again
    assert watcher.step == 30
    assert len(watcher.report().internal_errors) == 1


@pytest.mark.parametrize("value", [pytest.param(True, id="bool"), pytest.param(3, id="int"),
                                   pytest.param(object(), id="object")])
def test_bad_tensorboard_value_is_a_type_error(value):
    with pytest.raises(TypeError, match="tensorboard"):
        gradwatch.torch.watch(deep_sigmoid(depth=2), tensorboard=value)


def test_failed_watch_leaves_no_event_file(tmp_path):
    with pytest.raises(ValueError, match="check_every"):
        gradwatch.torch.watch(deep_sigmoid(depth=2), tensorboard=tmp_path / "x", check_every=0)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_missing_tensorboard_is_an_import_error_at_watch_time(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        gradwatch.torch.watch(deep_sigmoid(depth=2), tensorboard=tmp_path)


def test_docs_example_runs_and_writes_events(tmp_path, monkeypatch):
    page = Path(__file__).parents[2] / "docs" / "integrations" / "tensorboard.md"
    import re

    code = re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)[0]
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gradwatch.GradientHealthWarning)
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
    acc = events(tmp_path / "runs" / "deep-sigmoid")
    assert any(t.startswith("gradwatch/grad_norm/") for t in acc.Tags()["scalars"])
    assert "gradwatch/findings/text_summary" in acc.Tags()["tensors"]
