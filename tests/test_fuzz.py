"""Fuzzing (issue 6): the whole core — every default detector, the monitor, the JSONL sink and
reader — on arbitrary statistics; the event-file reader on arbitrary bytes and arbitrary JSON.

Nothing here may raise but the reader's documented :class:`EventFileError`; every finding is
strict JSON and reads back from the event file as it was reported. Per-detector properties on
arbitrary streams are in tests/test_detectors.py::test_any_stream_gives_well_formed_findings.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch._events import EventFileError, read_events, read_runs
from gradwatch._report import plain
from gradwatch._results import layer_table, md, run_summary_markdown, run_summary_text

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

NAN, INF = math.nan, math.inf
ODD = st.one_of(
    st.sampled_from([0.0, -0.0, NAN, INF, -INF, 5e-324, 1e-300, 1e-9, 0.5, 1.0, 1e3, 1e300,
                     1e308, 1.7976931348623157e308, -1.0, -1e308]),
    st.floats(),
)
NAMES = st.text(max_size=12)


@st.composite
def runs(draw):
    """(layer names, list of StepStats): what an adapter could send, values unconstrained."""
    layers = tuple(draw(st.lists(NAMES, max_size=5, unique=True)))
    n = len(layers)
    sites = draw(st.lists(st.tuples(NAMES, st.sampled_from(["relu", "sigmoid", "tanh", "gelu",
                                                            "", "?"])), max_size=3))
    step = draw(st.integers(0, 10**6))
    stream = []
    for _ in range(draw(st.integers(1, 8))):
        rows = draw(st.integers(1, 4))
        steps = []
        for _ in range(rows):
            step += draw(st.integers(1, 5))
            steps.append(step)

        def per_layer(elements=ODD):
            values = draw(st.none() | st.lists(elements, min_size=n, max_size=n))
            return None if values is None else np.array(values, dtype=float)

        activations = {
            name: gradwatch.ActivationStats(kind=kind, dead_fraction=draw(ODD),
                                            saturated_fraction=draw(ODD),
                                            units=draw(st.integers(-5, 10**6)))
            for name, kind in sites if draw(st.booleans())}
        stream.append(gradwatch.StepStats(
            step=step, layers=layers, steps=np.array(steps),
            grad_norm=np.reshape(draw(st.lists(ODD, min_size=rows * n, max_size=rows * n)),
                                 (rows, n)),
            has_grad=np.reshape(draw(st.lists(st.booleans(), min_size=rows * n,
                                              max_size=rows * n)), (rows, n)).astype(bool),
            loss=np.array(draw(st.lists(ODD, min_size=rows, max_size=rows)), dtype=float),
            has_loss=np.array(draw(st.lists(st.booleans(), min_size=rows, max_size=rows)),
                              dtype=bool),
            grad_size=np.array(draw(st.lists(ODD, min_size=n, max_size=n)), dtype=float),
            grad_max=per_layer(), grad_nonfinite=per_layer(), grad_zero_fraction=per_layer(),
            weight_norm=per_layer(), weight_nonfinite=per_layer(), update_ratio=per_layer(),
            weight_change=per_layer(), activations=activations))
    return layers, [name for name, _ in sites], stream


def strict_json(obj) -> str:
    def reject(name):
        raise AssertionError(f"bare {name}")

    text = json.dumps(obj, allow_nan=False)
    json.loads(text, parse_constant=reject)
    return text


@FUZZ
@given(data=runs(), repeat_after=st.integers(0, 600))
def test_the_core_on_arbitrary_statistics_never_fails_and_reports_strict_json(data, repeat_after):
    layers, sites, stream = data
    context = gradwatch.RunContext(
        model=gradwatch.ModelInfo(framework="fuzz", depth=len(layers)),
        layers=tuple(gradwatch.LayerInfo(name=n, type="Linear", num_params=1) for n in layers))
    seen = []
    with tempfile.TemporaryDirectory() as tmp:
        events = os.path.join(tmp, "run.jsonl")
        mon = gradwatch.Monitor(context, on_finding=seen.append, events=events,
                                check_every=1, repeat_after=repeat_after)
        for stats in stream:
            mon.check(stats)
        report = mon.end()
        [run] = read_runs(events)

    # No detector, sink or summary failed (a failure would be an internal error).
    assert report.internal_errors == ()
    # on_finding hears the problems; info findings are facts, kept in findings and the report.
    assert seen == [f for f in mon.findings if f.is_warning]
    assert mon.findings == list(report.findings)
    for f in mon.findings:
        back = gradwatch.Finding.from_dict(json.loads(strict_json(f.to_dict())))
        assert (back.kind, back.step, back.layer, back.message, back.advice) == (
            f.kind, f.step, f.layer, f.message, f.advice)
        assert f.kind in gradwatch.KINDS
        assert f.layer is None or f.layer in layers or f.layer in sites
    strict_json(report.summary())
    assert_report_renders(str(report), report, layers, stream)
    # The event file says what the monitor said.
    assert [(f.kind, f.step, f.layer) for f in run.findings] == [
        (f.kind, f.step, f.layer) for f in mon.findings]
    assert run.ended and run.check_steps.tolist() == [s.step for s in stream]


NUMBER = r"-|-?inf|-?\d\.\d\de[+-]\d+"  # _num: NaN and absent as "-", inf as inf


def columns(table: list[str]) -> list[list[str]]:
    """The cells of a rendered table (header, dashes, rows), cut at the dashes' columns."""
    spans = [m.span() for m in re.finditer(r"-+", table[1])]
    return [[line[a:(spans[k + 1][0] if k + 1 < len(spans) else None)].strip()
             for k, (a, _) in enumerate(spans)] for line in table]


