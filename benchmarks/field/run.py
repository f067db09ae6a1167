"""Run the field suite: ``python -m benchmarks.field.run [--only NAME ...] [--seeds 0 1]
[--truth] [--out DIR]``.

Prints one row per scenario and seed (truth check, verdict, warning findings, time), then each
warning finding in full (message and advice), crashes and gradwatch internal warnings, and with
``--truth`` the raw evidence behind every label. Writes ``DIR/results.json`` (every result in
full, raw evidence included). Exit status: 0 when every run passed, 1 otherwise, 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

from . import scenarios as sc


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _table(results: list[sc.ScenarioResult]) -> str:
    rows = [("scenario", "seed", "label", "truth", "pass", "warnings", "info", "s")]
    for r in results:
        passed, _ = r.verdict
        rows.append((r.name, str(r.seed), r.label, "ok" if r.truth_ok else "NO",
                     "PASS" if passed else ("SKIP" if r.skipped else "FAIL"),
                     ", ".join(f.short() for f in r.warnings) or "-",
                     str(len(r.infos)), f"{r.seconds:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    widths[5] = min(widths[5], 70)
    out = []
    for k, row in enumerate(rows):
        cells = [c if i != 5 or len(c) <= 70 else c[:67] + "..." for i, c in enumerate(row)]
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _details(r: sc.ScenarioResult) -> list[str]:
    lines = [f"== {r.name} seed {r.seed}: {r.verdict[1]}"]
    if r.skipped:
        return lines
    if r.crash:
        tail = [ln for ln in r.crash.strip().splitlines() if ln.strip()][-4:]
        lines.append("  CRASH:")
        lines += ["    " + ln for ln in tail]
    for w in r.internal_warnings:
        lines.append(f"  GradWatchInternalWarning: {w}")
    for f in r.findings:
        lines.append(f"  [{f.severity}] {f.kind} step {f.step} layer {f.layer!r}")
        lines.append(f"    message: {f.message}")
        if f.advice:
            lines.append("    advice: " + " | ".join(f.advice))
    lines.append(f"  truth: {'ok' if r.truth_ok else 'NO'}: {r.truth_reason}")
    return lines


def _evidence(r: sc.ScenarioResult) -> list[str]:
    ev = r.evidence
    if not ev.losses:
        return ["  (no steps recorded)"]
    n = ev.steps
    marks = sorted({1, 2, 3, 5, 10, 20} | set(range(0, n + 1, max(n // 12, 1))) - {0})
    marks = [m for m in marks if m <= n] + ([n] if n not in marks else [])
    lines = [f"  steps {n}; loss first {_fmt(ev.first_loss)} initial(5) {_fmt(ev.initial_loss)} "
             f"final(20) {_fmt(ev.final_loss)} ratio {_fmt(ev.final_over_initial)}; non-finite "
             f"at {ev.nonfinite_step}",
             "  loss: " + " ".join(f"{m}:{_fmt(ev.losses[m - 1])}" for m in marks)]
    med = ev.median_grad_norms()
    if med:
        ratio, first, largest = ev.first_to_largest()
        lines.append(f"  median grad L2 per layer (every {ev.grad_every} steps, from p.grad): "
                     + ", ".join(f"{k}={v:.3g}" for k, v in med.items()))
        lines.append(f"  first/largest: {first} / {largest} = {_fmt(ratio)}; max total |g| "
                     f"{_fmt(ev.max_grad_norm())}")
        totals = ev.total_grad_norms()
        lines.append("  total |g| by step: " + " ".join(
            f"{s}:{v:.3g}" for s, v in list(totals.items())[:: max(len(totals) // 12, 1)]))
    if ev.update_ratios:
        ups = [v for row in ev.update_ratios.values() for v in row.values()]
        lines.append(f"  one-step update ratios: min {min(ups):.3g} median "
                     f"{sorted(ups)[len(ups) // 2]:.3g} max {max(ups):.3g}")
    if ev.dead_fractions:
        lines.append("  dead ReLU fraction by step: " + " ".join(
            f"{s}:{max(row.values()):.2f}" for s, row in sorted(ev.dead_fractions.items())
            if row))
    extra = {k: v for k, v in ev.extra.items() if k != "data_grad_norms"}
    if extra:
        lines.append("  extra: " + json.dumps(sc._jsonable(extra), default=str))
    return lines


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    names = [s.name for s in sc.SCENARIOS]
    p = argparse.ArgumentParser(prog="python -m benchmarks.field.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="scenarios to run: "
                   + ", ".join(names))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], metavar="SEED")
    p.add_argument("--truth", action="store_true", help="print the raw evidence of each run")
    p.add_argument("--out", default="gradwatch-field", help="directory for results.json")
    return p


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in sc.SCENARIOS]
    p = parser()
    args = p.parse_args(argv)
    if args.only:
        unknown = [n for n in args.only if n not in names]
        if unknown:
            p.error(f"--only: unknown scenario(s) {', '.join(unknown)}; known: "
                    f"{', '.join(names)}")
    chosen = [s for s in sc.SCENARIOS if not args.only or s.name in args.only]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results: list[sc.ScenarioResult] = []
    t0 = time.perf_counter()
    for s in chosen:
        for seed in args.seeds:
            r = sc.run_scenario(s, seed)
            results.append(r)
            print(f"{s.name} seed {seed}: {'PASS' if r.passed else 'FAIL'} ({r.verdict[1]}) "
                  f"{r.seconds:.1f}s", flush=True)
    total = time.perf_counter() - t0

    print()
    print(_table(results))
    print()
    for r in results:
        print("\n".join(_details(r)))
        if args.truth:
            print("\n".join(_evidence(r)))
    passed = sum(r.passed for r in results)
    print(f"\n{passed}/{len(results)} passed in {total:.0f}s; results in {out / 'results.json'}")
    (out / "results.json").write_text(json.dumps({
        "seeds": args.seeds, "seconds": round(total, 1), "passed": passed,
        "runs": [r.to_dict() for r in results]}, indent=1))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
