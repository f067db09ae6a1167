"""What the reference runs showed: one :class:`RunRecord` per run, the terminal table,
``results.json`` and ``results.md``. Everything read from an event file is escaped before it
lands in Markdown or on a terminal."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .._events import RunLog, first_last_ratio, weight_change_percent
from .._findings import Finding, to_json_ready
from .._plots import short_kind
from .._report import plain
from .._results import md, number, percent
from ._runner import RunResult, Settings
from ._table import Experiment, judge

# -- one run ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One run of one experiment in one framework under one settings: what the runner returned
    (``result``, ``None`` when it crashed) and what the run's event file shows. One row of the
    table and of ``results.json``."""

    experiment: Experiment
    settings: Settings
    #: The runner's framework and its table label (``"keras/tf"``).
    framework: str
    label: str
    result: RunResult | None
    #: ``"RuntimeError: ..."`` when the run crashed or its event file could not be read.
    error: str | None
    #: The findings, from the event file (what plots and ``gradwatch report`` read); the
    #: runner's when there is no event file.
    findings: tuple[Finding, ...]
    #: What is wrong against the experiment's verdict; empty means PASS.
    problems: tuple[str, ...]
    #: Median over the checks of the first layer's gradient norm over the last layer's.
    grad_ratio_first_last: float | None
    first_layer: str | None
    last_layer: str | None
    #: Per layer: weight change since the start, in percent.
    weight_change_percent: Mapping[str, float]
    #: The event file and the plot, relative to the output folder.
    events: str
    plot: str | None = None

    @classmethod
    def of(cls, exp: Experiment, settings: Settings, *, framework: str, label: str,
           result: RunResult | None, error: str | None, run: RunLog | None,
           events: str) -> RunRecord:
        """Judge one run: its findings against ``exp``'s verdict, the event file's against the
        watcher's, and the steps gradwatch saw against the steps trained."""
        if run is not None:
            findings = tuple(run.findings)
        else:
            findings = result.findings if result is not None else ()
        problems = judge(exp, _kinds(findings))
        if run is not None and result is not None:
            if _keys(result.findings) != _keys(run.findings):
                problems.append("the event file and the watcher's findings disagree")
        if result is not None and result.steps_seen != result.batches:
            problems.append(f"gradwatch saw {result.steps_seen} of {result.batches} steps")
        if error:
            problems.insert(0, f"crashed: {error}")
        layers = list(run.layers) if run is not None else []
        return cls(
            experiment=exp, settings=settings, framework=framework, label=label, result=result,
            error=error, findings=findings, problems=tuple(problems),
            grad_ratio_first_last=first_last_ratio(run) if run is not None else None,
            first_layer=layers[0] if layers else None, last_layer=layers[-1] if layers else None,
            weight_change_percent=weight_change_percent(run) if run is not None else {},
            events=events)

    @property
    def kinds(self) -> list[str]:
        """The finding kinds reported, each once, in order of first occurrence."""
        return _kinds(self.findings)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def final_loss(self) -> float | None:
        return self.result.final_loss if self.result is not None else None

    @property
    def final_accuracy(self) -> float | None:
        return self.result.final_accuracy if self.result is not None else None

    @property
    def seconds(self) -> float | None:
        return self.result.seconds if self.result is not None else None

    def to_json(self) -> dict[str, Any]:
        """The run's entry in ``results.json``."""
        exp, res = self.experiment, self.result
        return {
            "experiment": exp.name,
            "group": exp.group,
            "title": exp.title,
            "mitigation": exp.mitigation,
            "framework": self.framework,
            "backend": res.backend if res is not None else None,
            "label": self.label,
            "settings": self.settings.name,
            "watch_options": self.settings.options(),
            "expected": exp.expected,
            "expect": list(exp.expect),
            "forbid": list(exp.forbid),
            "findings": [{"kind": f.kind, "step": f.step, "layer": f.layer,
                          "severity": f.severity} for f in self.findings],
            "kinds": self.kinds,
            "final_loss": self.final_loss,
            "final_accuracy": self.final_accuracy,
            "grad_ratio_first_last": self.grad_ratio_first_last,
            "first_layer": self.first_layer,
            "last_layer": self.last_layer,
            "weight_change_percent": dict(self.weight_change_percent),
            "seconds": self.seconds,
            "steps": exp.steps,
            "batches": res.batches if res is not None else None,
            "steps_seen": res.steps_seen if res is not None else None,
            "versions": res.versions if res is not None else None,
            "passed": self.passed,
            "problems": list(self.problems),
            "error": self.error,
            "events": self.events,
            "plot": self.plot,
            "spec": spec(exp),
        }


def _kinds(findings: Sequence[Finding]) -> list[str]:
    return list(dict.fromkeys(f.kind for f in findings))


def _keys(findings: Sequence[Finding]) -> set[tuple[str, int, str | None]]:
    return {(f.kind, f.step, f.layer) for f in findings}


def spec(exp: Experiment) -> dict[str, Any]:
    """The experiment's training settings (what every framework shares)."""
    skip = {"name", "group", "title", "description", "mitigation", "expect", "forbid"}
    return {f.name: getattr(exp, f.name) for f in dataclasses.fields(exp) if f.name not in skip}


# -- the table -------------------------------------------------------------------------------

_COLUMNS = ("experiment", "framework", "settings", "expected", "observed", "loss", "acc",
            "g1/gL", "dW first", "time", "verdict")
_RIGHT = {5, 6, 7, 8, 9}


