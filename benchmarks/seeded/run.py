"""Run the seeded-bug benchmark and print gradwatch's recall, false alarms and precision.

    python -m benchmarks.seeded.run --framework torch|keras|all --seeds 0 1 2 [--quick]
                                    [--truth] [--families F ...] [--variants V ...] [--out DIR]

Per framework it prints, per family, how many buggy runs got a warning-severity finding of an
accepted kind (recall), how many healthy runs got any warning-severity finding (false alarms),
and precision (runs with a true warning / runs with any warning); then every miss, false alarm,
mislabelled run and error with gradwatch's full messages and the raw evidence. Everything is
written to ``DIR/results.json``.

``--quick`` is the subset the test runs: only the first seed given (every family and variant,
with and without L2, the full step budgets). ``--truth`` trains without gradwatch and only checks
every run's label against the raw evidence.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence

# One thread per framework, set before either starts (both read these at start-up).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from . import families as fm  # noqa: E402

FRAMEWORKS = ("torch", "keras")


def _runner(framework: str):
    if framework == "torch":
        from . import torch_models

        return torch_models
    from . import keras_models

    return keras_models


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def score_table(scores: Sequence[fm.Score]) -> str:
    head = (f"{'framework':<9} {'family':<22} {'runs':>4} {'buggy':>5} {'hits':>4} {'recall':>6} "
            f"{'healthy':>7} {'false':>5} {'precision':>9} {'mislab':>6} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for s in scores:
        lines.append(f"{s.framework:<9} {s.group:<22} {s.runs:>4} {s.buggy:>5} {s.hits:>4} "
                     f"{_pct(s.recall):>6} {s.healthy:>7} {s.false_alarms:>5} "
                     f"{_pct(s.precision):>9} {s.mislabelled:>6} {s.errors:>6}")
    return "\n".join(lines)


def _numbers(t: fm.TruthNumbers | None) -> str:
    if t is None:
        return "no evidence"
    tr = "" if t.train_ratio_median is None else f", p.grad first/largest {t.train_ratio_median:.2g}"
    return (f"loss {t.start_loss:.4g} -> {t.final_loss:.4g} (chance {t.chance_loss:.4g}, accuracy "
            f"{t.final_accuracy:.3f}, below 0.9x chance from step {t.learn_step}); data-gradient first/largest {t.ratio_median:.2g} "
            f"(first {t.first_norm_median:.2g}, largest {t.largest_norm_median:.2g}); with "
            f"penalty {t.total_ratio_median:.2g} (first {t.total_first_norm_median:.2g}){tr}; "
            f"dead max {100 * t.final_dead_max:.0f}% ({t.final_dead_layer}); max loss "
            f"{t.max_loss:.3g}, max grad {t.max_grad:.3g}, non-finite {t.nonfinite}")


def details(runs: Sequence[fm.RunResult]) -> str:
    """Every run that is not a plain hit or clean: its findings in full and its evidence."""
    lines = []
    for r in runs:
        if r.outcome in ("hit", "clean", "label_ok") and not r.internal:
            continue
        lines.append(f"[{r.outcome}] {r.framework} {r.name}")
        lines.append(f"    truth: {r.truth.reason}")
        lines.append(f"    evidence: {_numbers(r.truth.numbers)}")
        if r.truth.accepted:
            lines.append(f"    accepted kinds: {', '.join(r.truth.accepted)}")
        for f in r.findings:
            lines.append(f"    {f.severity} {f.kind} @ step {f.step} ({f.layer}): {f.message}")
        if not r.findings and r.watched:
            lines.append("    (no findings)")
        for msg in r.internal:
            lines.append(f"    INTERNAL: {msg}")
        if r.error:
            lines.append("    ERROR: " + r.error.strip().replace("\n", "\n    "))
    return "\n".join(lines)


def _run_line(r: fm.RunResult) -> str:
    warn = ",".join(r.warning_kinds) or "-"
    info = ",".join(sorted({f.kind for f in r.findings if f.severity != "warning"})) or "-"
    return (f"{r.framework:<6} {r.name:<48} {r.outcome:<11} warnings: {warn:<40} info: {info:<28} "
            f"{r.seconds:5.1f}s")


def run(frameworks: Sequence[str], specs: Sequence[fm.ModelSpec], watch: bool = True,
        out=sys.stdout) -> tuple[list[fm.RunResult], dict[str, float], dict[str, str]]:
    runs: list[fm.RunResult] = []
    seconds: dict[str, float] = {}
    versions: dict[str, str] = {}
    for fw in frameworks:
        runner = _runner(fw)
        versions[fw] = runner.versions()
        start = time.perf_counter()
        for spec in specs:
            r = runner.run(spec, watch=watch)
            runs.append(r)
            print(_run_line(r), file=out, flush=True)
        seconds[fw] = time.perf_counter() - start
    return runs, seconds, versions


def results_json(runs: Sequence[fm.RunResult], seconds: dict[str, float],
                 versions: dict[str, str], args: dict) -> dict:
    scores = fm.scores(runs)
    return fm.json_safe({
        "args": args,
        "versions": versions,
        "seconds": seconds,
        "families": [dataclasses.asdict(f) for f in fm.FAMILIES],
        "scores": [dict(dataclasses.asdict(s), recall=s.recall, precision=s.precision,
                        false_alarm_rate=s.false_alarm_rate) for s in scores],
        "runs": [dict(dataclasses.asdict(r), outcome=r.outcome, warning_kinds=r.warning_kinds,
                      detected=r.detected) for r in runs],
    })


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.seeded.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--framework", choices=FRAMEWORKS + ("all",), default="all")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true",
                    help="the CI subset: only the first seed given")
    ap.add_argument("--truth", action="store_true",
                    help="train without gradwatch; only check the labels against raw evidence")
    ap.add_argument("--families", nargs="+", metavar="F", help=f"only these: {list(fm.FAMILY)}")
    ap.add_argument("--variants", nargs="+", metavar="V", help="only these variants")
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("seeded-results"))
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    seeds = args.seeds[:1] if args.quick else args.seeds
    try:
        specs = fm.specs(seeds, args.families, args.variants)
    except KeyError as e:
        ap.error(str(e.args[0]))
    frameworks = FRAMEWORKS if args.framework == "all" else (args.framework,)
    print(f"seeded benchmark: {len(specs)} runs per framework ({', '.join(frameworks)}), seeds "
          f"{seeds}{', without gradwatch (--truth)' if args.truth else ''}", flush=True)
    runs, seconds, versions = run(frameworks, specs, watch=not args.truth)
    print()
    if not args.truth:
        print(score_table(fm.scores(runs)))
        print()
    else:
        bad = [r for r in runs if r.outcome in ("mislabelled", "error")]
        print(f"labels: {len(runs) - len(bad)} of {len(runs)} runs borne out by the raw evidence")
    text = details(runs)
    if text:
        print(text)
        print()
    for fw, s in seconds.items():
        print(f"{fw}: {versions[fw]}, {s:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    record = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    path.write_text(json.dumps(results_json(runs, seconds, versions, record), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
