"""The ``gradwatch`` command: ``experiments list``, ``report`` and ``demo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_events import HOSTILE, write_run

import gradwatch
from gradwatch import _cli, hookimpl
from gradwatch import experiments as ex
from gradwatch.experiments import _table

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG


def test_experiments_list_shows_every_experiment_and_its_verdict():
    out = subprocess.run([sys.executable, "-m", "gradwatch._cli", "experiments", "list"],
                         capture_output=True, text=True, check=True).stdout
    for e in ex.EXPERIMENTS:
        assert e.name in out and e.title in out
    for group in ex.GROUPS:
        assert f"{group}:" in out
    assert "[expected: vanishing_gradient + loss_plateau]" in out
    assert "[expected: healthy]" in out


def test_report_renders_plots_and_a_summary_from_any_event_file(tmp_path, capsys):
    events = write_run(tmp_path / "my run.jsonl", layers=(HOSTILE, "mid", "out"))
    out_dir = tmp_path / "report"
    assert _cli.main(["report", str(events), "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "vanishing_gradient" in printed and "4 checks" in printed
    assert is_png(out_dir / "my_run.png")
    summary = (out_dir / "summary.md").read_text()
    assert "![gradient flow and loss](my_run.png)" in summary
    assert "vanishing\\_gradient" in summary and "use ReLU" in summary
    assert "<img" not in summary and "&lt;img src=x onerror=alert(1)&gt;" in summary


def test_the_report_plot_shows_the_runs_layers_loss_findings_and_weight_change(tmp_path,
                                                                                capsys):
    # The picture the docs describe, checked against the event file it is drawn from.
    import matplotlib.image
    import numpy as np

    from gradwatch._events import read_runs
    from gradwatch._plots import DPI, FIGSIZE, draw_run

    path = write_run(tmp_path / "run.jsonl", layers=("fc0", "fc1", "out"), name="three")
    assert _cli.main(["report", str(path), "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    image = matplotlib.image.imread(tmp_path / "r" / "run.png")  # a PNG that decodes
    assert image.shape == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI, 4) == (432, 1350, 4)
    assert image[..., :3].std() > 0.05  # not blank

    [run] = read_runs(path)
    fig = draw_run(run)
    grads, loss, change = fig.axes
    assert fig.get_suptitle() == "three (test)"
    # One line per layer, input side first, through its gradient norm at every check.
    assert [line.get_label() for line in grads.lines] == ["fc0", "fc1", "out"]
    assert [h.get_text() for h in grads.get_legend().get_texts()] == ["fc0", "fc1", "out"]
    for i, line in enumerate(grads.lines):
        assert line.get_xdata().tolist() == [10, 20, 30, 40]
        np.testing.assert_allclose(line.get_ydata(), run.grad_norm[:, i])
    assert grads.get_yscale() == "log"
    # The loss at every step it was logged, and the finding marked where it started.
    [curve, marker] = loss.lines
    assert curve.get_xdata().tolist() == run.loss_steps.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(curve.get_ydata(), [1, 1 / 2, 1 / 3, 1 / 4])
    assert marker.get_xdata()[0] == 20
    assert [t.get_text() for t in loss.texts] == [" vanishing fc0"]
    # A bar per layer, as long as its weight change in percent, labelled with its name.
    assert [t.get_text() for t in change.get_yticklabels()] == ["fc0", "fc1", "out"]
    widths = {round(p.get_y() + p.get_height() / 2): p.get_width() for p in change.patches}
    assert [widths[y] for y in (2, 1, 0)] == pytest.approx([1e-6, 4.0, 10.0])  # 0 % at the floor
    assert [t.get_text() for t in change.texts] == ["0%", "4%", "10%"]


def test_report_plots_each_run_of_an_appended_file(tmp_path, capsys):
    events = tmp_path / "runs.jsonl"
    write_run(events, name="a")
    write_run(events, name="b")
    assert _cli.main(["report", str(events), "--out", str(tmp_path / "r")]) == 0
    assert is_png(tmp_path / "r" / "runs-1.png") and is_png(tmp_path / "r" / "runs-2.png")


def test_report_tolerates_a_crashed_run(tmp_path, capsys):
    events = write_run(tmp_path / "crash.jsonl")
    text = events.read_text().splitlines()
    events.write_text("\n".join(text[:-1]) + "\n" + text[-1][:20])
    assert _cli.main(["report", str(events), "--out", str(tmp_path / "r")]) == 0
    assert "did not end cleanly" in capsys.readouterr().out
    assert "truncated" in (tmp_path / "r" / "summary.md").read_text()


def test_report_names_the_file_and_line_of_a_malformed_line(tmp_path, capsys):
    events = write_run(tmp_path / "bad.jsonl")
    lines = events.read_text().splitlines()
    lines[1] = lines[1][:30]
    events.write_text("\n".join(lines) + "\n")
    assert _cli.main(["report", str(events), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert f"{events}, line 2:" in err
    assert _cli.main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_demo_rejects_an_unknown_experiment(capsys, tmp_path):
    assert _cli.main(["demo", "--only", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "deep-sigmoid" in err


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"gradwatch {gradwatch.__version__}"


def test_the_installed_command_prints_the_installed_version():
    # What a user types, through the console script pip wrote: the version it prints is the
    # package's and the one pip recorded (a stale egg-info or a second copy would differ).
    from importlib.metadata import version

    script = os.path.join(os.path.dirname(sys.executable), "gradwatch")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"gradwatch {gradwatch.__version__}\n"
    assert version("gradwatch") == gradwatch.__version__


def test_demo_runs_one_experiment_and_writes_results(tmp_path, capsys):
    pytest.importorskip("torch")
    out_dir = tmp_path / "demo"
    code = _cli.main(["demo", "--only", "dying-relu", "--framework", "torch",
                      "--out", str(out_dir)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[ 1/1] dying-relu" in printed and "PASS" in printed
    assert "All 1 runs met their expected verdict." in printed
    results = json.loads((out_dir / "results.json").read_text())
    assert results["passed"] is True
    [r] = results["runs"]
    assert r["experiment"] == "dying-relu" and r["framework"] == "torch"
    # The demo watches with what users get.
    assert r["settings"] == "default" and r["watch_options"] == {}
    assert "dead_units" in r["kinds"] and r["passed"] and r["problems"] == []
    assert r["first_layer"] == "fc0" and r["last_layer"] == "out"
    assert set(r["weight_change_percent"]) == set(ex.layer_names(ex.get("dying-relu")))
    assert 0 <= r["final_accuracy"] <= 1 and r["final_loss"] > 0 and r["seconds"] > 0
    assert r["steps_seen"] == r["batches"] == r["steps"] == ex.get("dying-relu").steps
    assert r["versions"].startswith("torch ") and r["error"] is None
    assert {f["severity"] for f in r["findings"]} <= {"warning", "info"}
    assert r["spec"]["lr"] == ex.get("dying-relu").lr
    assert is_png(out_dir / r["plot"]) and (out_dir / r["events"]).exists()
    md = (out_dir / "results.md").read_text()
    assert "| dying-relu | torch | default | dead\\_units |" in md and "**PASS**" in md
    assert "![dying-relu (torch, default)](dying-relu-torch-default.png)" in md


def test_experiments_run_can_watch_with_both_settings(tmp_path, capsys):
    pytest.importorskip("torch")
    code = _cli.main(["experiments", "run", "dying-relu", "--framework", "torch",
                      "--settings", "all", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "[ 2/2] dying-relu               torch       exact" in printed
    assert "- [dead_units]" in printed  # `experiments run` prints each run's report
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["settings"], r["watch_options"]) for r in runs] == [
        ("default", {}), ("exact", {"update_ratio": "exact"})]
    assert all(r["passed"] for r in runs)
    assert [r["events"] for r in runs] == ["events/dying-relu-torch-default.jsonl",
                                           "events/dying-relu-torch-exact.jsonl"]


def test_experiments_run_takes_a_group_and_prints_each_report(tmp_path, capsys):
    pytest.importorskip("torch")
    # A group name runs its experiments in table order (the two fastest torch runs).
    group = ["dying-relu", "dying-relu-leaky-0.3"]
    assert [e.name for e in ex.select(["dying"])] == group
    code = _cli.main(["experiments", "run", "dying", "--framework", "torch",
                      "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.count("findings:") == len(group)  # one report per run, unasked (-v is on)
    for i, name in enumerate(group, 1):
        assert f"[{i:>2}/{len(group)}] {name:<24} torch       default ... PASS" in printed
    assert printed.rstrip().endswith(f"All {len(group)} runs met their expected verdict.")
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["experiment"] for r in runs] == group


@pytest.mark.parametrize("argv, message", [
    pytest.param(["experiments", "run"], "the following arguments are required: NAME",
                 id="no-name"),
    pytest.param(["experiments", "run", "deep-sigmoid", "--settings", "fast"],
                 "invalid choice: 'fast'", id="unknown-settings"),
])
def test_experiments_run_usage_errors_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_experiments_run_of_an_unknown_name_exits_2_naming_the_known_ones(tmp_path, capsys):
    assert _cli.main(["experiments", "run", "deep-sigmod", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'deep-sigmod'" in err and "deep-sigmoid" in err
    assert not (tmp_path / "results.json").exists()


def test_demo_runs_keras(tmp_path, capsys):
    # `gradwatch demo --framework keras` runs all 15 experiments: 116 s on TensorFlow on a
    # shared 2-core machine, too long for the suite. One experiment takes the same path.
    pytest.importorskip("keras")
    code = _cli.main(["demo", "--only", "dying-relu-leaky-0.3", "--framework", "keras",
                      "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    [r] = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert r["framework"] == "keras" and r["passed"] and r["backend"] in ("tensorflow", "torch")
    assert r["label"] == ("keras/tf" if r["backend"] == "tensorflow" else f"keras/{r['backend']}")
    assert r["steps_seen"] == r["batches"] == r["steps"]  # no step lost to async dispatch
    assert r["versions"].startswith("keras ")
    # What the user reads: the framework loaded, one progress line, the table row, the verdict.
    lines = printed.splitlines()
    assert lines[0].startswith("gradwatch reference experiments: 1 experiment(s) x 1 "
                               "framework(s) (keras) x 1 settings (default)")
    assert "loading keras ..." in lines and "loading torch ..." not in lines
    assert f"[ 1/1] dying-relu-leaky-0.3     {r['label']:<11} default ... PASS" in printed
    [row] = [line for line in lines if line.startswith("dying-relu-leaky-0.3 ")]
    assert row.split()[1:5] == [r["label"], "default", "healthy", "none"]
    assert row.split()[-1] == "PASS" and "findings:" not in printed  # the demo is not -v
    assert lines[-1] == "All 1 runs met their expected verdict."
    assert is_png(tmp_path / r["plot"])


def test_an_unknown_framework_is_named_with_the_available_ones(tmp_path, capsys):
    assert _cli.main(["demo", "--framework", "mxnet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no experiment runner for framework 'mxnet'" in err
    assert "available: " + ", ".join(ex.experiment_runners()) in err
    assert not (tmp_path / "results.json").exists()


class FakeRunner(ex.ExperimentRunner):
    """A plugin's runner for a framework that is not installed here."""

    framework = "fakefw"

    def unavailable(self) -> str | None:
        return "fakefw is not installed (pip install fakefw)"

    def versions(self) -> str:
        raise AssertionError("an unavailable runner is never asked to load its framework")

    def run(self, exp, events, settings=ex.DEFAULT):
        raise AssertionError("an unavailable runner never runs")


