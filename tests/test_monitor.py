"""Monitor: starts and clears reported once, flapping and NaN aftermath kept out of the log,
gradwatch's own failures isolated, the report, and option validation."""

from __future__ import annotations

import json
import logging
import math
import warnings

import numpy as np
import pytest

import gradwatch


def cleared_records(caplog):
    return [r for r in caplog.records
            if r.name == "gradwatch" and r.levelno == logging.INFO and "has cleared" in r.getMessage()]


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- start and clear --------------------------------------------------------------------------


def test_condition_is_reported_once_when_it_starts_and_once_when_it_clears(
        context, scripted, finding, stats, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="gradwatch")
    events = tmp_path / "events.jsonl"
    seen = []
    mon = gradwatch.Monitor(context, detectors=[scripted(
        [finding(10)], [finding(20)], [finding(30)], [],
    )], on_finding=seen.append, events=events)

    started = [mon.check(stats(s)) for s in (10, 20, 30, 40)]

    assert [[f.step for f in batch] for batch in started] == [[10], [], [], []]
    assert [f.step for f in mon.findings] == [10]
    assert seen == mon.findings
    [record] = cleared_records(caplog)
    assert "step 40" in record.getMessage() and "vanishing_gradient" in record.getMessage()
    assert "'0'" in record.getMessage()
    [cleared] = [e for e in read_events(events) if e["event"] == "cleared"]
    assert cleared == {**cleared, "step": 40, "kind": "vanishing_gradient", "layer": "0",
                       "since": 10}


@pytest.mark.parametrize(
    "script, cleared_at",
    [
        pytest.param([["F"], None, ["F"], ["F"]], [], id="none-between-holds"),
        pytest.param([["F"], None, None, []], [40], id="none-then-empty-clears"),
    ],
)
def test_detector_returning_none_does_not_clear_its_conditions(
        context, scripted, finding, stats, caplog, script, cleared_at):
    caplog.set_level(logging.INFO, logger="gradwatch")
    checks = [None if c is None else [finding(10 * (i + 1)) for _ in c]
              for i, c in enumerate(script)]
    mon = gradwatch.Monitor(context, detectors=[scripted(*checks)], on_finding="log")
    for s in (10, 20, 30, 40):
        mon.check(stats(s))
    assert [f.step for f in mon.findings] == [10]
    assert [r.getMessage().split(":")[0] for r in cleared_records(caplog)] == [
        f"step {s}" for s in cleared_at]


@pytest.mark.parametrize(
    "repeat_after, restart_at, reported, suppressed",
    [
        pytest.param(100, 30, [10], 1, id="flapping-suppressed"),
        pytest.param(0, 30, [10, 30], 0, id="repeat_after-0-reports-every-start"),
        pytest.param(100, 400, [10, 400], 0, id="restart-long-after-is-news"),
    ],
)
def test_repeat_after_suppresses_a_flapping_condition(
        context, scripted, finding, stats, repeat_after, restart_at, reported, suppressed):
    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)], [], [finding(restart_at)])],
                            on_finding="log", repeat_after=repeat_after)
    for s in (10, 20, restart_at):
        mon.check(stats(s))
    assert [f.step for f in mon.findings] == reported
    assert mon.report().suppressed == suppressed


def _flapping(scripted, finding, stats):
    det = scripted([finding(10)], [], [finding(30)], [])
    return [det], [stats(s) for s in (10, 20, 30, 40)]


def _after_nonfinite(scripted, finding, stats):
    det = scripted([finding(20, kind="exploding_gradient", layer="2")], [], [])
    nan = stats(20, grad_norm=(1.0, math.nan, 1.0))
    return [gradwatch.NonFiniteDetector(), det], [nan, stats(30), stats(40)]


@pytest.mark.parametrize("scenario", [pytest.param(_flapping, id="flapping-restart"),
                                      pytest.param(_after_nonfinite, id="during-nonfinite")])
def test_a_suppressed_start_is_not_reported_as_cleared(
        context, scripted, finding, stats, caplog, tmp_path, scenario):
    # "Reported when it starts and when it clears": a clear of a start the user never saw
    # ("... (reported at step 30) has cleared") is noise that names a report that never happened.
    caplog.set_level(logging.INFO, logger="gradwatch")
    detectors, checks = scenario(scripted, finding, stats)
    events = tmp_path / "events.jsonl"
    mon = gradwatch.Monitor(context, detectors=detectors, on_finding="log", events=events)
    for st in checks:
        mon.check(st)
    assert mon.report().suppressed == 1
    reported = {(f.kind, f.layer, f.step) for f in mon.findings}
    cleared = {(e["kind"], e["layer"], e["since"]) for e in read_events(events)
               if e["event"] == "cleared"}
    assert cleared <= reported
    assert len(cleared_records(caplog)) == len(cleared)


