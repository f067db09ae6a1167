"""Summaries of any run's event file (``gradwatch report``) as text and Markdown, and the
escaping and number formats the experiments' results share. Everything read from an event file is
escaped before it lands in Markdown or on a terminal."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._events import RunLog, first_last_ratio, weight_change_percent
from ._findings import Finding
from ._report import plain

# -- escaping --------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~#!])")


def md(text: object) -> str:
    """Text as inert Markdown: no HTML, no links, no emphasis, no table breaks, one line."""
    s = "".join(c if c.isprintable() else " " for c in str(text))
    return _MD_SPECIAL.sub(r"\\\1", html.escape(s, quote=False))


# -- numbers ---------------------------------------------------------------------------------


def number(x: float | None, fmt: str) -> str:
    """``x`` in ``fmt``; ``-`` for no value, ``NaN``/``Inf`` spelled out."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "NaN" if x is not None else "-"
    if isinstance(x, float) and math.isinf(x):
        return "Inf" if x > 0 else "-Inf"
    return format(x, fmt)


def percent(x: float | None) -> str:
    """A percentage with two significant digits below 10 % (``0.00012%``), whole above."""
    if x is None or not math.isfinite(x):
        return "NaN" if x is not None else "-"
    if x == 0:
        return "0%"
    return f"{x:.2g}%" if abs(x) < 10 else f"{x:.0f}%"


# -- links -----------------------------------------------------------------------------------


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


#: A layer "moves" in a window when its gradient norm gets this many times larger or smaller
#: than at the window's first step with a finite, positive norm (or stops being finite).
MOVE_FACTOR = 10.0


def window_moves(window: dict[str, Any], layers: Sequence[str]) -> list[tuple[str, int, str]]:
    """Which layers moved in the window before a warning, first first: ``(layer, step, how)``,
    ``how`` being ``"12x"``, ``"0.05x"`` (of its norm at the window's start) or
    ``"non-finite"``."""
    steps, grad, has = window["steps"], window["grad_norm"], window["has_grad"]
    moves = []
    for j, name in enumerate(layers):
        col = grad[:, j]
        ok = has[:, j] & np.isfinite(col) & (col > 0)
        first = np.flatnonzero(has[:, j])
        if not first.size:
            continue  # no gradient in the window
        base = col[np.flatnonzero(ok)[0]] if ok.any() else math.nan
        for i in range(len(steps)):
            value = col[i]
            if not has[i, j]:
                continue  # no gradient at this step
            if not np.isfinite(value):
                moves.append((name, int(steps[i]), "non-finite"))
                break
            ratio = value / base
            if not math.isfinite(ratio):
                continue
            if ratio >= MOVE_FACTOR or ratio <= 1 / MOVE_FACTOR:
                moves.append((name, int(steps[i]), f"{ratio:.2g}x"))
                break
    return sorted(moves, key=lambda m: (m[1], layers.index(m[0])))


def window_line(window: dict[str, Any], layers: Sequence[str], most: int = 3) -> str:
    """One line on the window before a warning: which layer moved first."""
    steps = window["steps"]
    span = f"steps {int(steps[0])}-{int(steps[-1])}" if len(steps) else "no steps"
    moves = window_moves(window, layers)
    if not moves:
        return (f"window {span}: no layer's gradient norm changed {MOVE_FACTOR:g}x within it "
                f"(the change is older than the window)")
    batches = window.get("batch_ids")
    batch_of = ({int(st): b for st, b in zip(steps, batches) if b is not None}
                if batches is not None else {})

    def at(step: int) -> str:
        batch = batch_of.get(step)
        return f"step {step}" + ("" if batch is None else f", batch {plain(repr(batch))}")

    said = [f"'{plain(name)}' at {at(step)} ({how})" for name, step, how in moves[:most]]
    more = f", and {len(moves) - most} more" if len(moves) > most else ""
    return f"window {span}: moved first: " + ", then ".join(said) + more


def _window_of(run: RunLog, f: Finding) -> dict[str, Any] | None:
    return next((w for w in run.windows if w["step"] == f.step and w["kind"] == f.kind
                 and w["layer"] == f.layer), None)


def run_summary_text(run: RunLog) -> str:
    """A readable text summary of one run from its event file."""
    head = f"run {plain(run.name or '(unnamed)')!r}, framework {plain(run.framework)}: " \
           f"{run.steps} steps, {run.check_steps.size} checks, {len(run.findings)} findings"
    lines = [head]
    if run.loss.size:
        lines.append(f"loss: {number(float(run.loss[0]), '.4g')} (first) -> "
                     f"{number(float(run.loss[-1]), '.4g')} (last)")
    lines.append(f"first/last layer gradient ratio (median): "
                 f"{number(first_last_ratio(run), '.2e')}")
    if not run.ended:
        lines.append("the run did not end cleanly (no end event)"
                     + ("; the last line was truncated" if run.truncated else ""))
    rows = [("layer", "type", "grad median", "grad last", "w change", "flags")]
    for r in layer_table(run):
        rows.append((plain(r["layer"]), plain(r["type"]), number(r["grad_median"], ".2e"),
                     number(r["grad_last"], ".2e"), percent(r["weight_change_percent"]),
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
            window = _window_of(run, f)
            if window is not None:
                lines.append(f"    {window_line(window, run.layers)}")
    else:
        lines.append("findings: none")
    return "\n".join(lines)


def run_summary_markdown(run: RunLog, plot: str | None) -> str:
    """The same summary as Markdown, every string from the file escaped."""
    out = [f"## Run {md(run.name or '(unnamed)')}", "", f"Framework: {md(run.framework)}.  "]
    out.append(f"{run.steps} optimizer steps, {run.check_steps.size} checks, "
               f"{len(run.findings)} findings.  ")
    if run.loss.size:
        out.append(f"Loss {number(float(run.loss[0]), '.4g')} (first) → "
                   f"{number(float(run.loss[-1]), '.4g')} (last).  ")
    out.append(f"First/last layer gradient ratio (median over checks): "
               f"{number(first_last_ratio(run), '.2e')}.")
    if not run.ended:
        out.append("")
        out.append("**The run did not end cleanly** (no end event"
                   + ("; its last line was truncated)." if run.truncated else ")."))
    if plot:
        out += ["", f"![gradient flow and loss]({_link(plot)})"]
    out += ["", "| layer | type | grad norm (median) | grad norm (last) | weight change | flags |",
            "|---|---|---|---|---|---|"]
    for r in layer_table(run):
        out.append(f"| {md(r['layer'])} | {md(r['type'])} | {number(r['grad_median'], '.2e')} | "
                   f"{number(r['grad_last'], '.2e')} | {percent(r['weight_change_percent'])} | "
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
        window = _window_of(run, f)
        if window is not None:
            out.append(f"  - {md(window_line(window, run.layers))}")
    out.append("")
    return "\n".join(out)
