"""Reliability in a real PyTorch training loop (issue 6): gradwatch's own failures, NaN in one
layer, a training process interrupted or killed mid-run, and a long run's memory.

The core side of the same guarantees is tests/test_reliability.py; the map from guarantee to
test is docs/reliability.md.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import test_reliability
import torch
from conftest import mlp
from test_reliability import BreaksAt, DashboardSink, Recorder, internal, key, rss_bytes
from torch import nn

import gradwatch
from gradwatch import _cli
from gradwatch._events import read_events, read_runs

#: The event file's disk failing mid-run (a fixture shared with the core tests).
failing_disk = test_reliability.failing_disk


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: threads only add contention on a shared CI machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(model, opt, watcher, steps, *, before_forward=None, seed=0):
    """The user's loop: gradwatch only sees it through its hooks and observe_loss."""
    g = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        if before_forward is not None:
            before_forward(step)
        x = torch.randn(32, 2, generator=g)
        y = (x[:, :1] * x[:, 1:] > 0).float()
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        watcher.observe_loss(loss)
        opt.step()
    return step


def nan_grad_at(module, step):
    """The gradient of ``module.weight`` turns NaN at backward ``step`` (one step only)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] == step else grad

    return module.weight.register_hook(hook)


# -- gradwatch's own failures in a training loop ----------------------------------------------


def sick_model():
    """A deep sigmoid net at a tiny learning rate: vanishing gradients and stalled updates early,
    a loss plateau later; its gradient turns NaN at step 260. Findings from start to end."""
    torch.manual_seed(0)
    model = mlp(6, act=nn.Sigmoid)
    nan_grad_at(model[4], 260)
    return model, torch.optim.SGD(model.parameters(), lr=1e-6)


STEPS = 300


def test_failures_inside_gradwatch_do_not_touch_training_or_the_other_sinks(failing_disk,
                                                                           tmp_path):
    model, opt = sick_model()
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, on_finding="log") as ref:
        train(model, opt, ref, STEPS)
    expected = key(ref.findings)
    assert len({s for _, s, _ in expected}) >= 3 and expected[-1][1] == 260, expected

    model, opt = sick_model()
    failing_disk(after=10, short=True)  # the disk fills up mid-line at the 11th event
    path = tmp_path / "run.jsonl"
    seen, other = [], Recorder()
    with pytest.warns(gradwatch.GradWatchInternalWarning) as record:
        w = gradwatch.torch.watch(
            model, optimizer=opt, check_every=1, events=path, on_finding=seen.append,
            detectors=[*gradwatch.default_detectors(), BreaksAt(40)],
            plugins=[DashboardSink(), other])
        last = train(model, opt, w, STEPS)
        report = w.remove()

    messages = internal(record)
    assert len(messages) == 3, messages
    assert sum("BreaksAt" in m for m in messages) == 1
    assert sum("DashboardSink" in m and "dashboard unreachable" in m for m in messages) == 1
    assert sum("'events'" in m and "No space left on device" in m for m in messages) == 1
    assert last == STEPS and w.step == STEPS and report.checks == STEPS
    assert key(w.findings) == key(seen) == key(other.findings) == expected
    log = read_events(path)
    assert log.truncated and len(log.events) == 10


def test_an_event_file_closed_mid_run_is_reported_once_and_training_goes_on(tmp_path):
    model, opt = sick_model()
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, on_finding="log") as ref:
        train(model, opt, ref, STEPS)

    model, opt = sick_model()
    seen = []
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=1, on_finding=seen.append,
                              events=tmp_path / "run.jsonl")

    def close_the_file(step):
        if step == 50:
            w.monitor.pm.get_plugin("events")._file.close()

    with pytest.warns(gradwatch.GradWatchInternalWarning, match="'events'.*closed file") as rec:
        train(model, opt, w, STEPS, before_forward=close_the_file)
        w.remove()
    assert len(internal(rec)) == 1
    assert w.step == STEPS and key(seen) == key(w.findings) == key(ref.findings)
    [run] = read_runs(tmp_path / "run.jsonl")
    assert run.check_steps.tolist() == list(range(1, 50))


# -- NaN in one layer -------------------------------------------------------------------------


def _nan_gradient(model, k):
    nan_grad_at(model[2], k)
    return None


def _nan_weight(model, k):
    def set_nan(step):
        if step == k:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")

    return set_nan


@pytest.mark.parametrize("inject, layers", [
    pytest.param(_nan_gradient, ("2",), id="gradient"),
    # Every gradient is NaN in the step a weight turns NaN (the forward carries it everywhere):
    # no layer can be told apart, and naming one that did not cause it would mislead.
    pytest.param(_nan_weight, ("2", None), id="weight"),
])
@pytest.mark.parametrize("check_every", [1, 10])
@pytest.mark.parametrize("k", [1, 7, 13])
def test_nan_in_one_layer_is_reported_at_its_step_and_training_goes_on(inject, layers,
                                                                       check_every, k):
    torch.manual_seed(0)
    model = mlp(3)  # layers "0", "2", "4", "6"
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = inject(model, k)
    with gradwatch.torch.watch(model, optimizer=opt, check_every=check_every,
                               on_finding="log") as w:
        last = train(model, opt, w, 30, before_forward=before)
    assert last == 30 and w.step == 30  # the user's loop ran to its end
    nonfinite = [f for f in w.findings if f.kind == "nonfinite"]
    assert len(nonfinite) == 1  # NaN for the rest of the run is one condition
    [f] = nonfinite
    assert f.step == k and f.layer in layers, (f.step, f.layer, f.message)
    # Everything NaN makes worse afterwards is its consequence, not news.
    assert [g for g in w.findings if g.step >= k] == [f]


@pytest.mark.parametrize("inject, layers", [
    pytest.param(_nan_gradient, ("2",), id="gradient"),
    pytest.param(_nan_weight, ("2", None), id="weight"),
])
@pytest.mark.parametrize("check_every", [1, 10])
@pytest.mark.parametrize("k", [1, 7, 13])
def test_strict_mode_stops_training_at_the_first_check_after_nan(inject, layers, check_every,
                                                                 k):
    torch.manual_seed(0)
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = inject(model, k)
    w = gradwatch.torch.watch(model, optimizer=opt, check_every=check_every, on_finding="raise")
    with pytest.raises(gradwatch.GradientHealthError) as err:
        train(model, opt, w, 30, before_forward=before)
    w.remove()
    f = err.value.finding
    assert f.kind == "nonfinite" and f.step == k and f.layer in layers
    check = -(-k // check_every) * check_every  # the first check step at or after k
    assert w.step == check


# -- a training process interrupted or killed -------------------------------------------------

CHILD = textwrap.dedent("""
    import itertools, os, signal, sys, time, warnings
    import torch
    from torch import nn
    import gradwatch

    path, how = sys.argv[1], sys.argv[2]
    # As when started from a terminal: Ctrl-C raises KeyboardInterrupt. (pytest-xdist workers
    # ignore SIGINT, and a child inherits an ignored SIGINT, so Python would not install this.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layers = [m for _ in range(4) for m in (nn.Linear(8, 8), nn.Sigmoid())]
    model = nn.Sequential(*layers, nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)  # stalled updates: findings early
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    warnings.simplefilter("ignore")

    AT = 150  # the step that is interrupted (or killed)
    sig, _, where = how.partition("@")  # "SIGINT@backward": Ctrl-C inside loss.backward()
    now = {"step": 0}

    def arrives(place):
        # The signal arrives at a fixed point of step AT, not wherever a timer would land it:
        # raise_signal runs Python's SIGINT handler before it returns (the KeyboardInterrupt of
        # a Ctrl-C is raised right here); SIGKILL ends the process inside os.kill. Once.
        if where == place and now["step"] == AT:
            now["step"] = None
            if sig == "SIGKILL":
                os.kill(os.getpid(), signal.SIGKILL)
            signal.raise_signal(signal.SIGINT)

    # Inside the backward pass: after gradwatch's end-of-backward callback was queued, before
    # it ran (the first layer's gradient is accumulated last).
    model[0].weight.register_post_accumulate_grad_hook(lambda p: arrives("backward"))

    class Dashboard:
        # A third-party sink: gradwatch calls it inside its check, in the optimizer's
        # post-step hook (before the built-in sinks: pluggy calls the last registered first).
        @gradwatch.hookimpl
        def gradwatch_step_stats(self, stats):
            arrives("sink")

    class EventFile:
        # The event file under gradwatch's JSONL sink: the signal lands inside its write.
        def __init__(self, file):
            self.file = file

        def write(self, text):
            if where == "mid-line" and now["step"] == AT:  # AT's first line: its stats
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                arrives("mid-line")  # killed with half a line on disk
            n = self.file.write(text)
            arrives("before-flush")  # the whole line written, not yet flushed
            return n

        def flush(self):
            self.file.flush()

        def close(self):
            self.file.close()

    def train(w):
        deadline = time.monotonic() + 120
        for step in itertools.count(1):
            now["step"] = step
            if how.startswith("raise") and step == AT:
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                sys.exit(3)  # nobody stopped us
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            w.observe_loss(loss)
            opt.step()

    w = gradwatch.torch.watch(model, optimizer=opt, events=path, check_every=1,
                              on_finding="log", name=how, plugins=[Dashboard()])
    sink = w.monitor.pm.get_plugin("events")
    sink._file = EventFile(sink._file)  # opened by watch(): the run's start event is written
    if how == "raise-without-with":
        train(w)
    else:
        with w:
            train(w)
