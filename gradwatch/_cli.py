"""The ``gradwatch`` command line: ``demo``, ``experiments list|run``, ``report``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .experiments import (
    DEFAULT,
    SETTINGS,
    Experiment,
    ExperimentRunner,
    RunRecord,
    RunResult,
    Settings,
    experiment_runners,
)

if TYPE_CHECKING:
    from ._events import RunLog

DEFAULT_OUT = "gradwatch-demo"


# -- frameworks ------------------------------------------------------------------------------


def _runners(choice: str, found: Mapping[str, ExperimentRunner]
             ) -> tuple[list[ExperimentRunner], list[str]]:
    """(runners to use, notes about those skipped): every available one for ``"all"``."""
    wanted = list(found) if choice == "all" else [choice]
    use, notes = [], []
    for fw in wanted:
        why = found[fw].unavailable()
        if why is None:
            use.append(found[fw])
        else:
            notes.append(f"skipping {fw}: {why}")
    return use, notes


# -- running experiments ---------------------------------------------------------------------


def _machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def run_experiments(experiments: Sequence[Experiment], runners: Sequence[ExperimentRunner],
                    out: str, *, settings: Sequence[Settings] = (DEFAULT,),
                    verbose: bool = False, command: str = "gradwatch demo") -> int:
    """Run every experiment in every runner's framework under every settings, print progress
    and the table, write the results; 0 when every run met its expected verdict, 1 when one did
    not, 2 when no runner's framework could be loaded."""
    from gradwatch import __version__
    from gradwatch._plots import short_kind
    from gradwatch._results import plain
    from gradwatch.experiments._results import LEGEND, format_table, write_results

    os.makedirs(os.path.join(out, "events"), exist_ok=True)
    begin = time.perf_counter()
    print(f"gradwatch reference experiments: {len(experiments)} experiment(s) x "
          f"{len(runners)} framework(s) ({', '.join(r.framework for r in runners)}) x "
          f"{len(settings)} settings ({', '.join(s.name for s in settings)}); writing to {out}/",
          flush=True)
    versions = [f"gradwatch {__version__}", f"numpy {_version('numpy')}"]
    loaded = []
    for runner in runners:
        print(f"loading {runner.framework} ...", flush=True)
        try:
            versions.append(runner.versions())
        except Exception as exc:  # an installed but broken framework: run the others
            print(f"skipping {runner.framework}: it failed to load "
                  f"({type(exc).__name__}: {plain(exc)})", file=sys.stderr)
            continue
        loaded.append(runner)
    runners = loaded
    if not runners:
        print("gradwatch: no framework could be loaded", file=sys.stderr)
        return 2
    total = len(experiments) * len(runners) * len(settings)
    records: list[RunRecord] = []
    n = 0
    for exp in experiments:
        for runner in runners:
            for s in settings:
                n += 1
                rec, run = _run_one(exp, runner, s, out, f"[{n:>2}/{total}]")
                if run is not None:
                    rec = _plot(rec, run, out)
                records.append(rec)
                seconds = f"{rec.seconds:.1f}s" if rec.seconds is not None else "-"
                observed = ", ".join(short_kind(k) for k in rec.kinds) or "no findings"
                print(f"{'PASS' if rec.passed else 'FAIL'} {seconds:>6}  {plain(observed)}"
                      + "".join(f"\n        {plain(p)}" for p in rec.problems), flush=True)
                if verbose and rec.result is not None:
                    print("\n" + plain(str(rec.result.report), lines=True) + "\n")
    wall = time.perf_counter() - begin
    meta = {"command": command, "versions": ", ".join(versions), "machine": _machine(),
            "settings": {s.name: s.description for s in settings},
            "wall_seconds": wall, "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    json_path, md_path = write_results(out, meta, records, experiments)
    print()
    print(format_table(records))
    print(LEGEND)
    failed = [r for r in records if not r.passed]
    print(f"\n{len(records)} runs in {wall:.1f} s. Results: {json_path}, {md_path}, "
          f"plots and event files in {out}/")
    if failed:
        print(f"{len(failed)} of {len(records)} runs did NOT meet their expected verdict: "
              + ", ".join(f"{r.experiment.name} ({r.label}, {r.settings.name})"
                          for r in failed))
        return 1
    print(f"All {len(records)} runs met their expected verdict.")
    return 0


def _run_one(exp: Experiment, runner: ExperimentRunner, settings: Settings, out: str,
             counter: str) -> tuple[RunRecord, RunLog | None]:
    """One run, judged; with the run read back from its event file (``None`` if it has none)."""
    from gradwatch._events import read_runs

    stem = f"{exp.name}-{runner.framework}-{settings.name}"
    events = os.path.join(out, "events", stem + ".jsonl")
    if os.path.exists(events):
        os.remove(events)  # the sink appends; a rerun starts a fresh file
    print(f"{counter} {exp.name:<24} {runner.label:<11} {settings.name:<7} ...", end=" ",
          flush=True)
    result: RunResult | None = None
    error = None
    try:
        result = runner.run(exp, events, settings)
    except Exception as exc:  # one broken run must not hide the others' results
        error = f"{type(exc).__name__}: {exc}"
    run = None
    try:
        runs = read_runs(events) if os.path.exists(events) else []
        run = runs[-1] if runs else None
    except ValueError as exc:
        error = error or str(exc)
    rec = RunRecord.of(exp, settings, framework=runner.framework, label=runner.label,
                       result=result, error=error, run=run, events=os.path.relpath(events, out))
    return rec, run


def _plot(rec: RunRecord, run: RunLog, out: str) -> RunRecord:
    from gradwatch._plots import plot_run

    exp = rec.experiment
    stem = os.path.splitext(os.path.basename(rec.events))[0]
    plot = plot_run(run, os.path.join(out, stem + ".png"),
                    title=f"{exp.name} ({rec.label}, {rec.settings.name} settings): {exp.title}",
                    subtitle=f"expected: {exp.expected}; observed: "
                             f"{', '.join(rec.kinds) or 'none'} -> "
                             f"{'PASS' if rec.passed else 'FAIL'}")
    return dataclasses.replace(rec, plot=os.path.relpath(plot, out))


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return "?"


def _demo(args: argparse.Namespace) -> int:
    from gradwatch.experiments import select, select_settings

    try:
        experiments = select(args.only)
    except KeyError as exc:
        print(f"gradwatch: {exc.args[0]}", file=sys.stderr)
        return 2
    found = args.runners
    if args.framework != "all" and args.framework not in found:
        print(f"gradwatch: no experiment runner for framework {args.framework!r}; available: "
              f"{', '.join(found) or 'none (no installed plugin provides one)'}", file=sys.stderr)
        return 2
    runners, notes = _runners(args.framework, found)
    for note in notes:
        print(note, file=sys.stderr)
    if not runners:
        print("gradwatch: no framework to run the experiments with; install PyTorch "
              "(pip install torch) or Keras (pip install -e '.[keras]')", file=sys.stderr)
        return 2
    command = "gradwatch " + " ".join(shlex.quote(a) for a in args.argv)
    return run_experiments(experiments, runners, args.out,
                           settings=select_settings(args.settings), verbose=args.verbose,
                           command=command)


def _experiments_list(args: argparse.Namespace) -> int:
    from gradwatch.experiments import EXPERIMENTS, describe

    print(describe(EXPERIMENTS))
    print("\nRun one with `gradwatch experiments run NAME`, a group with its name, all with "
          "`gradwatch demo`.")
    return 0


def _experiments_run(args: argparse.Namespace) -> int:
    args.only = args.names
    return _demo(args)


def _report(args: argparse.Namespace) -> int:
    from gradwatch._events import read_runs
    from gradwatch._plots import plot_run
    from gradwatch._results import plain, run_summary_markdown, run_summary_text

    try:
        runs = read_runs(args.events)
    except OSError as exc:
        print(f"gradwatch report: cannot read {plain(args.events)}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"gradwatch report: {plain(exc)}", file=sys.stderr)
        return 2
    if not runs:
        print(f"gradwatch report: {plain(args.events)} holds no events", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.events))[0] or "events"
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    parts = [f"# gradwatch report: {_md_name(args.events)}", ""]
    if runs[-1].truncated:
        parts += ["The last line of the file was truncated (the run was probably killed) and "
                  "was skipped.", ""]
    for i, run in enumerate(runs):
        name = stem if len(runs) == 1 else f"{stem}-{i + 1}"
        plot = plot_run(run, os.path.join(args.out, name + ".png"))
        print(run_summary_text(run))
        print(f"plot: {plot}\n")
        parts.append(run_summary_markdown(run, os.path.basename(plot)))
    summary = os.path.join(args.out, "summary.md")
    with open(summary, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
    print(f"summary: {summary}")
    return 0


def _md_name(path: str) -> str:
    from gradwatch._results import md

    return md(os.path.basename(path))


# -- argument parsing ------------------------------------------------------------------------


def _add_run_options(p: argparse.ArgumentParser, frameworks: Sequence[str]) -> None:
    p.add_argument("--framework", default="all", metavar="NAME",
                   help=f"which framework to run: {', '.join(frameworks) or 'none found'} (the "
                        f"plugins' experiment runners), or 'all' for every one that can run "
                        f"here (default: all)")
    p.add_argument("--settings", choices=("all",) + tuple(s.name for s in SETTINGS),
                   default=DEFAULT.name,
                   help="how gradwatch watches each run: 'default' (what users get: sampled "
                        "update ratios), 'exact' (update ratios from every weight) or 'all' "
                        "(both, twice the time) (default: default)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where results.json, results.md, plots and event files go "
                        f"(default: ./{DEFAULT_OUT}/)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each run's gradwatch report (findings with advice)")


def build_parser(frameworks: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``gradwatch`` argument parser; ``frameworks`` only fill in the help text (parsing
    it imports no framework and runs nothing, so the docs' commands are checked against it)."""
    from gradwatch import __version__

    parser = argparse.ArgumentParser(prog="gradwatch", description=(
        "Watches neural-network training for vanishing/exploding gradients, loss plateaus and "
        "divergence, stalled updates, dead and saturated units."))
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the reference experiments, print the comparison "
                                       "table, write results and plots")
    _add_run_options(demo, frameworks)
    demo.add_argument("--only", action="append", metavar="NAME",
                      help="run only this experiment or group (repeatable, or a comma list)")
    demo.set_defaults(func=_demo)

    exps = sub.add_parser("experiments", help="list the reference experiments or run some")
    exp_sub = exps.add_subparsers(dest="action", required=True)
    exp_sub.add_parser("list", help="list every experiment and its expected verdict") \
        .set_defaults(func=_experiments_list)
    run = exp_sub.add_parser("run", help="run experiments by name or group")
    run.add_argument("names", nargs="+", metavar="NAME")
    _add_run_options(run, frameworks)
    run.set_defaults(func=_experiments_run, verbose=True)

    report = sub.add_parser("report", help="plots and a summary from the JSONL event file of "
                                           "any run (events=...)")
    report.add_argument("events", metavar="EVENTS.jsonl")
    report.add_argument("--out", default="gradwatch-report", metavar="DIR",
                        help="where the plots and summary.md go (default: ./gradwatch-report/)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runners = experiment_runners()  # the plugins' frameworks; none is imported
    parser = build_parser(list(runners))
    args = parser.parse_args(argv)
    args.argv = argv
    args.runners = runners
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
