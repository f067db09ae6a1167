"""Plots of one run from its event file: gradient flow per layer, the loss with findings marked,
and how far each layer's weights moved. matplotlib is imported here, when a plot is drawn."""

from __future__ import annotations

import math
import os

import numpy as np

from ._events import RunLog

SHORT_KIND = {
    "vanishing_gradient": "vanishing",
    "exploding_gradient": "exploding",
    "nonfinite": "nonfinite",
    "loss_plateau": "plateau",
    "loss_divergence": "divergence",
    "stalled_update": "stalled",
    "large_update": "large_update",
    "dead_units": "dead_units",
    "saturated_units": "saturated",
}


def short_kind(kind: str) -> str:
    return SHORT_KIND.get(kind, kind)


def _label(text: object, limit: int = 40) -> str:
    """Text from an event file as a plain matplotlib label: no mathtext, bounded length."""
    s = "".join(c if c.isprintable() else "?" for c in str(text))
    if len(s) > limit:
        s = s[:limit - 1] + "…"
    return s.replace("$", r"\$")


def plot_run(run: RunLog, path: str | os.PathLike, *, title: str | None = None,
             subtitle: str | None = None) -> str:
    """Draw ``run`` into a PNG at ``path`` (1350 x 432 pixels) and return the path; the
    figure is :func:`draw_run`'s."""
    fig = draw_run(run, title=title, subtitle=subtitle)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


#: Size of the saved plot: inches, and dots per inch.
FIGSIZE, DPI = (15, 4.8), 90


def draw_run(run: RunLog, *, title: str | None = None, subtitle: str | None = None):
    """The figure of ``run`` (a matplotlib ``Figure``, not saved).

    Three panels: the gradient L2 norm of every layer at each check (log scale; lines from dark,
    input side, to light, output side), the loss at every step with each finding marked where
    it started, and each layer's weight change since the start (log scale).
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=FIGSIZE, layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=[1.25, 1.25, 0.8])
    ax_g, ax_l, ax_w = (fig.add_subplot(grid[0, i]) for i in range(3))
    _gradient_flow(ax_g, run)
    _loss(ax_l, run)
    _weight_change(ax_w, run)
    head = _label(title or f"{run.name or os.path.basename(run.path)} ({run.framework})", 120)
    if subtitle:
        head += "\n" + _label(subtitle, 160)
    fig.suptitle(head, fontsize=11)
    return fig


def _gradient_flow(ax, run: RunLog) -> None:
    from matplotlib import colormaps

    ax.set_title("gradient L2 norm per layer (log)", fontsize=10)
    ax.set_xlabel("optimizer step")
    n = len(run.layers)
    if run.check_steps.size == 0 or n == 0:
        ax.text(0.5, 0.5, "no statistics in the event file", ha="center", transform=ax.transAxes)
        return
    cmap = colormaps["viridis"]
    labelled = set(range(n)) if n <= 12 else {0, n // 2, n - 1}
    # A run that blew up has few finite points: draw them, or a lone point is invisible.
    sparse = np.isfinite(run.grad_norm).all(axis=1).sum() < 20
    for i in range(n):
        g = run.grad_norm[:, i].astype(float)
        g = np.where(np.isfinite(g) & (g > 0), g, np.nan)
        color = cmap(0.9 * i / max(n - 1, 1))
        label = _label(run.layers[i], 24) if i in labelled else None
        ax.plot(run.check_steps, g, color=color, lw=2.2 if i in (0, n - 1) else 1.1, label=label,
                marker="o" if sparse else None, ms=4)
    if np.isfinite(np.where(run.grad_norm > 0, run.grad_norm, np.nan)).any():
        ax.set_yscale("log")
    bad = ~np.isfinite(run.grad_norm).all(axis=1)
    if bad.any():
        ax.axvline(run.check_steps[bad][0], color="crimson", ls=":", lw=1.2)
        ax.text(run.check_steps[bad][0], 0.02, " NaN/Inf", color="crimson", fontsize=8,
                transform=ax.get_xaxis_transform())
    ax.legend(fontsize=7, ncol=2 if len(labelled) > 6 else 1, loc="best",
              title="input side → output" if n > 1 else None, title_fontsize=7)
    ax.grid(True, which="major", alpha=0.3)


def _loss(ax, run: RunLog) -> None:
    ax.set_title("training loss, findings where they started", fontsize=10)
    ax.set_xlabel("optimizer step")
    steps, loss = run.loss_steps, run.loss
    finite = np.isfinite(loss)
    if steps.size:
        ax.plot(steps[finite], loss[finite], color="0.35", lw=0.8)
        if finite.any():
            lo, hi = np.min(loss[finite]), np.max(loss[finite])
            if lo > 0 and hi / lo > 50:
                ax.set_yscale("log")
        if (~finite).any():
            ax.axvline(steps[~finite][0], color="crimson", ls=":", lw=1.2)
    else:
        ax.text(0.5, 0.5, "no loss in the event file", ha="center", transform=ax.transAxes)
    colors = {"vanishing_gradient": "tab:blue", "exploding_gradient": "tab:red",
              "nonfinite": "crimson", "loss_plateau": "tab:orange",
              "loss_divergence": "tab:purple", "dead_units": "tab:brown",
              "saturated_units": "tab:olive"}
    for row, f in enumerate(run.findings):
        color = colors.get(f.kind, "tab:gray")
        ax.axvline(f.step, color=color, ls="--", lw=1)
        row %= 8  # stacked, so findings close together stay readable
        where = f" {_label(f.layer, 16)}" if f.layer is not None else ""
        ax.text(f.step, 0.97 - 0.07 * row, f" {short_kind(f.kind)}{where}", color=color,
                fontsize=8, va="top", transform=ax.get_xaxis_transform())
    ax.grid(True, alpha=0.3)


def _weight_change(ax, run: RunLog) -> None:
    ax.set_title("weight change since the start (%, log)", fontsize=10)
    n = len(run.layers)
    if run.weight_change is None or n == 0:
        ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    pct = 100 * np.asarray(run.weight_change, dtype=float)
    floor = 1e-6
    shown = np.where(np.isfinite(pct), np.maximum(pct, floor), floor)
    y = np.arange(n)[::-1]
    ax.barh(y, shown, color=["0.6" if not math.isfinite(p) else "tab:blue" for p in pct],
            height=0.7)
    ax.set_xscale("log")
    ax.set_xlim(floor / 2, max(100.0, float(np.nanmax(shown)) * 3))
    ax.set_yticks(y, [_label(name, 18) for name in run.layers],
                  fontsize=7 if n > 12 else 8)
    for yi, p, s in zip(y, pct, shown):
        text = "NaN" if not math.isfinite(p) else f"{p:.2g}%"
        ax.text(s * 1.3, yi, text, va="center", fontsize=6.5 if n > 12 else 7.5)
    ax.grid(True, axis="x", alpha=0.3)