def test_findings_started_in_one_check_are_ordered_by_step(context, scripted, finding, stats):
    seen = []
    mon = gradwatch.Monitor(context, detectors=[
        scripted([finding(30, kind="exploding_gradient", layer="2"), finding(21, layer="1")]),
        scripted([finding(25, kind="loss_divergence", layer=None)]),
    ], on_finding=seen.append)
    # One check covering steps 21..30, as an adapter sends it with check_every=10.
    started = mon.check(gradwatch.StepStats(
        step=30, layers=("0", "1", "2"), steps=np.arange(21, 31), grad_norm=np.ones((10, 3)),
        has_grad=np.ones((10, 3), bool), loss=np.ones(10), grad_size=np.ones(3)))
    assert [f.step for f in started] == [21, 25, 30]
    assert [f.step for f in mon.findings] == [21, 25, 30]
    assert [f.step for f in seen] == [21, 25, 30]


def test_findings_after_a_nonfinite_one_are_suppressed(context, scripted, finding, stats):
    mon = gradwatch.Monitor(context, detectors=[
        gradwatch.NonFiniteDetector(),
        scripted([finding(12, layer="0"), finding(20, kind="exploding_gradient", layer="2")],
                 [finding(30, kind="loss_divergence", layer=None)]),
    ], on_finding="log")
    started = mon.check(stats(20, grad_norm=(1.0, math.inf, 1.0)))
    assert [(f.kind, f.step) for f in started] == [("vanishing_gradient", 12), ("nonfinite", 20)]
    assert started[1].layer == "1"
    # NaN still present at the next check: the loss blowing up is a consequence, not news.
    assert mon.check(stats(30, grad_norm=(math.nan,) * 3, loss=math.nan)) == []
    assert [f.kind for f in mon.findings] == ["vanishing_gradient", "nonfinite"]
    assert mon.report().suppressed == 2


# -- gradwatch's own failures -----------------------------------------------------------------


class BoomDetector(gradwatch.Detector):
    def update(self, stats):
        raise ZeroDivisionError("boom")


def test_a_raising_detector_is_reported_once_and_training_goes_on(
        context, scripted, finding, stats, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    mon = gradwatch.Monitor(context, detectors=[
        BoomDetector(), scripted([finding(10)], [finding(20)], [], [finding(40, layer="2")]),
    ], on_finding="log")
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="BoomDetector.*boom"):
        assert [f.step for f in mon.check(stats(10))] == [10]
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        for s in (20, 30, 40):
            mon.check(stats(s))
    assert not [w for w in later if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
    errors = [r for r in caplog.records if r.name == "gradwatch" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and "BoomDetector" in errors[0].getMessage()
    assert [(f.step, f.layer) for f in mon.findings] == [(10, "0"), (40, "2")]
    report = mon.report()
    assert report.checks == 4
    assert len(report.internal_errors) == 1 and "boom" in report.internal_errors[0]
    assert "boom" in str(report)


# -- report and lifecycle ---------------------------------------------------------------------


def test_report_renders_the_layer_table_and_findings(context, scripted, finding, stats):
    f = finding(20, layer="0", advice=("use ReLU instead of sigmoid", "add BatchNorm"))
    mon = gradwatch.Monitor(context, detectors=[scripted([], [f])], on_finding="log")
    mon.check(stats(10, grad_norm=(1e-3, 0.5, 2.0), loss=2.5, update_ratio=(1e-4, 1e-3, 1e-2),
                    weight_change=(0.01, 0.02, 0.03)))
    mon.check(stats(20, grad_norm=(1e-5, 0.4, 2.0), loss=0.75))
    report = mon.report()

    assert (report.framework, report.steps, report.checks) == ("test", 20, 2)
    assert report.findings == (f,)
    assert [row.name for row in report.layers] == ["0", "1", "2"]
    assert report.layers[0].flags == ("vanishing_gradient",)
    assert report.layers[1].flags == ()
    assert report.layers[0].grad_norm == pytest.approx(1e-5)
    assert report.layers[0].grad_norm_typical == pytest.approx(1e-4)  # geometric mean
    assert report.layers[2].update_ratio == pytest.approx(1e-2)
    assert (report.loss_first, report.loss_last) == (2.5, 0.75)

    text = str(report)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert "grad norm" in header and "flags" in header
    row0 = next(line for line in lines if line.startswith("0 "))
    assert "Linear" in row0 and "1.00e-05" in row0 and "vanishing_gradient" in row0
    assert any(line.startswith("2 ") and line.endswith("ok") for line in lines)
    assert f.message in text
    assert "use ReLU instead of sigmoid" in text and "add BatchNorm" in text
    assert "2.5" in text and "0.75" in text


def test_report_without_findings_says_none(context, stats):
    mon = gradwatch.Monitor(context, detectors=[], on_finding="log")
    mon.check(stats(10))
    assert "findings: none" in str(mon.report())


class EndCounter:
    def __init__(self):
        self.reports = []

    @gradwatch.hookimpl
    def gradwatch_run_end(self, report):
        self.reports.append(report)


def test_end_calls_run_end_once(context, stats):
    counter = EndCounter()
    mon = gradwatch.Monitor(context, detectors=[], plugins=[counter], on_finding="log")
    mon.check(stats(10))
    first = mon.end()
    second = mon.end()
    assert len(counter.reports) == 1
    assert counter.reports[0].steps == first.steps == second.steps == 10


def test_reset_starts_a_new_run(context, scripted, finding, stats):
    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)], [finding(10)])],
                            on_finding="log")
    mon.check(stats(10))
    mon.reset()
    assert mon.findings == [] and mon.report().checks == 0
    # Within repeat_after of the previous run's start, but a new run: reported again.
    assert [f.step for f in mon.check(stats(10))] == [10]