def assert_report_renders(text: str, report, layers, stream) -> None:
    """What a reader of ``print(w.report())`` relies on, from the statistics themselves."""
    lines = text.split("\n")
    # Nothing from the model's strings can move the terminal or break a line.
    assert all(c.isprintable() for line in lines for c in line)
    warnings = [f for f in report.findings if f.is_warning]
    assert lines[0] == (f"gradwatch report (fuzz): {report.steps} optimizer steps, "
                        f"{report.checks} checks, {len(warnings)} warnings, "
                        f"{len(report.findings) - len(warnings)} info")
    assert report.checks == len(stream) and report.steps == stream[-1].step
    # One row per layer, in the model's order, with its name; numbers finite or as documented.
    start = lines.index("") + 1
    table = lines[start:start + 2 + len(layers)]
    assert table[0].split() == ["layer", "type", "params", "grad", "norm", "typical",
                                "update/w", "w", "change", "flags"]
    cells = columns(table)[2:]
    assert [row[0] for row in cells] == [plain(n).strip() for n in layers]  # cells are stripped
    assert lines[start + 2 + len(layers)] == ""
    for i, row in enumerate(cells):
        # The gradient norm at the last check that measured this layer, read off the stream.
        last = next((st.grad_norm[-1, i] for st in reversed(stream) if st.has_grad[-1, i]),
                    NAN)
        for cell in row[3:6]:
            assert re.fullmatch(NUMBER, cell), row
        assert re.fullmatch(NUMBER.replace("|-?inf|", "|-?inf%|") + "|-?[\\d.e+-]+%", row[6]), row
        if math.isnan(last):
            assert row[3] == "-"
        else:
            # Three significant digits (1.80e+308 for the largest float does not parse back).
            assert row[3] == f"{last:.2e}", (row, last)
        # Every warning that names the layer flags it; a clean layer says ok.
        named = {f.kind for f in warnings if f.layer == layers[i]}
        flags = set(row[7].split(",")) - {"ok"}
        assert named <= flags and (row[7] == "ok") == (not flags)
    # Every finding, in order, with its kind, message and advice.
    if not report.findings:
        assert "findings: none" in lines
        return
    listed = lines[lines.index("findings:") + 1:]
    for f in report.findings:
        tag = f.kind if f.is_warning else f"{f.kind}, info"
        head = listed.index(f"- [{tag}] {plain(f.message)}")
        assert listed[head + 1:head + 1 + len(f.advice)] == [f"    * {plain(a)}"
                                                             for a in f.advice]
        listed = listed[head + 1 + len(f.advice):]


