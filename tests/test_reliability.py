"""Reliability of the core (issue 6): gradwatch's own failures never stop training nor silence
the other sinks, a crashed run's event file still reads, hostile strings stay inert in every
output, and a long run keeps its memory and its log bounded.

The PyTorch side of the same guarantees is tests/torch_adapter/test_torch_faults.py; the map
from guarantee to test is docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import importlib.metadata
import io
import json
import logging
import math
import os
import re
import sys
import types

import pytest

import gradwatch
from gradwatch import _cli, _manager, _sinks
from gradwatch import experiments as ex
from gradwatch._events import EventFileError, read_events, read_runs
from gradwatch.experiments._results import RunRecord, format_table, results_markdown

# -- helpers ----------------------------------------------------------------------------------

#: The layers of conftest's ``context`` (not imported: tests/torch_adapter imports this module,
#: and there ``conftest`` is the adapter's).
LAYERS = ("0", "1", "2")


def healthy_then_sick(steps=100):
    """One check per step: layer '0' starves from step 20, layer '2' has a NaN gradient at step
    50 only, layer '1' spikes at step 80. Three findings at three different steps, most of them
    after the faults the tests inject early in the run."""
    for s in range(1, steps + 1):
        g = [1e-9 if s >= 20 else 0.5, 1e4 if s == 80 else 0.5, math.nan if s == 50 else 0.5]
        yield gradwatch.make_step_stats(s, LAYERS, g, loss=1.0 + 1.0 / s)


def key(findings):
    return [(f.kind, f.step, f.layer) for f in findings]


def reference_findings(context):
    mon = gradwatch.Monitor(context, on_finding="log")
    for st in healthy_then_sick():
        mon.check(st)
    found = key(mon.findings)
    # The scenario must be worth testing: findings before and after the faults.
    assert len({step for _, step, _ in found}) >= 3 and found[-1][1] >= 50, found
    return found


class Recorder:
    """Another sink: a run plugin keeping every finding it hears."""

    def __init__(self) -> None:
        self.findings = []

    @gradwatch.hookimpl
    def gradwatch_finding(self, finding) -> None:
        self.findings.append(finding)


class DashboardSink:
    """A third-party sink whose backend is down."""

    @gradwatch.hookimpl
    def gradwatch_finding(self, finding) -> None:
        raise ConnectionError("dashboard unreachable")


class BreaksAt(gradwatch.Detector):
    """A detector with a bug that shows from step ``at`` on."""

    kinds = ("broken",)

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def update(self, stats):
        if stats.step >= self.at:
            raise ZeroDivisionError(f"detector bug at step {stats.step}")
        return []


def internal(record):
    return [str(w.message) for w in record
            if issubclass(w.category, gradwatch.GradWatchInternalWarning)]


@pytest.fixture
def failing_disk(monkeypatch):
    """``failing_disk(after, error, short)``: the event file's disk accepts ``after`` writes,
    then refuses every one with ``error``; with ``short`` the first refused write lands half
    its bytes first (what a disk filling up mid-line does), so the file ends in a torn line."""

    real_open = open

    def install(after: int, error: int = errno.ENOSPC, short: bool = False):
        state = {"writes": 0, "torn": False}

        class Disk(io.FileIO):
            def write(self, b):
                state["writes"] += 1
                if state["writes"] > after:
                    if short and not state["torn"] and len(b) > 1:
                        state["torn"] = True
                        return super().write(bytes(b)[: len(b) // 2])
                    raise OSError(error, os.strerror(error))
                return super().write(b)

        def fake_open(path, mode="r", *args, **kwargs):
            if "a" not in mode:
                return real_open(path, mode, *args, **kwargs)
            return io.TextIOWrapper(io.BufferedWriter(Disk(path, "a")), encoding="utf-8")

        monkeypatch.setattr(_sinks, "open", fake_open, raising=False)
        return state

    return install


# -- gradwatch's own failures -----------------------------------------------------------------


def test_every_failure_at_once_is_reported_once_each_and_the_findings_are_complete(
        context, failing_disk, tmp_path):
    expected = reference_findings(context)
    failing_disk(after=10, short=True)  # the disk fills up at the 11th event, mid-line
    path = tmp_path / "run.jsonl"
    seen, other = [], Recorder()
    with pytest.warns(gradwatch.GradWatchInternalWarning) as record:
        mon = gradwatch.Monitor(
            context, detectors=[*gradwatch.default_detectors(), BreaksAt(40)],
            plugins=[DashboardSink(), other], on_finding=seen.append, events=path)
        for st in healthy_then_sick():
            mon.check(st)
        report = mon.end()

    messages = internal(record)
    assert len(messages) == 3, messages  # one per place that failed, not one per check
    assert sum("BreaksAt" in m and "detector bug at step 40" in m for m in messages) == 1
    assert sum("DashboardSink" in m and "dashboard unreachable" in m for m in messages) == 1
    assert sum("'events'" in m and "No space left on device" in m for m in messages) == 1
    # Training went on, and every sink that still works heard every finding.
    assert report.checks == 100 and report.steps == 100
    assert key(mon.findings) == key(seen) == key(other.findings) == expected
    assert len(report.internal_errors) == 3
    # What reached the disk before it filled up still reads; the torn line is dropped.
    log = read_events(path)
    assert log.truncated and len(log.events) == 10
    [run] = read_runs(path)
    assert run.truncated and not run.ended


def _disk_full(failing_disk, mon):
    failing_disk(after=12, short=True)


def _io_error(failing_disk, mon):
    failing_disk(after=12, error=errno.EIO)


def _file_closed(failing_disk, mon):
    mon.check(gradwatch.make_step_stats(0, LAYERS, [0.5] * 3))  # opens the file
    mon.pm.get_plugin("events")._file.close()  # e.g. closed by code that owns "all open files"


@pytest.mark.parametrize("fault, error", [
    pytest.param(_disk_full, "No space left on device", id="disk-full-mid-line"),
    pytest.param(_io_error, "Input/output error", id="io-error"),
    pytest.param(_file_closed, "closed file", id="file-object-closed"),
])
def test_an_event_file_failing_mid_run_is_reported_once_and_the_rest_goes_on(
        context, failing_disk, tmp_path, caplog, fault, error):
    caplog.set_level(logging.INFO, logger="gradwatch")
    expected = reference_findings(context)
    path = tmp_path / "run.jsonl"
    seen, other = [], Recorder()
    mon = gradwatch.Monitor(context, plugins=[other], on_finding=seen.append, events=path)
    with pytest.warns(gradwatch.GradWatchInternalWarning) as record:
        fault(failing_disk, mon)
        for st in healthy_then_sick():
            mon.check(st)
        report = mon.end()  # closing the file must not be a second report
    [message] = internal(record)
    assert "'events'" in message and error in message
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert key(mon.findings) == key(seen) == key(other.findings) == expected
    assert report.checks >= 100 and len(report.internal_errors) == 1
    assert "cleared" in caplog.text  # the log sink kept reporting clears after the failure
    [run] = read_runs(path)
    assert 0 < run.check_steps.size < 100 and not run.ended


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_device_that_is_always_full_is_reported_once(context):
    expected = reference_findings(context)
    seen = []
    with pytest.warns(gradwatch.GradWatchInternalWarning) as record:
        mon = gradwatch.Monitor(context, on_finding=seen.append, events="/dev/full")
        for st in healthy_then_sick():
            mon.check(st)
        mon.end()
    [message] = internal(record)
    assert "No space left on device" in message
    assert key(seen) == key(mon.findings) == expected


def test_a_run_appended_after_a_torn_line_still_reads(context, failing_disk, tmp_path,
                                                      monkeypatch, capsys):
    path = tmp_path / "run.jsonl"
    failing_disk(after=5, short=True)
    with pytest.warns(gradwatch.GradWatchInternalWarning):
        first = gradwatch.Monitor(context, on_finding="log", events=path, name="first")
        for st in healthy_then_sick(30):
            first.check(st)
    assert not path.read_bytes().endswith(b"\n")  # the disk full left half a line
    monkeypatch.delattr(_sinks, "open")
    # The user frees space and restarts training: the new run appends to the same file.
    second = gradwatch.Monitor(context, on_finding="log", events=path, name="second")
    for st in healthy_then_sick(30):
        second.check(st)
    second.end()

    runs = read_runs(path)
    assert [r.name for r in runs] == ["first", "second"]
    assert runs[0].truncated and not runs[0].ended
    assert not runs[1].truncated and runs[1].ended
    assert key(runs[1].findings) == key(second.findings)
    assert _cli.main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    assert "did not end cleanly" in capsys.readouterr().out


def test_a_torn_line_not_followed_by_a_new_run_is_still_an_error(context, tmp_path):
    # Dropping torn lines is for crashes only: corruption in the middle of a run is reported.
    path = tmp_path / "run.jsonl"
    mon = gradwatch.Monitor(context, on_finding="log", events=path)
    for st in healthy_then_sick(5):
        mon.check(st)
    mon.end()
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:25]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventFileError, match="line 3"):
        read_events(path)


# -- plugins that break at run time -----------------------------------------------------------


@pytest.fixture
def third_party(monkeypatch):
    """``third_party(name, **hooks)``: an installed entry-point plugin with these hooks."""
    monkeypatch.delenv(_manager.DISABLE_AUTOLOAD_ENV, raising=False)
    real = importlib.metadata.entry_points
    eps = []

    def entry_points(**kwargs):
        if kwargs.get("group") == _manager.ENTRY_POINT_GROUP:
            return list(eps)
        return real(**kwargs)

    monkeypatch.setattr(_manager.importlib.metadata, "entry_points", entry_points)

    def install(name, **hooks):
        module = types.ModuleType(f"gw_reliability_{name}")
        for hook, function in hooks.items():
            setattr(module, hook, gradwatch.hookimpl(function))
        monkeypatch.setitem(sys.modules, module.__name__, module)
        eps.append(importlib.metadata.EntryPoint(name=name, value=module.__name__,
                                                 group=_manager.ENTRY_POINT_GROUP))

    _manager.reset_plugin_manager()
    yield install
    _manager.reset_plugin_manager()


def test_a_plugin_that_loads_but_fails_at_run_time_is_reported_once_by_name(context, third_party):
    expected = reference_findings(context)
    _manager.reset_plugin_manager()

    def default_detectors():
        raise ImportError("needs scipy")

    def step_stats(stats):
        raise RuntimeError("metrics server down")

    third_party("flaky", gradwatch_default_detectors=default_detectors,
                gradwatch_step_stats=step_stats)
    with pytest.warns(gradwatch.GradWatchInternalWarning) as record:
        mon = gradwatch.Monitor(context, on_finding="log")
        for st in healthy_then_sick():
            mon.check(st)
    messages = internal(record)
    assert len(messages) == 2, messages
    assert all("'flaky'" in m for m in messages)
    assert any("needs scipy" in m for m in messages)
    assert any("metrics server down" in m for m in messages)
    assert [type(d) for d in mon.detectors] == [type(d) for d in gradwatch.default_detectors()]
    assert key(mon.findings) == expected


# -- hostile strings --------------------------------------------------------------------------

HOSTILE_NAMES = [
    pytest.param("<img src=x onerror=alert(1)>", id="html"),
    pytest.param("`rm -rf ~` ```", id="backticks"),
    pytest.param("a|b||c", id="pipes"),
    pytest.param("two\nlines\r\n- [fake] finding", id="newlines"),
    pytest.param("\x1b[2J\x1b[31mred\x1b]0;title\x07", id="ansi-escapes"),
    pytest.param("[x](javascript:alert(1)) **b** <!-- _u_", id="markdown-syntax"),
    pytest.param("\u202egnp.exe\u200b\\", id="bidi-override"),
]


def hostile_context(name):
    return gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="test", depth=3),
        layers=(gradwatch.LayerInfo(name=name, type=name, num_params=10),
                gradwatch.LayerInfo(name="mid", type="Linear", num_params=10),
                gradwatch.LayerInfo(name="out", type="Linear", num_params=10)))


def hostile_run(name, **options):
    """A monitor over a run whose first layer (and the run) carry ``name``; the first layer
    starves, so findings name it."""
    mon = gradwatch.Monitor(hostile_context(name), name=name, **options)
    for s in range(1, 31):
        mon.check(gradwatch.make_step_stats(s, (name, "mid", "out"), [1e-9, 0.5, 0.5],
                                            loss=1.0 / s))
    return mon


def assert_inert_text(text):
    """One logical line per line: nothing a terminal would act on."""
    odd = sorted({c for c in text if not c.isprintable() and c != "\n"})
    assert not odd, odd


def assert_inert_markdown(text, layer_rows=None):
    assert_inert_text(text)
    assert "<" not in text.replace("&lt;", ""), "raw HTML"
    for line in text.splitlines():
        if line.startswith("Command: `"):  # results.md's own code span, the command inside it
            assert line.count("`") == 2, line
        else:
            assert not re.search(r"(?<!\\)`", line), f"a code span: {line}"
    assert not re.search(r"(?<!\\)\]\(javascript", text), "a link"
    tables: list[list[str]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("|"):
            if not previous.startswith("|"):
                tables.append([])
            tables[-1].append(line)
        previous = line
    for table in tables:
        cells = {len(re.split(r"(?<!\\)\|", row)) for row in table}
        assert len(cells) == 1, table  # no row has a cell more or less than the header
    if layer_rows is not None:
        layer_table = next(t for t in tables if t[0].startswith("| layer |"))
        assert len(layer_table) == 2 + layer_rows, layer_table


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_layer_name_is_inert_in_the_report_and_the_log(name, caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    with pytest.warns(gradwatch.VanishingGradientWarning) as record:
        mon = hostile_run(name)
    report = mon.end()
    assert any(f.layer == name for f in report.findings)  # the data keeps the real name
    text = str(report)
    assert_inert_text(text)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert lines[header + 2 + len(report.layers)] == ""  # header, rule, one line per layer
    assert len([line for line in lines if line.startswith("- [")]) == len(report.findings)
    for w in record:
        assert_inert_text(str(w.message))
        assert "\n" not in str(w.message)
    for r in caplog.records:
        if r.name == "gradwatch" and "summary" not in r.getMessage():
            assert_inert_text(r.getMessage())
            assert "\n" not in r.getMessage()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hostile_layer_name_is_inert_in_every_report_file(name, tmp_path, capsys):
    events = tmp_path / "run.jsonl"
    hostile_run(name, events=events, on_finding="log").end()

    assert _cli.main(["report", str(events), "--out", str(tmp_path / "report")]) == 0
    assert_inert_text(capsys.readouterr().out)
    assert_inert_markdown((tmp_path / "report" / "summary.md").read_text(), layer_rows=3)

    [run] = read_runs(events)
    assert run.layers[0] == name  # read back as it was written
    exp = ex.get("dying-relu")
    result = ex.RunResult(experiment=exp.name, framework="torch", settings="default",
                          findings=tuple(run.findings), final_loss=0.5, final_accuracy=0.5,
                          seconds=1.0, batches=run.steps, report=gradwatch.Report(
                              framework="torch", steps=run.steps, checks=1, layers=(),
                              findings=()), versions=name)
    rec = dataclasses.replace(
        RunRecord.of(exp, ex.DEFAULT, framework="torch", label=name, result=result, error=None,
                     run=run, events="events/run.jsonl"), plot=f"{name}.png")
    meta = {"command": f"gradwatch demo {name}", "versions": name, "machine": name,
            "wall_seconds": 1.0}
    assert_inert_markdown(results_markdown(meta, [rec], [exp]))
    assert_inert_text(format_table([rec]))


def test_the_event_file_itself_escapes_control_characters(tmp_path):
    events = tmp_path / "run.jsonl"
    name = "\x1b[31m\n<img>"
    hostile_run(name, events=events, on_finding="log").end()
    raw = events.read_bytes()
    assert b"\x1b" not in raw and raw.count(b"\n") == len(read_events(events).events)


PAYLOADS = [
    "__import__('os').system('touch PWNED')",
    "!!python/object/apply:os.system ['touch PWNED']",
    "${jndi:ldap://example.invalid/a}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
]


def test_event_file_content_is_data_never_code(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    events = tmp_path / "run.jsonl"
    gadget = {"$type": "System.Windows.Data.ObjectDataProvider, PresentationFramework",
              "py/object": "os.system", "__class__": "subprocess.Popen", "__reduce__": PAYLOADS}
    lines = [
        {"event": "start", "run": PAYLOADS[0], "framework": PAYLOADS[1], "check_every": 1,
         "layers": [{"name": p, "type": p} for p in PAYLOADS], "model": gadget},
        {"event": "stats", "step": 1, "steps": [1], "loss": [1.0], "has_loss": [True],
         "grad_norm": [1.0, 1.0, 1.0, 1.0], "has_grad": [True] * 4},
        {"event": "finding", "kind": PAYLOADS[2], "step": 1, "layer": PAYLOADS[0], "value": 1,
         "threshold": 2, "message": PAYLOADS[3], "advice": PAYLOADS, "evidence": gadget},
        {"event": PAYLOADS[0], "step": 1, "payload": gadget},  # an unknown event type
        {"event": "end", "step": 1, "summary": gadget},
    ]
    events.write_text("".join(json.dumps(e) + "\n" for e in lines))

    log = read_events(events)
    assert [{k: v for k, v in e.items() if k != "_line"} for e in log.events] == lines
    [run] = read_runs(events)
    assert run.name == PAYLOADS[0] and run.layers == tuple(PAYLOADS)
    [f] = run.findings
    assert (f.kind, f.layer, f.message, f.advice) == (PAYLOADS[2], PAYLOADS[0], PAYLOADS[3],
                                                      tuple(PAYLOADS))
    assert dict(f.evidence) == gadget and run.summary == gadget
    assert _cli.main(["report", str(events), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert_inert_markdown((tmp_path / "report" / "summary.md").read_text(), layer_rows=4)
    assert not list(tmp_path.glob("PWNED*"))


# -- long runs --------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def long_run_stats(step, layers):
    """Every statistic an adapter sends. Layer 'fc0' starves for the whole run (one condition
    that persists); 'fc2' spikes every 50 steps (one that flaps, within repeat_after); the loss
    is flat (a plateau that persists)."""
    n = len(layers)
    spike = 1e4 if step % 50 == 0 else 1.0
    return gradwatch.make_step_stats(
        step, layers, [1e-9, 0.5, spike, 1.0], loss=1.0 + 1e-3 * (step % 7), grad_size=[100] * n,
        grad_max=[0.1] * n, grad_nonfinite=[0] * n, grad_zero_fraction=[0.0] * n,
        weight_norm=[1.0] * n, weight_nonfinite=[0] * n, update_ratio=[1e-3] * n,
        weight_change=[0.01] * n,
        activations={"act": gradwatch.ActivationStats(kind="relu", dead_fraction=0.1, units=8)})


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_a_long_run_keeps_memory_and_the_log_bounded(tmp_path, capsys):
    layers = ("fc0", "fc1", "fc2", "out")
    ctx = gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="test", activations=frozenset({"relu"}), depth=4),
        layers=tuple(gradwatch.LayerInfo(name=n, type="Linear", num_params=100) for n in layers))
    seen = []
    events = tmp_path / "run.jsonl"
    mon = gradwatch.Monitor(ctx, on_finding=seen.append, check_every=1, events=events)
    total, mark = 20_000, 5_000
    for step in range(1, total + 1):
        mon.check(long_run_stats(step, layers))
        if step == mark:
            gc.collect()
            blocks, rss = sys.getallocatedblocks(), rss_bytes()
    gc.collect()
    grown_blocks, grown_rss = sys.getallocatedblocks() - blocks, rss_bytes() - rss
    with capsys.disabled():
        print(f"\nlong run (core Monitor, {total} checks): from check {mark} to {total} "
              f"allocated blocks {grown_blocks:+d}, RSS {grown_rss / 1024:+.0f} KiB")
    # Anything kept per check (a list of stats, of findings, even of ints) would be at least
    # one block per check: 15,000 blocks.
    assert grown_blocks < 1_500
    assert grown_rss < 512 * 1024
    # One finding per condition, however long it lasts or however often it flaps.
    assert sorted(key(seen)) == sorted(key(mon.findings))
    assert sorted((k, layer) for k, _, layer in key(mon.findings)) == [
        ("exploding_gradient", "fc2"), ("loss_plateau", None), ("vanishing_gradient", "fc0")]
    report = mon.end()
    assert report.checks == total and report.suppressed >= total // 50 - 20
    # The event file is one line per check plus the few findings/clears: no spam either.
    log = read_events(events)
    others = [e["event"] for e in log.events if e["event"] != "stats"]
    assert len(log.events) - len(others) == total
    assert len(others) < 10, others
