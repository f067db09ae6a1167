"""Results of the reference experiments and summaries of event files, as a terminal table,
``results.json`` and Markdown. Everything read from an event file is escaped before it lands in
Markdown or on a terminal."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._events import RunLog, finding_rows, first_last_ratio, weight_change_percent
from ._experiments import Experiment, judge
from ._findings import to_json_ready
from ._plots import short_kind
from ._report import plain

# -- escaping --------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#!])")


def md(text: object) -> str:
    """Text as inert Markdown: no HTML, no links, no emphasis, no table breaks, one line."""
    s = "".join(c if c.isprintable() else " " for c in str(text))
    return _MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False))


# -- numbers ---------------------------------------------------------------------------------


def _num(x: float | None, fmt: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN" if x is not None else "-"
    if isinstance(x, float) and math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return format(x, fmt)


def _pct(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "NaN" if x is not None else "-"
    if x == 0:
        return "0%"
    return f"{x:.2g}%" if abs(x) < 10 else f"{x:.0f}%"


# -- one experiment run ----------------------------------------------------------------------


def framework_label(framework: str, backend: str | None = None) -> str:
    """``torch``, ``keras/tf``, ``keras/torch``: the table's framework column."""
    if framework == "keras" and backend:
        return f"keras/{'tf' if backend == 'tensorflow' else backend}"
    return framework


def record(exp: Experiment, raw: Mapping[str, Any], run: RunLog | None, *,
           events: str, plot: str | None) -> dict[str, Any]:
    """One row of ``results.json``: the adapter's numbers plus what the event file shows."""
    findings = finding_rows(run.findings) if run is not None else list(raw.get("findings", []))
    kinds = list(dict.fromkeys(f["kind"] for f in findings))
    problems = judge(exp, kinds)
    if run is not None:
        from_watcher = {(f["kind"], f["step"], f["layer"]) for f in raw.get("findings", [])}
        if from_watcher != {(f["kind"], f["step"], f["layer"]) for f in findings}:
            problems.append("the event file and the watcher's findings disagree")
    if raw.get("error"):
        problems.insert(0, f"crashed: {raw['error']}")
    wc = weight_change_percent(run) if run is not None else {}
    layers = list(run.layers) if run is not None else []
    return {
        "experiment": exp.name,
        "group": exp.group,
        "title": exp.title,
        "mitigation": exp.mitigation,
        "framework": raw.get("framework", "?"),
        "backend": raw.get("backend"),
        "label": framework_label(raw.get("framework", "?"), raw.get("backend")),
        "expected": exp.expected,
        "expect": list(exp.expect),
        "forbid": list(exp.forbid),
        "findings": findings,
        "kinds": kinds,
        "final_loss": raw.get("final_loss"),
        "final_accuracy": raw.get("final_accuracy"),
        "grad_ratio_first_last": first_last_ratio(run) if run is not None else None,
        "first_layer": layers[0] if layers else None,
        "last_layer": layers[-1] if layers else None,
        "weight_change_percent": wc,
        "seconds": raw.get("seconds"),
        "steps": exp.steps,
        "passed": not problems,
        "problems": problems,
        "events": events,
        "plot": plot,
        "settings": settings(exp),
    }


def settings(exp: Experiment) -> dict[str, Any]:
    """The spec's training settings (what both frameworks share)."""
    skip = {"name", "group", "title", "description", "mitigation", "expect", "forbid"}
    return {f.name: getattr(exp, f.name) for f in dataclasses.fields(exp) if f.name not in skip}


# -- the table -------------------------------------------------------------------------------

_COLUMNS = ("experiment", "framework", "expected", "observed", "loss", "acc", "g1/gL",
            "dW first", "time", "verdict")


def _observed(r: Mapping[str, Any]) -> str:
    return ", ".join(short_kind(k) for k in r["kinds"]) or "none"


def _expected(r: Mapping[str, Any]) -> str:
    return " + ".join(short_kind(k) for k in r["expect"]) + _extra_forbid(r) if r["expect"] \
        else "healthy"


def _extra_forbid(r: Mapping[str, Any]) -> str:
    # Worth saying only when it is the point of the run (clipping: exploding, but no NaN).
    forbid = r["forbid"]
    return f", no {'/'.join(short_kind(k) for k in forbid)}" if 0 < len(forbid) < 3 else ""


