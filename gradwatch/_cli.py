"""The ``gradwatch`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("gradwatch demo needs PyTorch: pip install 'gradwatch[torch]'", file=sys.stderr)
        return 2
    from gradwatch_torch import demo

    print("gradwatch demo (preview): the full reference experiments are not in yet; this runs "
          "the deep-sigmoid failure and its ReLU + He repair on the moons data set.\n")
    results = []
    for name in demo.CASES:
        print(f"running {name} ...", flush=True)
        r = demo.run_case(name)
        results.append(r)
        if args.verbose:
            print(r["report"], "\n")
    print(f"\n{'experiment':<14} {'findings':<48} {'loss':>6} {'acc':>6} {'time':>6}  verdict")
    for r in results:
        print(f"{r['name']:<14} {', '.join(r['findings']) or 'none':<48} {r['loss']:>6.3f} "
              f"{r['accuracy']:>6.1%} {r['seconds']:>5.1f}s  {'PASS' if r['pass'] else 'FAIL'}")
    return 0 if all(r["pass"] for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    from gradwatch import __version__

    parser = argparse.ArgumentParser(prog="gradwatch", description=(
        "Watches neural-network training for vanishing/exploding gradients, loss plateaus and "
        "divergence, stalled updates, dead and saturated units."))
    parser.add_argument("--version", action="version", version=f"gradwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the reference experiments and print the verdicts")
    demo.add_argument("-v", "--verbose", action="store_true", help="print each run's report")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