class FakePlugin:
    @hookimpl
    def gradwatch_experiment_runners(self):
        return [FakeRunner()]


@pytest.fixture
def fake_plugin():
    pm = gradwatch.get_plugin_manager()
    plugin = FakePlugin()
    pm.register(plugin, name="fakefw")
    yield
    pm.unregister(plugin)


def test_plugins_say_which_frameworks_exist(fake_plugin):
    runners = ex.experiment_runners()
    assert list(runners)[-1] == "fakefw" and {"torch", "keras"} <= set(runners)
    assert isinstance(runners["fakefw"], FakeRunner)


def test_an_unavailable_runner_says_why_once(fake_plugin, tmp_path, capsys):
    assert _cli.main(["demo", "--framework", "fakefw", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("skipping fakefw: fakefw is not installed (pip install fakefw)") == 1
    assert "no framework" in err
    # With --framework all, the other frameworks still run.
    pytest.importorskip("torch")
    code = _cli.main(["demo", "--only", "dying-relu", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.out
    assert captured.err.count("skipping fakefw: fakefw is not installed") == 1
    assert "fakefw" not in {r["framework"] for r in
                            json.loads((tmp_path / "results.json").read_text())["runs"]}


@pytest.mark.parametrize("backend, why", [
    pytest.param("openvino", "the Keras callback does not support Keras' 'openvino' backend yet",
                 id="openvino"),
    pytest.param("gw_no_such_backend",
                 "the Keras callback does not support Keras' 'gw_no_such_backend' backend yet",
                 id="unknown"),
])
def test_the_keras_runner_says_which_backend_it_cannot_run(backend, why, tmp_path):
    # Read from Keras' configuration without importing Keras (a fresh process).
    env = {**os.environ, "KERAS_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-m", "gradwatch._cli", "demo", "--framework", "keras",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("skipping keras: " + why) == 1, proc.stderr
    assert "no framework" in proc.stderr


def test_a_framework_that_fails_to_load_is_skipped(tmp_path, capsys, monkeypatch):
    runners = ex.experiment_runners()
    for runner in runners.values():
        monkeypatch.setattr(type(runner), "unavailable", lambda self: None)
        monkeypatch.setattr(type(runner), "versions",
                            lambda self: (_ for _ in ()).throw(ImportError("libcuda.so")))
    assert _cli.main(["demo", "--only", "dying-relu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "skipping torch: it failed to load (ImportError: libcuda.so)" in err
    assert "no framework could be loaded" in err


def test_a_broken_runner_plugin_is_reported_and_skipped():
    class Broken:
        @hookimpl
        def gradwatch_experiment_runners(self):
            return ["not a runner"]

    pm = gradwatch.get_plugin_manager()
    plugin = Broken()
    pm.register(plugin, name="broken")
    try:
        with pytest.warns(gradwatch.GradWatchInternalWarning, match="'broken'.*not a gradwatch"):
            runners = ex.experiment_runners()
    finally:
        pm.unregister(plugin)
    assert {"torch", "keras"} <= set(runners)


def test_demo_exits_non_zero_when_an_expectation_fails(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    wrong = ex.get("dying-relu").with_(name="dying-relu-wrong", expect=("exploding_gradient",),
                                       forbid=("dead_units",))
    monkeypatch.setattr(_table, "EXPERIMENTS", (wrong,))
    code = _cli.main(["demo", "--framework", "torch", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "expected exploding_gradient, not reported" in printed
    assert "dead_units reported, expected none" in printed
    assert "1 of 1 runs did NOT meet their expected verdict" in printed
    assert json.loads((tmp_path / "results.json").read_text())["passed"] is False


def test_demo_runs_the_frameworks_that_can_run_and_says_which_it_skips(tmp_path, capsys,
                                                                        monkeypatch):
    pytest.importorskip("torch")
    runners = ex.experiment_runners()
    monkeypatch.setattr(type(runners["keras"]), "unavailable",
                        lambda self: "Keras is not installed")
    monkeypatch.setattr(type(runners["jax"]), "unavailable", lambda self: "jax is not installed")
    assert _cli.main(["demo", "--only", "dying-relu", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "skipping keras: Keras is not installed" in captured.err
    assert "skipping jax: jax is not installed" in captured.err
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["framework"] for r in runs] == ["torch"]
    monkeypatch.setattr(type(runners["torch"]), "unavailable", lambda self: "torch missing")
    assert _cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "no framework" in capsys.readouterr().err


def test_a_crashing_run_is_a_failure_not_a_crash(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from gradwatch_torch import experiments as tx

    def boom(exp, events, settings):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tx, "run", boom)
    code = _cli.main(["demo", "--only", "dying-relu", "--framework", "torch",
                      "--out", str(tmp_path)])
    assert code == 1
    assert "crashed: RuntimeError: out of memory" in capsys.readouterr().out
    [r] = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert r["error"] == "RuntimeError: out of memory" and r["plot"] is None
