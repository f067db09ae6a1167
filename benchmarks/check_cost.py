"""Where a check's time goes on the PyTorch MLP, and the kernel choices behind the hot path.

    python benchmarks/check_cost.py

Part 0 times the pieces of a check where they run, inside training (wall-clock medians over the
run's checks, the per-step recording too). Part 1 trains the benchmark MLP (one torch thread) with the default settings, keeps the
StepStats of each check, then replays them through a fresh ``Monitor.check`` and through each
detector alone (process CPU time, median of ``--repeats`` passes). Part 2 times the kernels
docs/performance.md compares: max |g| by inf-norm vs ``aminmax``, and dead units by ``any(y > 0)``
vs a sum over the batch.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from gradwatch import Monitor

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import torch_overhead as bench  # noqa: E402


def per_call_us(fn, calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) / calls * 1e6)
    return statistics.median(times)


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    return p


def timed(obj, name: str, label: str, times: dict[str, list[float]]) -> None:
    """Wrap ``obj.name`` so that each call's wall time (µs) is kept under ``label``."""
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times.setdefault(label, []).append((time.perf_counter() - t) * 1e6)

    setattr(obj, name, wrapper)


def in_training(steps: int) -> None:
    """Part 0: each piece of the check, and the per-step recording, timed in the training loop
    (the first quarter of calls is warm-up and dropped)."""
    import gradwatch_torch._watcher as watcher_module

    cfg = bench.build(bench.GradWatchDefault, bench.mlp, torch.device("cpu"), "/tmp")
    w, times = cfg.watcher, {}
    timed(w._tensors.recorder, "record", "per step: gradient norms (end of backward)", times)
    timed(w, "_check", "per check: all of it", times)
    timed(w._tensors, "measure", "  weights and update samples (device)", times)
    timed(watcher_module, "read", "  the one transfer and unpacking", times)
    timed(watcher_module.kit, "step_stats", "  per-layer step_stats", times)
    timed(w.monitor, "check", "  Monitor.check", times)
    for det in w.monitor.detectors:
        timed(det, "update", f"    {type(det).__name__}", times)
    for _ in range(steps):
        cfg.step()
    cfg.close()
    for label, values in times.items():
        values = values[len(values) // 4:]
        print(f"{label:<46}{statistics.median(values):8.1f} us  ({len(values)} calls)")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    in_training(args.steps)
    cfg = bench.build(bench.GradWatchDefault, bench.mlp, torch.device("cpu"), "/tmp")
    monitor = cfg.watcher.monitor
    captured = []
    original = monitor.check
    monitor.check = lambda stats: (captured.append(stats), original(stats))[1]
    for _ in range(args.steps):
        cfg.step()
    monitor.check = original
    n = len(captured)
    print(f"{n} checks of {len(captured[0].steps)} steps each (MLP, default settings)")

    def replay_monitor():
        fresh = Monitor(monitor.context, on_finding="log")
        for s in captured:
            fresh.check(s)

    print(f"Monitor.check            {per_call_us(replay_monitor, n, args.repeats):8.1f} us/check")
    for det in monitor.detectors:
        def replay(det=det):
            d = type(det)()  # the defaults, as in the run
            d.bind(monitor.context)
            for s in captured:
                d.update(s)
        print(f"  {type(det).__name__:<24}{per_call_us(replay, n, args.repeats):8.1f} us/check")
    cfg.close()

    grads = [p.grad if p.grad is not None else torch.randn_like(p) for p in cfg.model.parameters()]
    k = 50

    def loop(fn):
        return lambda: [fn() for _ in range(k)]

    inf = per_call_us(loop(lambda: torch._foreach_norm(grads, math.inf, dtype=torch.float32)),
                      k, args.repeats)
    amm = per_call_us(loop(lambda: [torch.aminmax(g) for g in grads]), k, args.repeats)
    row = torch.empty(len(grads))
    norm = per_call_us(loop(lambda: torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32),
                                                out=row)), k, args.repeats)
    print(f"per-step norm of the MLP's gradients (foreach norm into the history row) {norm:8.1f} us")
    print(f"max|g| of the MLP's gradients: foreach inf-norm (float32) {inf:8.1f} us, "
          f"aminmax per tensor {amm:8.1f} us")
    y = torch.relu(torch.randn(64, 16, 32, 32))
    old = per_call_us(loop(lambda: (y > 0).movedim(1, -1).reshape(-1, 16).any(0)), k, args.repeats)
    new = per_call_us(loop(lambda: y.sum(dim=[0, 2, 3], dtype=torch.float32) > 0), k, args.repeats)
    print(f"dead units of a 64x16x32x32 ReLU output: any(y > 0) {old:8.1f} us, "
          f"sum > 0 {new:8.1f} us")


if __name__ == "__main__":
    main()
