"""The core TensorBoard sink: what it writes at each check and finding, flushing and closing,
and a failing writer that must not stop training."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from references import FakeWriter

import gradwatch
from gradwatch import kit


def monitor(context, writer=None, *, opener=None, **options):
    sink = kit.tensorboard_sink(writer, opener or (lambda logdir: FakeWriter))
    return gradwatch.Monitor(context, tensorboard=sink, **options)


def test_check_writes_per_layer_scalars_and_the_loss_at_the_check_step(context, stats):
    writer = FakeWriter()
    mon = monitor(context, writer, detectors=[])
    mon.check(stats(10, grad_norm=(0.5, 0.25, 2.0), loss=0.75,
                    update_ratio=(1e-3, math.nan, 2e-3), weight_change=(0.1, 0.2, 0.3)))
    got = {tag: (value, step) for tag, value, step in writer.scalars}
    assert got == {
        "gradwatch/loss": (0.75, 10),
        "gradwatch/grad_norm/0": (0.5, 10), "gradwatch/grad_norm/1": (0.25, 10),
        "gradwatch/grad_norm/2": (2.0, 10),
        # layer "1": not measured (NaN) -> no point rather than a NaN point
        "gradwatch/update_ratio/0": (1e-3, 10), "gradwatch/update_ratio/2": (2e-3, 10),
        "gradwatch/weight_change/0": (0.1, 10), "gradwatch/weight_change/1": (0.2, 10),
        "gradwatch/weight_change/2": (0.3, 10),
    }


def test_layers_without_gradient_and_steps_without_loss_are_left_out(context, stats):
    writer = FakeWriter()
    mon = monitor(context, writer, detectors=[])
    mon.check(stats(5, grad_norm=(1.0, 0.0, 3.0), loss=None, has_grad=(True, False, True)))
    assert sorted(tag for tag, _, _ in writer.scalars) == ["gradwatch/grad_norm/0",
                                                           "gradwatch/grad_norm/2"]


def test_each_finding_is_a_text_at_its_step(context, scripted, finding, stats):
    writer = FakeWriter()
    f = finding(7, layer="1", advice=("use ReLU",))
    mon = monitor(context, writer, detectors=[scripted([f])])
    with pytest.warns(gradwatch.VanishingGradientWarning):
        mon.check(stats(10))
    [(tag, text, step)] = writer.texts
    assert (tag, step) == ("gradwatch/findings", 7)
    assert "vanishing_gradient" in text and "`1`" in text and "use ReLU" in text
    assert f.message in text


def test_user_writer_is_flushed_not_closed_and_an_opened_one_is_closed(context, stats):
    user = FakeWriter()
    mon = monitor(context, user, detectors=[])
    mon.check(stats(10))
    mon.end()
    assert (user.flushes, user.closes) == (1, 0)

    opened: list[FakeWriter] = []
    logdirs: list[str] = []

    def opener(logdir):
        logdirs.append(logdir)

        def make():
            opened.append(FakeWriter())
            return opened[-1]

        return make

    mon = monitor(context, "runs/x", opener=opener, detectors=[])
    assert logdirs == ["runs/x"] and opened == []  # nothing opened before the first write
    mon.check(stats(10))
    mon.end()
    [w] = opened
    assert (w.flushes, w.closes) == (1, 1) and w.scalars
    mon.reset()  # a new run opens a new writer
    mon.check(stats(10))
    mon.end()
    assert len(opened) == 2 and opened[1].closes == 1


class RaisingWriter(FakeWriter):
    def add_scalar(self, tag, value, global_step):
        super().add_scalar(tag, value, global_step)
        raise OSError("No space left on device")

    def add_text(self, tag, text, global_step):
        raise OSError("No space left on device")


def test_a_failing_writer_is_reported_once_and_checks_go_on(context, scripted, finding, stats):
    writer = RaisingWriter()
    f = finding(30)
    mon = monitor(context, writer, detectors=[scripted(None, None, [f])])
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="No space left") as record:
        mon.check(stats(10))
    assert len(record) == 1
    with pytest.warns(gradwatch.VanishingGradientWarning) as later:
        mon.check(stats(20))
        mon.check(stats(30))  # the finding still reaches the other sinks
        report = mon.end()
    assert not [w for w in later if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
    assert len(writer.scalars) == 1  # never written to after the failure
    assert writer.flushes == 0
    assert [x.kind for x in mon.findings] == ["vanishing_gradient"]
    assert len(report.internal_errors) == 1 and "tensorboard" in report.internal_errors[0]


def test_a_quiet_monitor_writes_nothing(context, stats):
    writer = FakeWriter()
    mon = monitor(context, writer, detectors=[], emit=False)
    mon.check(stats(10))
    mon.end()
    assert (writer.scalars, writer.flushes) == ([], 0)


@pytest.mark.parametrize("value", [
    pytest.param(True, id="bool"), pytest.param(1.5, id="float"),
    pytest.param(b"runs", id="bytes"), pytest.param(object(), id="object"),
    pytest.param(type("HalfWriter", (), {"add_scalar": lambda *a: None})(), id="half-writer"),
])
def test_a_bad_tensorboard_value_is_a_type_error_naming_it(value):
    with pytest.raises(TypeError, match="tensorboard"):
        kit.tensorboard_sink(value, lambda logdir: FakeWriter)


def test_an_empty_log_directory_is_refused():
    with pytest.raises(ValueError, match="tensorboard"):
        kit.tensorboard_sink("", lambda logdir: FakeWriter)


def test_the_sink_imports_no_framework():
    code = ("import sys, gradwatch, gradwatch.kit, gradwatch._tensorboard; "
            "print(sorted({'torch', 'tensorflow', 'tensorboard', 'keras'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