def test_activation_schedule(context):
    mon = gradwatch.Monitor(context, detectors=[], check_every=4)
    assert mon.activation_every == 20
    assert [s for s in range(1, 41) if mon.is_check_step(s)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert [s for s in range(1, 41) if mon.is_activation_step(s)] == [20, 40]
    off = gradwatch.Monitor(context, detectors=[], check_every=4, activation_every=None)
    assert not any(off.is_activation_step(s) for s in range(1, 41))


# -- option validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, name",
    [
        pytest.param({"check_every": 0}, ValueError, "check_every", id="check_every-0"),
        pytest.param({"check_every": 2.5}, TypeError, "check_every", id="check_every-float"),
        pytest.param({"check_every": "10"}, TypeError, "check_every", id="check_every-str"),
        pytest.param({"check_every": True}, TypeError, "check_every", id="check_every-bool"),
        pytest.param({"check_every": 10, "activation_every": 15}, ValueError, "activation_every",
                     id="activation_every-not-multiple"),
        pytest.param({"activation_every": 0}, ValueError, "activation_every", id="activation_every-0"),
        pytest.param({"activation_every": 5.0}, TypeError, "activation_every",
                     id="activation_every-float"),
        pytest.param({"repeat_after": -1}, ValueError, "repeat_after", id="repeat_after-negative"),
        pytest.param({"repeat_after": 1.5}, TypeError, "repeat_after", id="repeat_after-float"),
        pytest.param({"on_finding": "print"}, ValueError, "on_finding", id="on_finding-unknown"),
        pytest.param({"on_finding": None}, ValueError, "on_finding", id="on_finding-none"),
        pytest.param({"name": 3}, TypeError, "name", id="name-int"),
        pytest.param({"events": 3}, TypeError, "events", id="events-int"),
        pytest.param({"detectors": [object()]}, TypeError, r"detectors\[0\]", id="detectors-object"),
        pytest.param({"detectors": [gradwatch.NonFiniteDetector(), gradwatch.VanishingGradientDetector]},
                     TypeError, r"detectors\[1\]", id="detectors-class-not-instance"),
    ],
)
def test_invalid_option_raises_naming_it(context, options, error, name):
    with pytest.raises(error, match=name):
        gradwatch.Monitor(context, **options)


def test_a_single_detector_instead_of_a_list_raises_naming_detectors(context):
    with pytest.raises(TypeError, match="detectors"):
        gradwatch.Monitor(context, detectors=gradwatch.VanishingGradientDetector())


# -- what adapters and sinks get from the monitor ---------------------------------------------


class RunRecorder:
    """A sink that keeps the run description each hook was handed."""

    def __init__(self):
        self.seen = []

    @gradwatch.hookimpl
    def gradwatch_run_start(self, run):
        self.seen.append(("start", run))

    @gradwatch.hookimpl
    def gradwatch_finding(self, run, finding):
        self.seen.append(("finding", run))

    @gradwatch.hookimpl
    def gradwatch_run_end(self, run, report):
        self.seen.append(("end", run))


def test_sinks_get_a_frozen_run_description_not_the_engine(context, scripted, finding, stats):
    recorder = RunRecorder()
    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)])], plugins=[recorder],
                            on_finding="log", name="exp-1", check_every=5)
    mon.check(stats(10))
    mon.update_model(learning_rates=(0.01,), clipping=True)
    mon.end()
    kinds = [k for k, _ in recorder.seen]
    assert kinds == ["start", "finding", "end"]
    start, _, end = (run for _, run in recorder.seen)
    assert isinstance(start, gradwatch.RunInfo) and not isinstance(start, gradwatch.Monitor)
    assert (start.name, start.framework, start.check_every, start.activation_every) == \
        ("exp-1", "test", 5, 25)
    assert start.layer_names == ("0", "1", "2")
    with pytest.raises(AttributeError):
        start.name = "other"  # frozen: a sink cannot rewrite the run
    # What the adapter said later reaches the next hook; the earlier description is unchanged.
    assert start.model.learning_rates == (0.1,) and start.model.clipping is None
    assert end.model.learning_rates == (0.01,) and end.model.clipping is True
    assert mon.context.model.learning_rates == (0.01,)


