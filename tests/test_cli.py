"""The ``gradwatch`` command: ``experiments list``, ``report`` and ``demo``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_events import HOSTILE, write_run

from gradwatch import _cli
from gradwatch import _experiments as ex

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
    assert "dead_units" in r["kinds"] and r["passed"] and r["problems"] == []
    assert r["first_layer"] == "fc0" and r["last_layer"] == "out"
    assert set(r["weight_change_percent"]) == set(ex.layer_names(ex.get("dying-relu")))
    assert 0 <= r["final_accuracy"] <= 1 and r["final_loss"] > 0 and r["seconds"] > 0
    assert r["settings"]["lr"] == ex.get("dying-relu").lr
    assert is_png(out_dir / r["plot"]) and (out_dir / r["events"]).exists()
    md = (out_dir / "results.md").read_text()
    assert "| dying-relu | torch | dead\\_units |" in md and "**PASS**" in md
    assert "![dying-relu (torch)](dying-relu-torch.png)" in md


def test_demo_exits_non_zero_when_an_expectation_fails(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    wrong = ex.get("dying-relu").with_(name="dying-relu-wrong", expect=("exploding_gradient",),
                                       forbid=("dead_units",))
    monkeypatch.setattr(ex, "EXPERIMENTS", (wrong,))
    code = _cli.main(["demo", "--framework", "torch", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "expected exploding_gradient, not reported" in printed
    assert "dead_units reported, expected none" in printed
    assert "1 of 1 runs did NOT meet their expected verdict" in printed
    assert json.loads((tmp_path / "results.json").read_text())["passed"] is False


def test_demo_runs_the_installed_frameworks_and_says_which_it_skips(tmp_path, capsys,
                                                                     monkeypatch):
    pytest.importorskip("torch")
    real = _cli._unavailable
    monkeypatch.setattr(_cli, "_unavailable",
                        lambda fw: "Keras is not installed" if fw == "keras" else real(fw))
    assert _cli.main(["demo", "--only", "dying-relu", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "skipping keras: Keras is not installed" in captured.err
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["framework"] for r in runs] == ["torch"]
    monkeypatch.setattr(_cli, "_unavailable", lambda fw: f"{fw} missing")
    assert _cli.main(["demo", "--out", str(tmp_path)]) == 2
    assert "no framework" in capsys.readouterr().err


def test_a_crashing_run_is_a_failure_not_a_crash(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch")
    from gradwatch_torch import experiments as tx

    def boom(exp, events):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(tx, "run", boom)
    code = _cli.main(["demo", "--only", "dying-relu", "--framework", "torch",
                      "--out", str(tmp_path)])
    assert code == 1
    assert "crashed: RuntimeError: out of memory" in capsys.readouterr().out
