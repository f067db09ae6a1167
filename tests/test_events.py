"""Reading JSONL event files back: strict about corruption, tolerant of a crashed run's last line,
and inert about what the file says (no evaluation, escaped output)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gradwatch
from gradwatch._events import (
    EventFileError,
    first_last_ratio,
    read_events,
    read_runs,
    weight_change_percent,
)
from gradwatch._plots import DPI, FIGSIZE, draw_run, plot_run
from gradwatch._results import md, plain, run_summary_markdown, run_summary_text, window_line

HOSTILE = "<img src=x onerror=alert(1)>"


def write_run(path, layers=("0", "1", "2"), checks=4, name="demo", nan_at=None, finding_at=2):
    """A real event file, written by gradwatch's own JSONL sink through a Monitor."""
    ctx = gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="test", depth=len(layers)),
        layers=tuple(gradwatch.LayerInfo(name=n, type="Linear", num_params=10) for n in layers))
    f = gradwatch.Finding(kind="vanishing_gradient", step=10 * finding_at, layer=layers[0],
                          value=1e-9, threshold=1e-4, message=f"layer {layers[0]!r} starves",
                          advice=("use ReLU",))

    class Once(gradwatch.Detector):
        kinds = ("vanishing_gradient",)

        def update(self, stats):
            return [f] if stats.step >= f.step else []

    mon = gradwatch.Monitor(ctx, detectors=[Once()], events=path, on_finding="log", name=name)
    mon.start()
    for c in range(1, checks + 1):
        loss = math.nan if c == nan_at else 1.0 / c
        grads = [10.0 ** -(len(layers) - i + c) for i in range(len(layers))]
        mon.check(gradwatch.make_step_stats(
            10 * c, list(layers), grads, loss=loss, has_loss=True,
            weight_change=[0.0, 0.01 * c] + [0.1] * (len(layers) - 2),
            update_ratio=[1e-3] * len(layers)))
    mon.end()
    return path


def test_a_written_run_reads_back_as_arrays(tmp_path):
    path = write_run(tmp_path / "run.jsonl")
    log = read_events(path)
    assert [e["event"] for e in log.events] == ["start"] + ["stats"] * 2 + ["finding"] + \
        ["window"] + ["stats"] * 2 + ["end"]
    assert not log.truncated
    [run] = read_runs(path)
    assert run.name == "demo" and run.framework == "test" and run.ended
    assert run.layers == ("0", "1", "2") and run.layer_types == ("Linear",) * 3
    assert run.check_steps.tolist() == [10, 20, 30, 40]
    assert run.grad_norm.shape == (4, 3)
    assert run.grad_norm[0].tolist() == pytest.approx([1e-4, 1e-3, 1e-2])
    assert run.loss.tolist() == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert [(f.kind, f.step, f.layer) for f in run.findings] == [("vanishing_gradient", 20, "0")]
    assert run.findings[0].advice == ("use ReLU",)
    assert run.steps == 40
    # first/last layer: 1e-4 / 1e-2 at every check.
    assert first_last_ratio(run) == pytest.approx(1e-2)
    assert weight_change_percent(run) == pytest.approx({"0": 0.0, "1": 4.0, "2": 10.0})


def test_nan_and_infinity_strings_become_floats_again(tmp_path):
    path = write_run(tmp_path / "run.jsonl", nan_at=3)
    text = path.read_text()
    assert '"NaN"' in text and "NaN," not in text.replace('"NaN",', "")  # strict JSON on disk
    [run] = read_runs(path)
    assert math.isnan(run.loss[2]) and run.loss_steps.tolist() == [10, 20, 30, 40]
    lines = text.splitlines()
    stats = json.loads(lines[1])
    stats["grad_norm"] = ["Infinity", "-Infinity", "NaN"]
    lines[1] = json.dumps(stats)
    path.write_text("\n".join(lines) + "\n")
    [run] = read_runs(path)
    g = run.grad_norm[0]
    assert g[0] == math.inf and g[1] == -math.inf and math.isnan(g[2])


def test_a_layer_called_nan_keeps_its_name(tmp_path):
    path = write_run(tmp_path / "run.jsonl", layers=("NaN", "Infinity", "out"))
    [run] = read_runs(path)
    assert run.layers == ("NaN", "Infinity", "out")
    assert run.findings[0].layer == "NaN"


@pytest.mark.parametrize("tail", [
    pytest.param('{"event": "stats", "step": 50, "grad_no', id="cut-mid-object"),
    pytest.param('{"event": "st', id="cut-mid-string"),
    pytest.param('{"event": "stats", "step": 50, "grad_norm": [1.0, 2.0, 3.0]\n', id="no-brace"),
    pytest.param(b'{"event": "finding", "message": "\xc3', id="cut-mid-utf8"),
])
def test_a_truncated_last_line_is_tolerated(tmp_path, tail):
    path = write_run(tmp_path / "run.jsonl")
    with open(path, "ab") as fh:
        fh.write(tail if isinstance(tail, bytes) else tail.encode())
    log = read_events(path)
    assert log.truncated
    assert len(log.events) == 8  # every complete line
    [run] = read_runs(path)
    assert run.truncated and run.check_steps.tolist() == [10, 20, 30, 40]