""")


def start_child(tmp_path, how):
    script = tmp_path / "train.py"
    script.write_text(CHILD)
    path = tmp_path / "run.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(path), how],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, path


def complete_lines_are_json(path):
    """Every line that was completely written is strict JSON; returns the parsed events."""
    def reject(name):
        raise AssertionError(f"bare {name}")

    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1].splitlines()
    return [json.loads(line, parse_constant=reject) for line in complete]


def reads_back(path, tmp_path, capsys):
    """The reader and `gradwatch report` both read the file; returns its one run."""
    [run] = read_runs(path)
    assert _cli.main(["report", str(path), "--out", str(tmp_path / "report")]) == 0
    capsys.readouterr()
    assert (tmp_path / "report" / "summary.md").exists()
    assert run.check_steps.size >= 100 and "stalled_update" in run.kinds
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how, ends", [
    pytest.param("raise", True, id="keyboard-interrupt-in-with"),
    pytest.param("raise-without-with", False, id="keyboard-interrupt-without-with"),
])
def test_keyboard_interrupt_leaves_a_complete_event_file(tmp_path, capsys, how, ends):
    proc, path = start_child(tmp_path, how)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
    events = complete_lines_are_json(path)
    assert path.read_bytes().endswith(b"\n")  # nothing half-written
    assert [e["step"] for e in events if e["event"] == "stats"] == list(range(1, 150))
    run = reads_back(path, tmp_path, capsys)
    assert run.ended is ends and not run.truncated
    if ends:  # the with block's exit wrote the summary
        assert events[-1]["event"] == "end" and events[-1]["step"] == 149


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how, stats, steps", [
    # Ctrl-C (SIGINT -> KeyboardInterrupt) inside `with watch(...)`, at step 150, wherever it
    # lands: the file holds every step that was written and ends with the run's end event,
    # whose step is the optimizer steps that ran.
    pytest.param("SIGINT@backward", 149, 149, id="SIGINT-in-backward"),
    # Step 150 was taken; its check was interrupted before the event file's sink ran.
    pytest.param("SIGINT@sink", 149, 150, id="SIGINT-in-a-sink"),
    # The stats line of step 150 was written but not flushed: the end event flushes it.
    pytest.param("SIGINT@before-flush", 150, 150, id="SIGINT-before-flush"),
    # Killed with half of step 150's line on disk: no end event, the torn line is dropped.
    pytest.param("SIGKILL@mid-line", 149, None, id="SIGKILL-mid-line"),
])
def test_a_signal_mid_run_leaves_a_readable_event_file(tmp_path, capsys, how, stats, steps):
    proc, path = start_child(tmp_path, how)
    try:
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    sig = signal.SIGKILL if how.startswith("SIGKILL") else signal.SIGINT
    # Died of the signal (an uncaught KeyboardInterrupt exits through SIGINT), at that point.
    assert proc.returncode == -sig, (proc.returncode, err[-2000:])
    if sig == signal.SIGINT:
        assert err.rstrip().endswith("KeyboardInterrupt") and "in arrives" in err, err[-2000:]
    events = complete_lines_are_json(path)
    assert [e["step"] for e in events if e["event"] == "stats"] == list(range(1, stats + 1))
    assert [e["event"] for e in events].count("start") == 1
    run = reads_back(path, tmp_path, capsys)
    assert run.check_steps.tolist() == list(range(1, stats + 1))
    if sig == signal.SIGKILL:
        assert not run.ended and run.truncated and not path.read_bytes().endswith(b"\n")
    else:
        # The with block's exit ended the run: nothing half-written, the end event last,
        # with a summary that agrees with the file and no failure of gradwatch's own.
        assert path.read_bytes().endswith(b"\n") and not run.truncated
        assert run.ended and events[-1]["event"] == "end" and events[-1]["step"] == steps
        assert [e["event"] for e in events].count("end") == 1
        assert run.summary["steps"] == run.summary["checks"] == run.steps == steps
        assert run.summary["findings"] == dict(Counter(f.kind for f in run.findings))
        assert run.summary["internal_errors"] == []
    # The user restarts training with the same events= path: both runs read back.
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradwatch.torch.watch(model, optimizer=opt, events=path, check_every=1,
                               on_finding="log", name="restart") as w:
        train(model, opt, w, 5)
    first, second = read_runs(path)
    assert first.name == how and first.check_steps.tolist() == list(range(1, stats + 1))
    assert first.ended is (sig == signal.SIGINT) and first.truncated is (sig == signal.SIGKILL)
    assert second.name == "restart" and second.ended and not second.truncated
    assert second.check_steps.tolist() == [1, 2, 3, 4, 5]


# -- a long run -------------------------------------------------------------------------------


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): some objects warn when their __class__ is read.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def retained_rss() -> int:
    """RSS less the free memory glibc's malloc keeps mapped for reuse: what the process holds.
    (Counting live objects builds a list of every object, a few MB; where malloc puts the next
    one, and whether it then keeps those pages, is chance, not a leak.)"""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is
        pass
    return rss_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc")
def test_a_long_training_run_keeps_memory_and_the_log_bounded(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)  # stalled updates, a flat loss
    total, mark = 3_000, 1_000
    marks = {}

    def measure(step):
        if step in (mark, total):
            tensors = live_tensors()
            marks[step] = (sys.getallocatedblocks(), retained_rss(), tensors)

    events = tmp_path / "run.jsonl"
    with gradwatch.torch.watch(model, optimizer=opt, check_every=1, on_finding="log",
                               events=events) as w:
        train(model, opt, w, total, before_forward=measure)
    blocks = marks[total][0] - marks[mark][0]
    rss = marks[total][1] - marks[mark][1]
    tensors = marks[total][2] - marks[mark][2]
    with capsys.disabled():
        print(f"\nlong run (torch, {total} steps, check_every=1): from step {mark} to {total} "
              f"allocated blocks {blocks:+d}, RSS {rss / 1024:+.0f} KiB, live tensors "
              f"{tensors:+d}")
    assert tensors == 0  # no tensor kept per step (history, snapshots, losses)
    assert blocks < (total - mark) // 2  # anything kept per step would be >= 1 block a step
    assert rss < 1024 * 1024
    # One finding per condition however long it lasts: no spam in the log or the file.
    found = [(f.kind, f.layer) for f in w.findings]
    assert len(found) == len(set(found)) and {"stalled_update", "loss_plateau"} <= set(
        k for k, _ in found), found
    log = read_events(events)
    assert sum(e["event"] == "stats" for e in log.events) == total
    assert sum(e["event"] != "stats" for e in log.events) < 10