def _observed(r: RunRecord) -> str:
    return ", ".join(short_kind(k) for k in r.kinds) or "none"


def _expected(exp: Experiment) -> str:
    if not exp.expect:
        return "healthy"
    # The forbidden kinds are worth saying when they are the run's point (clipping: exploding,
    # but no NaN).
    extra = f", no {'/'.join(short_kind(k) for k in exp.forbid)}" \
        if 0 < len(exp.forbid) < 3 else ""
    return " + ".join(short_kind(k) for k in exp.expect) + extra


def _row(r: RunRecord) -> tuple[str, ...]:
    dw = r.weight_change_percent.get(r.first_layer) if r.first_layer is not None else None
    return (plain(r.experiment.name), plain(r.label), plain(r.settings.name),
            plain(_expected(r.experiment)), plain(_observed(r)),
            number(r.final_loss, ".3f"), number(r.final_accuracy, ".0%"),
            number(r.grad_ratio_first_last, ".1e"), percent(dw),
            number(r.seconds, ".1f") + "s", "PASS" if r.passed else "FAIL")


def format_table(records: Sequence[RunRecord]) -> str:
    """The comparison table printed at the end of ``gradwatch demo``."""
    rows = [_COLUMNS] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in _RIGHT else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


LEGEND = ("loss/acc: on the whole training set after training; g1/gL: median over the checks "
          "of the first layer's gradient norm over the last layer's; dW first: the first "
          "layer's weight change since the start; settings: default = gradwatch's defaults "
          "(sampled update ratios), exact = update ratios from every weight.")


def markdown_table(records: Sequence[RunRecord]) -> str:
    head = ("| experiment | framework | settings | expected | observed (step, layer) | "
            "final loss | accuracy | g1/gL | dW first layer | time | verdict |")
    lines = [head, "|" + "---|" * len(_COLUMNS)]
    for r in records:
        observed = ", ".join(
            f"{md(short_kind(f.kind))} ({f.step}" + (f", {md(f.layer)})"
                                                     if f.layer is not None else ")")
            for f in _first_of_each(r.findings)) or "none"
        cells = [md(c) for c in _row(r)]
        cells[4] = observed
        cells[10] = "**PASS**" if r.passed else "**FAIL**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_of_each(findings: Sequence[Finding]) -> list[Finding]:
    seen: dict[str, Finding] = {}
    for f in findings:
        seen.setdefault(f.kind, f)
    return list(seen.values())


# -- files -----------------------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json_ready(data), fh, indent=1, allow_nan=False)
        fh.write("\n")


def write_results(out: str | os.PathLike[str], meta: Mapping[str, Any],
                  records: Sequence[RunRecord],
                  experiments: Sequence[Experiment]) -> tuple[str, str]:
    """``results.json`` and ``results.md`` in ``out``; returns their paths."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    write_json(json_path, {**meta, "passed": all(r.passed for r in records),
                           "runs": [r.to_json() for r in records]})
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(results_markdown(meta, records, experiments))
    return json_path, md_path


def results_markdown(meta: Mapping[str, Any], records: Sequence[RunRecord],
                     experiments: Sequence[Experiment]) -> str:
    passed = sum(r.passed for r in records)
    out = ["# gradwatch reference experiments", ""]
    out.append(f"Command: `{md(meta.get('command', 'gradwatch demo')).replace('`', '')}`  ")
    out.append(f"Versions: {md(meta.get('versions', ''))}  ")
    out.append(f"Machine: {md(meta.get('machine', ''))}  ")
    out.append(f"Wall time: {number(meta.get('wall_seconds'), '.1f')} s; {passed} of "
               f"{len(records)} runs met their expected verdict.")
    out += ["", markdown_table(records), "", md(LEGEND), ""]
    by_name: dict[str, list[RunRecord]] = {}
    for r in records:
        by_name.setdefault(r.experiment.name, []).append(r)
    for exp in experiments:
        runs = by_name.get(exp.name)
        if not runs:
            continue
        out += [f"## {md(exp.name)}: {md(exp.title)}", "", md(exp.description), ""]
        out.append("Settings: " + md(", ".join(f"{k}={v}" for k, v in spec(exp).items())) + "  ")
        must = ", ".join(exp.expect) or "nothing"
        out.append(f"Expected: reports {md(must)}; must not report "
                   f"{md(', '.join(exp.forbid) or 'anything in particular')}.")
        out.append("")
        for r in runs:
            out.append(f"### {md(r.label)}, {md(r.settings.name)} settings: "
                       f"{'PASS' if r.passed else 'FAIL'}")
            out.append("")
            for p in r.problems:
                out.append(f"- problem: {md(p)}")
            for f in r.findings:
                layer = f" in layer {md(f.layer)}" if f.layer is not None else ""
                out.append(f"- step {f.step}: {md(f.kind)}{layer}")
            if not r.findings:
                out.append("- no findings")
            if r.weight_change_percent:
                out.append("- weight change since the start: " + ", ".join(
                    f"{md(k)} {percent(v)}" for k, v in r.weight_change_percent.items()))
            if r.plot:
                out += ["", f"![{md(exp.name)} ({md(r.label)}, {md(r.settings.name)})]"
                            f"({_link(r.plot)})"]
            out.append("")
    return "\n".join(out)


def _link(path: str) -> str:
    # Our own file names; still, nothing in a link target may close it or start a new one.
    return "".join(c for c in path.replace("\\", "/") if c.isalnum() or c in "-_./")
