"""Sinks: what each on_finding mode does, the JSONL event file, and sink failures that must not
stop training or the other sinks."""

from __future__ import annotations

import json
import logging
import math
import warnings

import pytest

import gradwatch

CATEGORIES = [
    pytest.param("vanishing_gradient", gradwatch.VanishingGradientWarning, id="vanishing"),
    pytest.param("exploding_gradient", gradwatch.ExplodingGradientWarning, id="exploding"),
    pytest.param("nonfinite", gradwatch.NonFiniteWarning, id="nonfinite"),
    pytest.param("loss_plateau", gradwatch.LossPlateauWarning, id="plateau"),
    pytest.param("loss_divergence", gradwatch.LossDivergenceWarning, id="divergence"),
    pytest.param("stalled_update", gradwatch.UpdateRatioWarning, id="stalled-update"),
    pytest.param("large_update", gradwatch.UpdateRatioWarning, id="large-update"),
    pytest.param("dead_units", gradwatch.DeadUnitsWarning, id="dead-units"),
    pytest.param("saturated_units", gradwatch.SaturationWarning, id="saturated-units"),
]


def gradwatch_records(caplog, level):
    return [r for r in caplog.records if r.name == "gradwatch" and r.levelno == level]


def strict_events(path):
    def reject(name):
        raise AssertionError(f"bare {name} in the event file")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def internal_warnings(record):
    return [w for w in record if issubclass(w.category, gradwatch.GradWatchInternalWarning)]


# -- on_finding -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, category", CATEGORIES)
def test_warn_emits_the_findings_category_and_an_info_record(
        context, scripted, finding, stats, caplog, kind, category):
    caplog.set_level(logging.INFO, logger="gradwatch")
    f = finding(10, kind=kind, advice=("clip gradients",))
    mon = gradwatch.Monitor(context, detectors=[scripted([f])])  # on_finding defaults to "warn"
    with pytest.warns(gradwatch.GradientHealthWarning) as record:
        mon.check(stats(10))
    assert [w.category for w in record] == [category]
    assert str(record[0].message) == f.render()
    [info] = [r for r in gradwatch_records(caplog, logging.INFO) if f.message in r.getMessage()]
    assert "clip gradients" in info.getMessage()
    assert not gradwatch_records(caplog, logging.WARNING)


def test_log_emits_a_warning_record_and_no_python_warning(
        context, scripted, finding, stats, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    f = finding(10, advice=("use ReLU",))
    mon = gradwatch.Monitor(context, detectors=[scripted([f])], on_finding="log")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mon.check(stats(10))
    assert not [w for w in record if issubclass(w.category, gradwatch.GradientHealthWarning)]
    [rec] = gradwatch_records(caplog, logging.WARNING)
    assert "VanishingGradientWarning" in rec.getMessage() and f.render() in rec.getMessage()
    assert mon.findings == [f]


def test_raise_raises_gradient_health_error_carrying_the_finding(context, scripted, finding, stats):
    f = finding(10, kind="nonfinite", layer=None)
    mon = gradwatch.Monitor(context, detectors=[scripted([], [f])], on_finding="raise")
    assert mon.check(stats(5)) == []
    with pytest.raises(gradwatch.GradientHealthError) as excinfo:
        mon.check(stats(10))
    assert excinfo.value.finding == f
    assert mon.report().internal_errors == ()


def test_a_callable_receives_each_finding(context, scripted, finding, stats):
    seen = []
    a, b = finding(10), finding(20, kind="exploding_gradient", layer="2")
    mon = gradwatch.Monitor(context, detectors=[scripted([a], [a, b])], on_finding=seen.append)
    mon.check(stats(10))
    mon.check(stats(20))
    assert seen == [a, b]


def test_a_callable_that_fails_is_reported_and_training_goes_on(context, scripted, finding, stats):
    def broken(f):
        raise KeyError("my handler")

    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)], [], [finding(30)])],
                            on_finding=broken, repeat_after=0)
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="my handler"):
        mon.check(stats(10))
    mon.check(stats(20))
    assert [f.step for f in mon.check(stats(30))] == [30]
    assert [f.step for f in mon.findings] == [10, 30]


@pytest.mark.parametrize("category", [
    pytest.param(gradwatch.VanishingGradientWarning, id="its-own-category"),
    pytest.param(gradwatch.GradientHealthWarning, id="the-base-category"),
])
def test_a_warning_filtered_to_error_propagates_out_of_check(
        context, scripted, finding, stats, category):
    mon = gradwatch.Monitor(context, detectors=[scripted([finding(10)])])
    with warnings.catch_warnings():
        warnings.simplefilter("error", category)
        with pytest.raises(gradwatch.VanishingGradientWarning, match="step 10"):
            mon.check(stats(10))
    assert mon.report().internal_errors == ()


# -- the JSONL event file ---------------------------------------------------------------------


