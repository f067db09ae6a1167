"""The end-of-run report: a per-layer table and the findings, rendered as text."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Any

import numpy as np

from ._findings import Finding
from ._gradnorms import GradNormSummary


def plain(text: object, *, lines: bool = False) -> str:
    """Text safe to print on a terminal: control characters (escape sequences) become ``?``,
    and line breaks too unless ``lines``."""
    if lines:
        return "\n".join(plain(line) for line in str(text).split("\n"))
    return "".join(c if c.isprintable() else "?" for c in str(text))


def _num(x: float | None, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if pct:
        return f"{100 * x:.3g}%"
    return f"{x:.2e}"


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer's line in the report."""

    name: str
    type: str
    num_params: int
    #: Gradient L2 norm at the last check.
    grad_norm: float
    #: Geometric mean of the gradient norm over all checks (robust to spikes).
    grad_norm_typical: float
    #: Update/weight ratio at the last check.
    update_ratio: float
    #: Relative weight change since the start (0.05 = 5 %).
    weight_change: float
    #: Finding kinds that named this layer.
    flags: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Report:
    """What gradwatch saw over a run. ``str(report)`` renders it as text."""

    framework: str
    #: Optimizer steps observed.
    steps: int
    checks: int
    layers: tuple[LayerRow, ...]
    findings: tuple[Finding, ...]
    #: Repeats of an active condition that the rate limit kept out of the log.
    suppressed: int = 0
    #: gradwatch's own failures (each reported once when it happened).
    internal_errors: tuple[str, ...] = ()
    #: First and last finite loss seen.
    loss_first: float = math.nan
    loss_last: float = math.nan
    #: Optimizer steps the guard (``guard="skip"``) did not apply: their gradients were not
    #: finite, and the weights and optimizer state stayed as they were.
    skipped_steps: int = 0
    #: Optimizer steps the AMP loss scaler skipped itself (its scaled gradients overflowed and
    #: it lowered the scale): normal under AMP, told once as info, not counted in
    #: ``skipped_steps``.
    scaler_skipped_steps: int = 0
    #: 'Is this normal?': the whole-model gradient norm (before clipping) over the run's steps,
    #: and how often clipping was active; ``None`` before any check.
    grad_norms: GradNormSummary | None = None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: counts per finding kind, layers flagged, loss."""
        return {
            "steps": self.steps,
            "checks": self.checks,
            "findings": dict(Counter(f.kind for f in self.findings)),
            "warnings": dict(Counter(f.kind for f in self.findings if f.is_warning)),
            "flagged_layers": {row.name: list(row.flags) for row in self.layers if row.flags},
            "loss_first": None if math.isnan(self.loss_first) else self.loss_first,
            "loss_last": None if math.isnan(self.loss_last) else self.loss_last,
            "internal_errors": list(self.internal_errors),
            "skipped_steps": self.skipped_steps,
            "scaler_skipped_steps": self.scaler_skipped_steps,
            "grad_norms": None if self.grad_norms is None else self.grad_norms.to_dict(),
        }

    @property
    def kinds(self) -> set[str]:
        """The distinct finding kinds raised (either severity)."""
        return {f.kind for f in self.findings}

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The warning-severity findings: the problems (info findings are facts)."""
        return tuple(f for f in self.findings if f.is_warning)

    def __str__(self) -> str:
        head = [f"gradwatch report ({plain(self.framework)}): {self.steps} optimizer steps, "
                f"{self.checks} checks, {len(self.warnings)} warnings, "
                f"{len(self.findings) - len(self.warnings)} info"]
        if not math.isnan(self.loss_first):
            head.append(f"loss: {self.loss_first:.4g} (first) -> {self.loss_last:.4g} (last)")
        if self.skipped_steps:
            head.append(f"guard: {self.skipped_steps} optimizer step"
                        f"{'s' if self.skipped_steps != 1 else ''} with non-finite gradients "
                        f"skipped (weights and optimizer state left as they were)")
        if self.scaler_skipped_steps:
            head.append(f"AMP loss scaler: {self.scaler_skipped_steps} optimizer step"
                        f"{'s' if self.scaler_skipped_steps != 1 else ''} skipped by the scaler "
                        f"itself (overflow; the scale was lowered): normal under AMP")
        if self.grad_norms is not None:
            head.extend(self.grad_norms.lines())
        cols = ("layer", "type", "params", "grad norm", "typical", "update/w", "w change", "flags")
        # Names and messages are the model's own strings: one line each, no escape sequences.
        rows = [cols] + [(
            plain(r.name), plain(r.type), str(r.num_params), _num(r.grad_norm),
            _num(r.grad_norm_typical), _num(r.update_ratio), _num(r.weight_change, pct=True),
            plain(",".join(r.flags) or "ok"),
        ) for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = head + [""] + lines + [""]
        if self.findings:
            out.append("findings:")
            for f in self.findings:
                tag = plain(f.kind) if f.is_warning else f"{plain(f.kind)}, info"
                out.append(f"- [{tag}] {plain(f.message)}")
                for a in f.advice:
                    out.append(f"    * {plain(a)}")
        else:
            out.append("findings: none")
        if self.suppressed:
            out.append(f"({self.suppressed} repeated reports suppressed by the rate limit)")
        for err in self.internal_errors:
            out.append(f"gradwatch internal error (training continued): {plain(err)}")
        return "\n".join(out)


class LayerAggregate:
    """Constant-memory running summary per layer (long runs must not grow memory)."""

    def __init__(self, n_layers: int) -> None:
        self.last_grad = np.full(n_layers, np.nan)
        self.log_sum = np.zeros(n_layers)
        self.log_count = np.zeros(n_layers)
        self.update_ratio = np.full(n_layers, np.nan)
        self.weight_change = np.full(n_layers, np.nan)

    def add(self, stats) -> None:
        g = np.where(stats.has_grad, stats.grad_norm, np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.log(g)
        ok = np.isfinite(logs)
        self.log_sum += np.where(ok, logs, 0).sum(axis=0)
        self.log_count += ok.sum(axis=0)
        last = g[-1]
        self.last_grad = np.where(stats.has_grad[-1], last, self.last_grad)
        if stats.update_ratio is not None:
            self.update_ratio = np.where(np.isnan(stats.update_ratio), self.update_ratio,
                                         stats.update_ratio)
        if stats.weight_change is not None:
            self.weight_change = np.where(np.isnan(stats.weight_change), self.weight_change,
                                          stats.weight_change)

    def typical(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.log_count > 0, np.exp(self.log_sum / np.maximum(self.log_count, 1)),
                            np.nan)