def test_a_quiet_monitor_keeps_findings_tells_nobody_and_still_stops_in_strict_mode(
        context, scripted, finding, stats, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    events = tmp_path / "events.jsonl"
    told = []
    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)], [])], emit=False,
                            on_finding=told.append, events=events)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.check(stats(10))
        mon.check(stats(20))
        mon.end()
    assert [f.step for f in mon.findings] == [10] and told == []
    assert not events.exists()
    assert not [r for r in caplog.records if r.name == "gradwatch"]
    strict = gradwatch.Monitor(context, detectors=[scripted([finding(10)])], emit=False,
                               on_finding="raise")
    with pytest.raises(gradwatch.GradientHealthError):
        strict.check(stats(10))


def test_guard_reports_an_adapter_failure_once_and_lets_strict_mode_through(context, finding):
    mon = gradwatch.Monitor(context, detectors=[], on_finding="log")

    def broken():
        raise KeyError("boom")

    with pytest.warns(gradwatch.GradWatchInternalWarning, match="my adapter.*boom"):
        assert mon.guard("my adapter", broken) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.guard("my adapter", broken) is None  # once per place
    assert mon.guard("sum", sum, [1, 2]) == 3

    def strict():
        raise gradwatch.GradientHealthError(finding(10))

    with pytest.raises(gradwatch.GradientHealthError):
        mon.guard("my adapter", strict)
    assert mon.report().internal_errors == ("my adapter: KeyError: 'boom'",)


def test_detail_steps_follow_the_activation_schedule(context):
    assert [s for s in range(1, 101) if gradwatch.Monitor(
        context, detectors=[], check_every=10).is_detail_step(s)] == [50, 100]
    assert [s for s in range(1, 61) if gradwatch.Monitor(
        context, detectors=[], check_every=10, activation_every=20).is_detail_step(s)] == \
        [20, 40, 60]
    assert [s for s in range(1, 101) if gradwatch.Monitor(
        context, detectors=[], check_every=10, activation_every=None).is_detail_step(s)] == \
        [50, 100]


class SpikeWarning(gradwatch.GradientHealthWarning):
    """A third party's own category."""


class SpikeDetector(gradwatch.Detector):
    kinds = ("loss_spike_x",)
    categories = {"loss_spike_x": SpikeWarning}

    def update(self, stats):
        return [gradwatch.Finding(kind="loss_spike_x", step=stats.step, layer=None, value=1.0,
                                  threshold=0.5, message="the loss spiked")]


def test_a_third_party_detector_declares_its_own_warning_category(context, stats):
    mon = gradwatch.Monitor(context, detectors=[SpikeDetector()])
    with pytest.warns(SpikeWarning, match="the loss spiked"):
        mon.check(stats(10))
    assert mon.findings[0].category is SpikeWarning


def test_a_detector_cannot_take_over_a_built_in_kind_or_name_a_non_warning(context):
    class Hijack(SpikeDetector):
        categories = {"nonfinite": SpikeWarning}

    class NotAWarning(SpikeDetector):
        categories = {"loss_spike_y": ValueError}

    with pytest.raises(ValueError, match="'nonfinite' is built in.*NonFiniteWarning"):
        gradwatch.Monitor(context, detectors=[Hijack()])
    with pytest.raises(TypeError, match="'loss_spike_y' must be a subclass of "
                                        "gradwatch.GradientHealthWarning"):
        gradwatch.Monitor(context, detectors=[NotAWarning()])


def test_skipped_steps_are_counted_and_told_once_per_repeat_after(context):
    # A guard that skips every step from 10 to 209: 200 skips, told at 10 and again at 110.
    mon = gradwatch.Monitor(context, repeat_after=100, on_finding="log")
    told = [mon.step_skipped(step, [1]) for step in range(10, 210)]
    assert [f.step for f in told if f is not None] == [10, 110]
    report = mon.report()
    assert report.skipped_steps == 200 and report.summary()["skipped_steps"] == 200
    first = report.findings[0]
    assert (first.kind, first.layer, first.is_warning) == ("nonfinite", context.layers[1].name,
                                                           True)
    assert first.evidence == {"layers": [context.layers[1].name], "skipped": True}
    assert "the guard skipped this optimizer step" in first.message
    assert "200 optimizer steps with non-finite gradients skipped" in str(report)