def test_jsonl_writes_one_strict_json_object_per_event_as_it_happens(
        context, scripted, finding, stats, tmp_path):
    path = tmp_path / "runs" / "events.jsonl"
    f = finding(10, value=math.nan, threshold=math.inf, advice=("lower the learning rate",))
    mon = gradwatch.Monitor(context, detectors=[scripted([f], [])], on_finding="log",
                            events=path, name="run-a", check_every=5)
    mon.check(stats(10, grad_norm=(1e-7, math.nan, math.inf), loss=math.nan,
                    update_ratio=(math.nan, 1e-3, 1e-3)))

    # Read while the run is still open: every event so far is already on disk.
    start, st, found, window = strict_events(path)
    assert (start["event"], st["event"], found["event"]) == ("start", "stats", "finding")
    # forensics: the warning is followed by the window of steps before it, layer by layer
    assert (window["event"], window["step"], window["kind"], window["layer"]) == (
        "window", 10, "vanishing_gradient", "0")
    assert window["steps"] == [10] and window["grad_norm"] == [[1e-7, "NaN", "Infinity"]]
    assert window["has_grad"] == [[True, True, True]] and window["loss"] == ["NaN"]
    assert start["run"] == "run-a" and start["framework"] == "test" and start["check_every"] == 5
    assert [layer["name"] for layer in start["layers"]] == ["0", "1", "2"]
    assert st["step"] == 10 and st["loss"] == ["NaN"]
    assert st["grad_norm"] == [1e-7, "NaN", "Infinity"]
    assert st["update_ratio"] == ["NaN", 1e-3, 1e-3]
    assert gradwatch.Finding.from_dict(found).message == f.message
    assert (found["kind"], found["step"], found["layer"]) == ("vanishing_gradient", 10, "0")
    assert (found["value"], found["threshold"]) == ("NaN", "Infinity")
    assert found["advice"] == ["lower the learning rate"]

    mon.check(stats(20, loss=0.5))
    mon.end()
    events = strict_events(path)
    assert [e["event"] for e in events] == ["start", "stats", "finding", "window", "stats",
                                            "cleared", "end"]
    cleared, end = events[5], events[6]
    assert (cleared["step"], cleared["kind"], cleared["layer"], cleared["since"]) == (
        20, "vanishing_gradient", "0", 10)
    assert end["step"] == 20
    assert end["summary"]["findings"] == {"vanishing_gradient": 1}
    assert end["summary"]["loss_last"] == 0.5
    assert all(isinstance(e["time"], float) for e in events)


def test_jsonl_end_is_written_once(context, stats, tmp_path):
    path = tmp_path / "events.jsonl"
    mon = gradwatch.Monitor(context, detectors=[], events=path)
    mon.check(stats(10))
    mon.end()
    mon.end()
    assert [e["event"] for e in strict_events(path)] == ["start", "stats", "end"]


def _under_a_file(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    return blocker / "events.jsonl"


def _a_directory(tmp_path):
    return tmp_path


@pytest.mark.parametrize("unwritable", [pytest.param(_under_a_file, id="path-under-a-file"),
                                        pytest.param(_a_directory, id="path-is-a-directory")])
def test_an_unwritable_event_file_is_reported_once_and_the_rest_works(
        context, scripted, finding, stats, caplog, tmp_path, unwritable):
    caplog.set_level(logging.INFO, logger="gradwatch")
    seen = []
    mon = gradwatch.Monitor(context, on_finding=seen.append, events=unwritable(tmp_path),
                            detectors=[scripted([finding(10)], [], [finding(30, layer="1")])])
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="events"):
        mon.start()  # the run's first event is the first write
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        started = [mon.check(stats(s)) for s in (10, 20, 30)]
        report = mon.end()
    assert not internal_warnings(record)
    assert [[f.step for f in batch] for batch in started] == [[10], [], [30]]
    assert [f.step for f in seen] == [10, 30]
    assert len(gradwatch_records(caplog, logging.ERROR)) == 1
    assert len(report.internal_errors) == 1
    assert report.checks == 3


class BrokenSink:
    @gradwatch.hookimpl
    def gradwatch_finding(self, finding):
        raise RuntimeError("sink is down")


def test_a_failing_sink_plugin_does_not_stop_the_builtin_sinks(
        context, scripted, finding, stats, tmp_path):
    path = tmp_path / "events.jsonl"
    seen = []
    mon = gradwatch.Monitor(context, plugins=[BrokenSink()], on_finding=seen.append, events=path,
                            detectors=[scripted([finding(10)], [finding(10), finding(20, layer="1")])])
    with pytest.warns(gradwatch.GradWatchInternalWarning, match="gradwatch_finding.*sink is down"):
        mon.check(stats(10))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mon.check(stats(20))
    assert not internal_warnings(record)
    assert [(f.step, f.layer) for f in seen] == [(10, "0"), (20, "1")]
    assert [(e["step"], e["layer"]) for e in strict_events(path) if e["event"] == "finding"] == [
        (10, "0"), (20, "1")]
    assert len(mon.report().internal_errors) == 1