# -- the reader -------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**400), 10**400)
    | st.floats() | st.text(max_size=8) | st.sampled_from(["NaN", "Infinity", "-Infinity"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = ["step", "steps", "loss", "has_loss", "grad_norm", "has_grad", "grad_max",
          "weight_change", "update_ratio", "activations", "layers", "run", "framework",
          "check_every", "kind", "layer", "value", "threshold", "message", "advice", "evidence",
          "since", "summary", "model"]


@st.composite
def events(draw):
    """A JSON object that looks like an event: a known (or unknown) name and known fields with
    arbitrary values, sometimes of the right shape."""
    n = draw(st.integers(0, 3))
    event = {"event": draw(st.sampled_from(["start", "stats", "finding", "cleared", "end"])
                           | st.text(max_size=6))}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        event[field] = draw(JSON_VALUES)
    if draw(st.booleans()):  # plausible shapes, so the reader gets past its first checks
        event.setdefault("step", draw(st.integers(-3, 100)))
        event["grad_norm"] = draw(st.lists(JSON_VALUES, min_size=n, max_size=n))
        event["layers"] = draw(st.lists(NAMES | st.dictionaries(st.sampled_from(["name", "type"]),
                                                                JSON_VALUES), min_size=n,
                                        max_size=n))
        rows = draw(st.integers(0, 3))
        event["steps"] = draw(st.lists(JSON_VALUES, min_size=rows, max_size=rows))
        event["loss"] = draw(st.lists(JSON_VALUES, min_size=rows, max_size=rows))
        event["kind"] = draw(st.sampled_from(gradwatch.KINDS) | st.text(max_size=4))
    return event


@st.composite
def event_files(draw):
    lines = [json.dumps(e) for e in draw(st.lists(events(), max_size=8))]
    raw = [line.encode() for line in lines]
    for _ in range(draw(st.integers(0, 2))):  # corruption: torn, garbage, or blank lines
        i = draw(st.integers(0, len(raw)))
        raw.insert(i, draw(st.binary(max_size=30) | st.sampled_from(
            [b"", b"   ", b"[" * 5000, b'{"event": "start"', b"\xff\xfe", b"NaN"])))
    if raw and draw(st.booleans()):
        raw[-1] = raw[-1][: draw(st.integers(0, len(raw[-1])))]
    return b"\n".join(raw) + (b"\n" if draw(st.booleans()) else b"")


def read_or_documented_error(content: bytes):
    """Read ``content`` as an event file: the runs, or the EventFileError it raised."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "events.jsonl")
        with open(path, "wb") as fh:
            fh.write(content)
        try:
            log = read_events(path)
            result = read_runs(path)
        except EventFileError as exc:
            assert str(exc).startswith(f"{path}, line {exc.line}: ")
            assert 1 <= exc.line <= content.count(b"\n") + 1
            return exc
    assert all(isinstance(e, dict) and isinstance(e["event"], str) for e in log.events)
    return result


@FUZZ
@given(content=st.binary(max_size=400))
def test_the_reader_on_arbitrary_bytes_reads_or_names_the_line(content):
    read_or_documented_error(content)


@FUZZ
@given(content=event_files())
def test_the_reader_on_arbitrary_events_reads_or_names_the_line_and_reports_render(content):
    result = read_or_documented_error(content)
    if isinstance(result, EventFileError):
        return
    for run in result:  # what `gradwatch report` prints and writes for a file that reads
        rows = layer_table(run)
        text = run_summary_text(run)
        markdown = run_summary_markdown(run, "plot.png")
        assert [r["layer"] for r in rows] == list(run.layers)
        assert all(c.isprintable() for line in text.split("\n") for c in line)
        assert f"{run.check_steps.size} checks, {len(run.findings)} findings" in text
        for f in run.findings:  # each finding listed, by its kind, in text and Markdown
            assert f"- [{plain(f.kind)}] {plain(f.message)}" in text.split("\n")
            assert md(f.kind) in markdown
        for name in run.layers:
            assert md(name) in markdown
