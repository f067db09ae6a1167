"""The ``gradwatch`` command line: ``demo``, ``experiments list|run``, ``report``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

FRAMEWORKS = ("torch", "keras")
DEFAULT_OUT = "gradwatch-demo"


# -- frameworks ------------------------------------------------------------------------------


def _keras_backend() -> str:
    backend = os.environ.get("KERAS_BACKEND")
    if backend:
        return backend
    config = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")),
                          "keras.json")
    try:
        import json

        with open(config, encoding="utf-8") as fh:
            return str(json.load(fh).get("backend", "tensorflow"))
    except (OSError, ValueError, AttributeError):
        return "tensorflow"


def _unavailable(framework: str) -> str | None:
    """Why ``framework`` cannot run here, or None when it can (checked without importing it)."""
    if framework == "torch":
        if importlib.util.find_spec("torch") is None:
            return "PyTorch is not installed (pip install torch)"
        return None
    if importlib.util.find_spec("keras") is None:
        return "Keras is not installed (pip install -e '.[keras]')"
    backend = _keras_backend()
    if backend == "jax":
        return "the Keras callback does not support the JAX backend yet"
    if importlib.util.find_spec(backend) is None:
        return f"Keras' backend {backend!r} is not installed"
    return None


def _frameworks(choice: str) -> tuple[list[str], list[str]]:
    """(frameworks to run, notes about the ones skipped)."""
    wanted = FRAMEWORKS if choice == "all" else (choice,)
    run, notes = [], []
    for fw in wanted:
        why = _unavailable(fw)
        if why is None:
            run.append(fw)
        else:
            notes.append(f"skipping {fw}: {why}")
    return run, notes


def _adapter(framework: str) -> Any:
    if framework == "keras":
        # TensorFlow's C++ start-up chatter is not part of the demo's output.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return importlib.import_module("gradwatch_keras.experiments")
    return importlib.import_module("gradwatch_torch.experiments")


# -- running experiments ---------------------------------------------------------------------


def _machine() -> str:
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}")


def run_experiments(experiments: Sequence[Any], frameworks: Sequence[str], out: str, *,
                    verbose: bool = False, command: str = "gradwatch demo") -> int:
    """Run every experiment in every framework, print progress and the table, write the
    results; 0 when every run met its expected verdict, else 1."""
    from gradwatch import __version__
    from gradwatch._events import read_runs
    from gradwatch._plots import plot_run, short_kind
    from gradwatch._results import (
        LEGEND,
        format_table,
        framework_label,
        plain,
        record,
        write_results,
    )

    os.makedirs(os.path.join(out, "events"), exist_ok=True)
    begin = time.perf_counter()
    print(f"gradwatch reference experiments: {len(experiments)} experiment(s) x "
          f"{len(frameworks)} framework(s) ({', '.join(frameworks)}); writing to {out}/",
          flush=True)
    adapters, versions = {}, [f"gradwatch {__version__}", f"numpy {_version('numpy')}"]
    for fw in frameworks:
        print(f"loading {fw} ...", flush=True)
        adapters[fw] = _adapter(fw)
        versions.append(adapters[fw].versions())
    total = len(experiments) * len(frameworks)
    records: list[dict[str, Any]] = []
    n = 0
    for exp in experiments:
        for fw in frameworks:
            n += 1
            stem = f"{exp.name}-{fw}"
            events = os.path.join(out, "events", stem + ".jsonl")
            if os.path.exists(events):
                os.remove(events)  # the sink appends; a rerun starts a fresh file
            label = framework_label(fw, _keras_backend() if fw == "keras" else None)
            print(f"[{n:>2}/{total}] {exp.name:<24} {label:<11} ...", end=" ", flush=True)
            try:
                raw = adapters[fw].run(exp, events)
            except Exception as exc:  # one broken run must not hide the others' results
                raw = {"framework": fw, "error": f"{type(exc).__name__}: {exc}",
                       "findings": [], "final_loss": None, "final_accuracy": None,
                       "seconds": None}
            run = None
            try:
                runs = read_runs(events) if os.path.exists(events) else []
                run = runs[-1] if runs else None
            except ValueError as exc:
                raw.setdefault("error", str(exc))
            plot = None
            r = record(exp, raw, run, events=os.path.relpath(events, out), plot=None)
            if run is not None:
                verdict = "PASS" if r["passed"] else "FAIL"
                plot = plot_run(run, os.path.join(out, stem + ".png"),
                                title=f"{exp.name} ({r['label']}): {exp.title}",
                                subtitle=f"expected: {exp.expected}; observed: "
                                         f"{', '.join(r['kinds']) or 'none'} -> {verdict}")
                r["plot"] = os.path.relpath(plot, out)
            records.append(r)
            seconds = f"{r['seconds']:.1f}s" if r["seconds"] is not None else "-"
            observed = ", ".join(short_kind(k) for k in r["kinds"]) or "no findings"
            print(f"{'PASS' if r['passed'] else 'FAIL'} {seconds:>6}  {plain(observed)}"
                  + "".join(f"\n        {plain(p)}" for p in r["problems"]), flush=True)
            if verbose and raw.get("report"):
                print("\n" + plain(raw["report"], lines=True) + "\n")
    wall = time.perf_counter() - begin
    meta = {"command": command, "versions": ", ".join(versions), "machine": _machine(),
            "wall_seconds": wall, "created": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    json_path, md_path = write_results(out, meta, records, experiments)
    print()
    print(format_table(records))
    print(LEGEND)
    failed = [r for r in records if not r["passed"]]
    print(f"\n{len(records)} runs in {wall:.1f} s. Results: {json_path}, {md_path}, "
          f"plots and event files in {out}/")
    if failed:
        print(f"{len(failed)} of {len(records)} runs did NOT meet their expected verdict: "
              + ", ".join(f"{r['experiment']} ({r['label']})" for r in failed))
        return 1
    print(f"All {len(records)} runs met their expected verdict.")
    return 0


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return "?"


def _select(names: Sequence[str] | None) -> list[Any]:
    from gradwatch._experiments import select

    return select(names)


def _demo(args: argparse.Namespace) -> int:
    try:
        experiments = _select(args.only)
    except KeyError as exc:
        print(f"gradwatch: {exc.args[0]}", file=sys.stderr)
        return 2
    frameworks, notes = _frameworks(args.framework)
    for note in notes:
        print(note, file=sys.stderr)
    if not frameworks:
        print("gradwatch: no framework to run the experiments with; install PyTorch "
              "(pip install torch) or Keras (pip install -e '.[keras]')", file=sys.stderr)
        return 2
    command = "gradwatch " + " ".join(shlex.quote(a) for a in args.argv)
    return run_experiments(experiments, frameworks, args.out, verbose=args.verbose,
                           command=command)


def _experiments_list(args: argparse.Namespace) -> int:
    from gradwatch._experiments import EXPERIMENTS, describe

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


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--framework", choices=("all",) + FRAMEWORKS, default="all",
                   help="which framework(s) to run; 'all' runs those installed (default: all)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"where results.json, results.md, plots and event files go "
                        f"(default: ./{DEFAULT_OUT}/)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each run's gradwatch report (findings with advice)")


def main(argv: list[str] | None = None) -> int:
    from gradwatch import __version__

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="gradwatch", description=(
        "Watches neural-network training for vanishing/exploding gradients, loss plateaus and "
        "divergence, stalled updates, dead and saturated units."))
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the reference experiments, print the comparison "
                                       "table, write results and plots")
    _add_run_options(demo)
    demo.add_argument("--only", action="append", metavar="NAME",
                      help="run only this experiment or group (repeatable, or a comma list)")
    demo.set_defaults(func=_demo)

    exps = sub.add_parser("experiments", help="list the reference experiments or run some")
    exp_sub = exps.add_subparsers(dest="action", required=True)
    exp_sub.add_parser("list", help="list every experiment and its expected verdict") \
        .set_defaults(func=_experiments_list)
    run = exp_sub.add_parser("run", help="run experiments by name or group")
    run.add_argument("names", nargs="+", metavar="NAME")
    _add_run_options(run)
    run.set_defaults(func=_experiments_run, verbose=True)

    report = sub.add_parser("report", help="plots and a summary from the JSONL event file of "
                                           "any run (events=...)")
    report.add_argument("events", metavar="EVENTS.jsonl")
    report.add_argument("--out", default="gradwatch-report", metavar="DIR",
                        help="where the plots and summary.md go (default: ./gradwatch-report/)")
    report.set_defaults(func=_report)

    args = parser.parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