def _row(r: Mapping[str, Any]) -> tuple[str, ...]:
    first = r.get("first_layer")
    dw = r["weight_change_percent"].get(first) if first is not None else None
    return (plain(r["experiment"]), plain(r["label"]), plain(_expected(r)), plain(_observed(r)),
            _num(r["final_loss"], ".3f"), _num(r["final_accuracy"], ".0%"),
            _num(r["grad_ratio_first_last"], ".1e"), _pct(dw), _num(r["seconds"], ".1f") + "s",
            "PASS" if r["passed"] else "FAIL")


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The comparison table printed at the end of ``gradwatch demo``."""
    rows = [_COLUMNS] + [_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    right = {4, 5, 6, 7, 8}
    lines = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


LEGEND = ("loss/acc: on the whole training set after training; g1/gL: median over the checks "
          "of the first layer's gradient norm over the last layer's; dW first: the first "
          "layer's weight change since the start.")


def markdown_table(records: Sequence[Mapping[str, Any]]) -> str:
    head = ("| experiment | framework | expected | observed (step, layer) | final loss | "
            "accuracy | g1/gL | dW first layer | time | verdict |")
    lines = [head, "|" + "---|" * 10]
    for r in records:
        observed = ", ".join(
            f"{md(short_kind(f['kind']))} ({f['step']}" + (f", {md(f['layer'])})"
                                                            if f["layer"] is not None else ")")
            for f in _first_of_each(r["findings"])) or "none"
        cells = list(_row(r))
        cells[0], cells[1], cells[2] = md(cells[0]), md(cells[1]), md(cells[2])
        cells[3] = observed
        cells[9] = "**PASS**" if r["passed"] else "**FAIL**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_of_each(findings: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    seen: dict[str, Mapping[str, Any]] = {}
    for f in findings:
        seen.setdefault(f["kind"], f)
    return list(seen.values())


# -- files -----------------------------------------------------------------------------------


def write_json(path: str | os.PathLike, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_json_ready(data), fh, indent=1, allow_nan=False)
        fh.write("\n")


def write_results(out: str | os.PathLike, meta: Mapping[str, Any],
                  records: Sequence[Mapping[str, Any]],
                  experiments: Sequence[Experiment]) -> tuple[str, str]:
    """``results.json`` and ``results.md`` in ``out``; returns their paths."""
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    json_path = os.path.join(out, "results.json")
    write_json(json_path, {**meta, "passed": all(r["passed"] for r in records),
                           "runs": list(records)})
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w", encoding="utf-8") as fh:
        fh.write(results_markdown(meta, records, experiments))
    return json_path, md_path


def results_markdown(meta: Mapping[str, Any], records: Sequence[Mapping[str, Any]],
                     experiments: Sequence[Experiment]) -> str:
    passed = sum(r["passed"] for r in records)
    out = ["# gradwatch reference experiments", ""]
    out.append(f"Command: `{md(meta.get('command', 'gradwatch demo')).replace('`', '')}`  ")
    out.append(f"Versions: {md(meta.get('versions', ''))}  ")
    out.append(f"Machine: {md(meta.get('machine', ''))}  ")
    out.append(f"Wall time: {_num(meta.get('wall_seconds'), '.1f')} s; {passed} of "
               f"{len(records)} runs met their expected verdict.")
    out += ["", markdown_table(records), "", md(LEGEND), ""]
    by_name: dict[str, list[Mapping[str, Any]]] = {}
    for r in records:
        by_name.setdefault(r["experiment"], []).append(r)
    for exp in experiments:
        runs = by_name.get(exp.name)
        if not runs:
            continue
        out += [f"## {md(exp.name)}: {md(exp.title)}", "", md(exp.description), ""]
        s = settings(exp)
        out.append("Settings: " + md(", ".join(f"{k}={v}" for k, v in s.items())) + "  ")
        must = ", ".join(exp.expect) or "nothing"
        out.append(f"Expected: reports {md(must)}; must not report "
                   f"{md(', '.join(exp.forbid) or 'anything in particular')}.")
        out.append("")
        for r in runs:
            out.append(f"### {md(r['label'])}: {'PASS' if r['passed'] else 'FAIL'}")
            out.append("")
            for p in r["problems"]:
                out.append(f"- problem: {md(p)}")
            for f in r["findings"]:
                layer = f" in layer {md(f['layer'])}" if f["layer"] is not None else ""
                out.append(f"- step {f['step']}: {md(f['kind'])}{layer}")
            if not r["findings"]:
                out.append("- no findings")
            wc = r["weight_change_percent"]
            if wc:
                out.append("- weight change since the start: " + ", ".join(
                    f"{md(k)} {_pct(v)}" for k, v in wc.items()))
            if r.get("plot"):
                out += ["", f"![{md(exp.name)} ({md(r['label'])})]({_link(r['plot'])})"]
            out.append("")
    return "\n".join(out)


def _link(path: str) -> str:
    # Our own file names; still, nothing in a link target may close it or start a new one.
    return "".join(c for c in path.replace("\\", "/") if c.isalnum() or c in "-_./")


# -- report on an arbitrary event file -------------------------------------------------------


def layer_table(run: RunLog) -> list[dict[str, Any]]:
    """Per layer: median and last gradient norm over the checks, weight change since start."""
    rows = []
    wc = weight_change_percent(run)
    flags: dict[str, list[str]] = {}
    for f in run.findings:
        # The named layer and the others the finding's evidence lists (as the watcher's report).
        named = [f.layer] if f.layer is not None else []
        others = f.evidence.get("layers", []) if isinstance(f.evidence, Mapping) else []
        for layer in named + [x for x in others if isinstance(x, str)]:
            flags.setdefault(layer, [])
            if f.kind not in flags[layer]:
                flags[layer].append(f.kind)
    for i, name in enumerate(run.layers):
        g = run.grad_norm[:, i] if run.grad_norm.size else np.array([])
        finite = g[np.isfinite(g)]
        rows.append({
            "layer": name, "type": run.layer_types[i] if i < len(run.layer_types) else "",
            "grad_median": float(np.median(finite)) if finite.size else math.nan,
            "grad_last": float(g[-1]) if g.size else math.nan,
            "weight_change_percent": wc.get(name),
            "flags": flags.get(name, []),
        })
    return rows


def run_summary_text(run: RunLog) -> str:
    """A readable text summary of one run from its event file."""
    head = f"run {plain(run.name or '(unnamed)')!r}, framework {plain(run.framework)}: " \
           f"{run.steps} steps, {run.check_steps.size} checks, {len(run.findings)} findings"
    lines = [head]
    if run.loss.size:
        lines.append(f"loss: {_num(float(run.loss[0]), '.4g')} (first) -> "
                     f"{_num(float(run.loss[-1]), '.4g')} (last)")
    lines.append(f"first/last layer gradient ratio (median): "
                 f"{_num(first_last_ratio(run), '.2e')}")
    if not run.ended:
        lines.append("the run did not end cleanly (no end event)"
                     + ("; the last line was truncated" if run.truncated else ""))
    rows = [("layer", "type", "grad median", "grad last", "w change", "flags")]
    for r in layer_table(run):
        rows.append((plain(r["layer"]), plain(r["type"]), _num(r["grad_median"], ".2e"),
                     _num(r["grad_last"], ".2e"), _pct(r["weight_change_percent"]),
                     plain(",".join(r["flags"]) or "ok")))
    widths = [max(len(row[i]) for row in rows) for i in range(6)]
    lines.append("")
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    if run.findings:
        lines.append("findings:")
        for f in run.findings:
            lines.append(f"- [{plain(f.kind)}] {plain(f.message)}")
            for a in f.advice:
                lines.append(f"    * {plain(a)}")
    else:
        lines.append("findings: none")
    return "\n".join(lines)


def run_summary_markdown(run: RunLog, plot: str | None) -> str:
    """The same summary as Markdown, every string from the file escaped."""
    out = [f"## Run {md(run.name or '(unnamed)')}", "", f"Framework: {md(run.framework)}.  "]
    out.append(f"{run.steps} optimizer steps, {run.check_steps.size} checks, "
               f"{len(run.findings)} findings.  ")
    if run.loss.size:
        out.append(f"Loss {_num(float(run.loss[0]), '.4g')} (first) → "
                   f"{_num(float(run.loss[-1]), '.4g')} (last).  ")
    out.append(f"First/last layer gradient ratio (median over checks): "
               f"{_num(first_last_ratio(run), '.2e')}.")
    if not run.ended:
        out.append("")
        out.append("**The run did not end cleanly** (no end event"
                   + ("; its last line was truncated)." if run.truncated else ")."))
    if plot:
        out += ["", f"![gradient flow and loss]({_link(plot)})"]
    out += ["", "| layer | type | grad norm (median) | grad norm (last) | weight change | flags |",
            "|---|---|---|---|---|---|"]
    for r in layer_table(run):
        out.append(f"| {md(r['layer'])} | {md(r['type'])} | {_num(r['grad_median'], '.2e')} | "
                   f"{_num(r['grad_last'], '.2e')} | {_pct(r['weight_change_percent'])} | "
                   f"{md(', '.join(r['flags']) or 'ok')} |")
    out += ["", "### Findings", ""]
    if not run.findings:
        out.append("None.")
    for f in run.findings:
        out.append(f"- **{md(f.kind)}** at step {f.step}"
                   + (f", layer {md(f.layer)}" if f.layer is not None else "")
                   + f": {md(f.message)}")
        for a in f.advice:
            out.append(f"  - {md(a)}")
    out.append("")
    return "\n".join(out)