def test_a_crashed_run_without_end_event_still_reads(tmp_path):
    path = write_run(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:15])  # end event cut off
    [run] = read_runs(path)
    assert run.truncated and not run.ended and run.steps == 40
    assert "did not end cleanly" in run_summary_text(run)


@pytest.mark.parametrize("bad, problem", [
    pytest.param('{"event": "stats", "step": 50,', "Expecting", id="broken-json"),
    pytest.param("[1, 2, 3]", "expected a JSON object", id="not-an-object"),
    pytest.param('{"step": 50}', 'no "event" name', id="no-event-name"),
    pytest.param('{"event": "stats", "step": 5, "steps": [5], "loss": ["lots"], '
                 '"grad_norm": [1, 2, 3]}', "field 'loss'", id="not-a-number"),
    pytest.param('{"event": "stats", "step": 5, "grad_norm": [1, 2]}', "one per layer",
                 id="wrong-layer-count"),
    pytest.param('{"event": "stats", "step": "five", "grad_norm": [1, 2, 3]}', "field 'step'",
                 id="step-not-int"),
    pytest.param('{"event": "finding", "kind": "vanishing_gradient", "step": -1}',
                 "step must be an int >= 0", id="bad-finding"),
])
def test_a_malformed_line_before_the_last_names_the_file_and_line(tmp_path, bad, problem):
    path = write_run(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    lines.insert(2, bad)  # becomes line 3
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventFileError, match=problem) as excinfo:
        read_runs(path)
    assert isinstance(excinfo.value, ValueError)
    assert str(excinfo.value).startswith(f"{path}, line 3: ")
    assert excinfo.value.line == 3 and excinfo.value.path == str(path)


