"""Per-step overhead of gradwatch's optax watcher: a plain jitted step vs the same step with the
optimizer wrapped in ``gradwatch.jax.watch``.

Configurations alternate within each round (A B C ... then the next round); a round is
``--steps`` jitted steps after ``--warmup`` untimed ones, timed to the last step's completion
(``block_until_ready``), so asynchronous dispatch and the host callbacks of check steps are
counted at their share. Reported: each configuration's median step time over rounds, and the
median over rounds of its step time divided by plain's in the same round (paired: both ran back
to back, so drift between rounds cancels).

    python benchmarks/jax_overhead.py                  # MLP and CNN
    python benchmarks/jax_overhead.py --quick          # smoke run (well under a minute)
    python benchmarks/jax_overhead.py --json out.json  # also write the numbers

Configurations: ``plain`` (optax.adamw, no gradwatch); ``gradwatch-default`` (check_every=10,
the default: on XLA:CPU the check reaches the host through gradwatch's FFI sink);
``gradwatch-every-step`` (check_every=1: a host transfer every step);
``gradwatch-debug-callback`` (``transfer="debug_callback"``: a ``jax.debug.callback`` instead of
the FFI sink, which takes the step off JAX's C++ dispatch path); ``gradwatch-state``
(``transfer="state"``: no callback in the step, the loop calls ``w.read(state, params)`` and
the check is read from the state every 10 steps);
``host-read`` (plain, plus a blocking ``jax.device_get`` of a small array every 10 steps: the
cost of the alternative design, in which the training loop would read the watcher's state).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

CONFIGS = ("plain", "gradwatch-default", "gradwatch-every-step", "gradwatch-debug-callback",
           "gradwatch-state", "host-read")


def _models(jax: Any, jnp: Any) -> dict[str, tuple[Callable[..., Any], Any, Any]]:
    """name -> (apply, params, batch): a 6-layer 256-wide MLP and a small 3-conv CNN."""
    key = jax.random.key(0)

    def dense(k: Any, d_in: int, d_out: int) -> dict[str, Any]:
        return {"kernel": jax.random.normal(k, (d_in, d_out)) * (2.0 / d_in) ** 0.5,
                "bias": jnp.zeros(d_out)}

    keys = jax.random.split(key, 16)
    mlp = {f"Dense_{i}": dense(keys[i], 64 if i == 0 else 256, 1 if i == 6 else 256)
           for i in range(7)}

    def mlp_apply(p: Any, x: Any) -> Any:
        for i in range(7):
            x = x @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
            if i < 6:
                x = jax.nn.relu(x)
        return x[:, 0]

    def conv(k: Any, c_in: int, c_out: int) -> dict[str, Any]:
        return {"kernel": jax.random.normal(k, (3, 3, c_in, c_out)) * (2.0 / (9 * c_in)) ** 0.5,
                "bias": jnp.zeros(c_out)}

    cnn = {"Conv_0": conv(keys[8], 1, 16), "Conv_1": conv(keys[9], 16, 32),
           "Conv_2": conv(keys[10], 32, 32), "Dense_0": dense(keys[11], 32, 1)}

    def cnn_apply(p: Any, x: Any) -> Any:
        for i, stride in enumerate((1, 2, 2)):
            k = p[f"Conv_{i}"]
            x = jax.lax.conv_general_dilated(x, k["kernel"], (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = jax.nn.relu(x + k["bias"])
        x = x.mean(axis=(1, 2))
        return (x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])[:, 0]

    rng = jax.random.key(1)
    return {"mlp": (mlp_apply, mlp, (jax.random.normal(rng, (128, 64)),
                                     (jax.random.uniform(rng, (128,)) > 0.5) * 1.0)),
            "cnn": (cnn_apply, cnn, (jax.random.normal(rng, (32, 28, 28, 1)),
                                     (jax.random.uniform(rng, (32,)) > 0.5) * 1.0))}


def _stepper(config: str, apply: Callable[..., Any], params0: Any, xb: Any,
             yb: Any) -> tuple[Callable[[], Any], Any]:
    """One configuration's step (a jitted adamw step on its own copy of the parameters) and
    its transformation."""
    import jax
    import optax

    import gradwatch

    if config in ("plain", "host-read"):
        tx = optax.adamw(1e-4)
    else:
        transfer = {"gradwatch-state": "state",
                    "gradwatch-debug-callback": "debug_callback"}.get(config, "callback")
        tx = gradwatch.jax.watch(optax.adamw(1e-4), on_finding="log",
                                 check_every=1 if config.endswith("every-step") else 10,
                                 transfer=transfer)

    def objective(p: Any) -> Any:
        return optax.sigmoid_binary_cross_entropy(apply(p, xb), yb).mean()

    @jax.jit
    def step(p: Any, s: Any) -> tuple[Any, Any, Any]:
        loss, g = jax.value_and_grad(objective)(p)
        u, s = tx.update(g, s, p, value=loss)
        return optax.apply_updates(p, u), s, loss

    box = [params0, tx.init(params0), 0]

    def one() -> Any:
        box[0], box[1], loss = step(box[0], box[1])
        box[2] += 1
        if config == "host-read" and box[2] % 10 == 0:
            jax.device_get(loss)
        elif config == "gradwatch-state":
            tx.read(box[1], box[0])
        return loss

    return one, tx


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    results: dict[str, Any] = {}
    models = _models(jax, jnp)
    for name in args.models.split(","):
        apply, params0, (xb, yb) = models[name]

        steppers = {c: _stepper(c, apply, params0, xb, yb) for c in CONFIGS}
        for one, _ in steppers.values():
            for _ in range(args.warmup):
                one()
            jax.block_until_ready(one())
        rounds: dict[str, list[float]] = {c: [] for c in CONFIGS}
        for r in range(args.rounds):
            order = CONFIGS if r % 2 == 0 else CONFIGS[::-1]
            for c in order:
                one, _ = steppers[c]
                t0 = time.perf_counter()
                for _ in range(args.steps - 1):
                    one()
                jax.block_until_ready(one())
                rounds[c].append((time.perf_counter() - t0) / args.steps * 1e3)
        plain = rounds["plain"]
        results[name] = {
            c: {"median_ms": round(statistics.median(v), 4),
                "ratio": round(statistics.median(a / b for a, b in zip(v, plain)), 4),
                "ratio_of_medians": round(statistics.median(v) / statistics.median(plain), 4),
                "rounds_ms": [round(x, 4) for x in v]}
            for c, v in rounds.items()}
        for c in CONFIGS:
            tx = steppers[c][1]
            if hasattr(tx, "remove"):
                results[name][c]["transfers"] = tx.transfers
                tx.remove()
    return results


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 20 steps")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--json", help="write results here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 20, 5
    results = run(args)
    import jax
    import optax

    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "jax": jax.__version__,
                       "optax": optax.__version__, "backend": jax.default_backend()},
           "command": "python benchmarks/jax_overhead.py " + " ".join(argv or sys.argv[1:]),
           "settings": {k: getattr(args, k) for k in ("rounds", "steps", "warmup", "models",
                                                       "quick")},
           "results": results}
    for model, rows in results.items():
        for c, row in rows.items():
            print(f"{model:4s} {c:22s} {row['median_ms']:8.3f} ms/step  x{row['ratio']:.3f}"
                  f"  (ratio of medians x{row['ratio_of_medians']:.3f})")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