def test_content_is_parsed_never_evaluated(tmp_path):
    path = write_run(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    lines.insert(2, "__import__('os').system('touch pwned')")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(EventFileError, match="line 3"):
        read_events(path)
    assert not (tmp_path / "pwned").exists()


def test_blank_lines_are_skipped(tmp_path):
    path = write_run(tmp_path / "run.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["", "   "] + lines[3:]) + "\n\n")
    assert len(read_events(path).events) == 8 and not read_events(path).truncated


def test_an_appended_file_holds_one_run_per_start_event(tmp_path):
    path = tmp_path / "run.jsonl"
    write_run(path, name="first")
    write_run(path, name="second", checks=2)  # the sink appends
    runs = read_runs(path)
    assert [r.name for r in runs] == ["first", "second"]
    assert [r.check_steps.size for r in runs] == [4, 2]


def test_markdown_escapes_what_the_file_says():
    assert md(HOSTILE) == "&lt;img src=x onerror=alert(1)&gt;"
    assert md("a|b") == r"a\|b" and md("[x](javascript:y)") == r"\[x\](javascript:y)"
    assert md("`code` *em* _u_ line\nbreak") == r"\`code\` \*em\* \_u\_ line break"
    assert plain("red\x1b[31m\x07") == "red?[31m?"


def test_a_hostile_layer_name_is_inert_in_the_summary_and_plot(tmp_path):
    path = write_run(tmp_path / "run.jsonl", layers=(HOSTILE, "$\\frac{1}{0}$", "out"),
                     name=f"run {HOSTILE}")
    [run] = read_runs(path)
    text = run_summary_markdown(run, "run.png")
    assert "<img" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<" not in text.replace("&lt;", "")
    # mathtext in a layer name is drawn as text, not parsed: "$\frac{1}{0}$" as typed, not a
    # fraction; long names are cut short.
    from matplotlib import cbook

    decoded_png(plot_run(run, tmp_path / "run.png"))
    fig = draw_run(run)
    grads, loss, change = fig.axes
    shown = [r"<img src=x onerror=aler…", r"\$\frac{1}{0}\$", "out"]
    assert [t.get_text() for t in grads.get_legend().get_texts()] == shown
    assert [t.get_text() for t in change.get_yticklabels()] == [
        "<img src=x onerro…", r"\$\frac{1}{0}\$", "out"]
    assert [t.get_text() for t in loss.texts] == [" vanishing <img src=x oner…"]
    assert fig.get_suptitle() == f"run {HOSTILE} (test)"
    names = [*shown, *(t.get_text() for t in change.get_yticklabels()),
             *(t.get_text() for t in loss.texts), fig.get_suptitle()]
    assert not any(cbook.is_math_text(name) for name in names), names


def decoded_png(path):
    """The PNG at ``path``, decoded: the size plot_run documents, and not blank."""
    import matplotlib.image  # as gradwatch does: only where a plot is drawn

    image = matplotlib.image.imread(path)
    assert image.shape == (FIGSIZE[1] * DPI, FIGSIZE[0] * DPI, 4) == (432, 1350, 4)
    assert image[..., :3].std() > 0.05  # a blank figure is 0
    return image


def test_plot_handles_nan_runs_and_runs_without_statistics(tmp_path):
    # (The plot of a healthy run, checked line by line against its event file:
    # test_cli.py::test_the_report_plot_shows_the_runs_layers_loss_findings_and_weight_change.)
    path = write_run(tmp_path / "run.jsonl", nan_at=2)  # the loss of step 20 is NaN
    lines = path.read_text().splitlines()
    stats = json.loads(lines[5])
    assert stats["event"] == "stats" and stats["step"] == 30
    stats["grad_norm"] = ["NaN"] * 3  # every gradient norm of step 30 too
    lines[5] = json.dumps(stats)
    path.write_text("\n".join(lines) + "\n")
    [run] = read_runs(path)
    assert np.isnan(run.grad_norm).any()
    decoded_png(plot_run(run, tmp_path / "nan.png"))
    grads, loss, change = draw_run(run).axes
    # Every layer's line has a gap at step 30, its points marked (lone points between gaps
    # would be invisible), and a red line says where values stopped being finite.
    *layers, nan_line = grads.lines
    assert [line.get_label() for line in layers] == ["0", "1", "2"]
    for i, line in enumerate(layers):
        assert line.get_xdata().tolist() == [10, 20, 30, 40] and line.get_marker() == "o"
        np.testing.assert_allclose(line.get_ydata(), run.grad_norm[:, i])
        assert np.isnan(line.get_ydata()).tolist() == [False, False, True, False]
    assert list(nan_line.get_xdata()) == [30, 30] and nan_line.get_color() == "crimson"
    assert [(t.get_text(), t.get_position()[0]) for t in grads.texts] == [(" NaN/Inf", 30)]
    assert grads.get_yscale() == "log"
    # The loss through its finite values, a red line at the first NaN one, and the finding.
    curve, nan_loss, finding = loss.lines
    assert curve.get_xdata().tolist() == [10, 30, 40]
    np.testing.assert_allclose(curve.get_ydata(), [1, 1 / 3, 1 / 4])
    assert list(nan_loss.get_xdata()) == [20, 20] and nan_loss.get_color() == "crimson"
    assert list(finding.get_xdata()) == [20, 20]
    assert [t.get_text() for t in loss.texts] == [" vanishing 0"]
    assert [t.get_text() for t in change.texts] == ["0%", "4%", "10%"]

    start_only = tmp_path / "start.jsonl"
    start_only.write_text(path.read_text().splitlines()[0] + "\n")
    [empty] = read_runs(start_only)
    assert empty.check_steps.size == 0 and math.isnan(first_last_ratio(empty))
    decoded_png(plot_run(empty, tmp_path / "empty.png"))
    # Each panel says what the file lacks, instead of empty axes.
    grads, loss, change = draw_run(empty).axes
    assert [t.get_text() for t in grads.texts] == ["no statistics in the event file"]
    assert [t.get_text() for t in loss.texts] == ["no loss in the event file"]
    assert [t.get_text() for t in change.texts] == ["not measured"] and not change.axison
    assert not grads.lines and not loss.lines and not change.patches


def test_a_warning_carries_the_window_before_it_and_the_report_says_what_moved_first(tmp_path):
    # Forensics: one check of 10 steps; layer '1' jumps 100x at step 7, layer '0' goes NaN at
    # step 9, layer '2' has no gradient at step 8 and stays level. The warning at step 10 is
    # followed by that window, and `gradwatch report` names who moved first.
    path = tmp_path / "run.jsonl"
    layers = ("0", "1", "2")
    grad = np.ones((10, 3))
    grad[6:, 1] = 100.0
    grad[8:, 0] = math.nan
    has = np.ones((10, 3), dtype=bool)
    has[7, 2] = False
    f = gradwatch.Finding(kind="exploding_gradient", step=10, layer="1", value=100.0,
                          threshold=10.0, message="layer '1' explodes")

    class Once(gradwatch.Detector):
        kinds = ("exploding_gradient",)

        def update(self, stats):
            return [f]

    ctx = gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="test", depth=3),
        layers=tuple(gradwatch.LayerInfo(name=n, type="Linear", num_params=10) for n in layers))
    mon = gradwatch.Monitor(ctx, detectors=[Once()], events=path, on_finding="log",
                            check_every=10)
    mon.check(gradwatch.StepStats(step=10, layers=layers, steps=np.arange(1, 11),
                                  grad_norm=grad, has_grad=has, loss=np.linspace(1, 2, 10),
                                  grad_size=np.ones(3)))
    mon.end()
    [run] = read_runs(path)
    [window] = run.windows
    assert (window["step"], window["kind"], window["layer"]) == (10, "exploding_gradient", "1")
    assert window["steps"].tolist() == list(range(1, 11))
    assert window["grad_norm"][6:, 1].tolist() == [100.0] * 4
    assert not window["has_grad"][7, 2]
    line = window_line(window, run.layers)
    assert line == ("window steps 1-10: moved first: '1' at step 7 (1e+02x), then '0' at "
                    "step 9 (non-finite)")
    assert line in run_summary_text(run)
    assert "moved first" in run_summary_markdown(run, None)
