"""Per-step overhead of GradWatchCallback on Keras 3: plain ``fit`` vs with the callback.

Each backend runs in its own process (KERAS_BACKEND must be set before keras is imported).
Configurations alternate (A B C A B C ...); each round is one ``fit`` epoch of ``--steps``
batches; a timing callback stamps every batch end and the round's number is the mean interval
after the first ``--warmup`` batches (tracing and the first check excluded, check steps counted
at their share). Reported: median over rounds, and the ratio to plain ``fit``.

    python benchmarks/keras_overhead.py                  # tensorflow and torch backends
    python benchmarks/keras_overhead.py --backends jax   # the JAX backend
    python benchmarks/keras_overhead.py --quick          # smoke run (well under a minute)
    python benchmarks/keras_overhead.py --json out.json  # also write the numbers

``--threads 1`` (the default) runs each framework on one intra-op and one inter-op thread: on a
small shared machine a thread pool per framework makes step times swing by 2-4x between rounds,
which drowns a few-percent overhead. ``--threads 0`` keeps the frameworks' own defaults.

JSON written by ``--json``::

    {"machine": {"platform", "processor", "cpus", "python", "keras", "tensorflow", "torch",
                 "loadavg"},
     "command": "python benchmarks/keras_overhead.py ...",
     "settings": {"rounds", "steps", "warmup", "threads", "models", "backends", "quick"},
     "results": {BACKEND: {MODEL: {CONFIG: {"median_ms", "ratio", "ratio_of_medians",
                                            "rounds_ms"}}}}}

with BACKEND in tensorflow/torch, MODEL in mlp/cnn, CONFIG in plain/gradwatch-default/
gradwatch-every-step/gradwatch-guard. ``ratio`` is the median over rounds of the config's step time divided by
plain's in the same round (paired: both ran back to back, so drift between rounds cancels);
``ratio_of_medians`` divides the medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {"plain": None, "gradwatch-default": {},
           "gradwatch-every-step": {"check_every": 1, "activation_every": 1},
           "gradwatch-guard": {"guard": "skip"}}


def _limit_threads(threads: int) -> None:
    if threads <= 0:
        return
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif backend == "jax" and threads == 1:  # (read when jax is first imported)
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")


def run_backend(args: argparse.Namespace) -> dict:
    _limit_threads(args.threads)
    import keras
    import numpy as np
    from keras import layers

    from gradwatch.keras import GradWatchCallback

    def mlp():
        m = keras.Sequential([keras.Input((64,))] + [layers.Dense(256, activation="relu")
                                                     for _ in range(4)] + [layers.Dense(10)])
        return m, (np.random.rand(128 * args.steps, 64).astype("float32"),
                   np.random.randint(0, 10, 128 * args.steps)), 128

    def cnn():
        m = keras.Sequential([
            keras.Input((32, 32, 3)),
            layers.Conv2D(16, 3, padding="same", use_bias=False), layers.BatchNormalization(),
            layers.Activation("relu"),
            layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False),
            layers.BatchNormalization(), layers.Activation("relu"),
            layers.Conv2D(64, 3, strides=2, padding="same", use_bias=False),
            layers.BatchNormalization(), layers.Activation("relu"),
            layers.GlobalAveragePooling2D(), layers.Dense(10)])
        return m, (np.random.rand(64 * args.steps, 32, 32, 3).astype("float32"),
                   np.random.randint(0, 10, 64 * args.steps)), 64

    class Stamps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

        def on_train_begin(self, logs=None):
            self.times = []

    out = {}
    for name in args.models.split(","):
        setups = {}
        for cfg_name, cfg in CONFIGS.items():
            keras.utils.set_random_seed(0)
            model, data, batch = {"mlp": mlp, "cnn": cnn}[name]()
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            cbs = [Stamps()] + ([GradWatchCallback(on_finding="log", **cfg)] if cfg is not None else [])
            setups[cfg_name] = (model, data, batch, cbs)
        rounds = {k: [] for k in CONFIGS}
        for _ in range(args.rounds):
            for cfg_name, (model, (x, y), batch, cbs) in setups.items():
                gc.collect()  # no collector pause from the previous fit's garbage mid-round
                model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=cbs)
                t = cbs[0].times[args.warmup:]
                rounds[cfg_name].append((t[-1] - t[0]) / (len(t) - 1))
        plain = rounds["plain"]
        out[name] = {k: {"median_ms": statistics.median(v) * 1e3,
                         # Paired by round (configs ran back to back): machine drift between
                         # rounds cancels, which a ratio of medians does not do.
                         "ratio": statistics.median(a / b for a, b in zip(v, plain)),
                         "ratio_of_medians": statistics.median(v) / statistics.median(plain),
                         "rounds_ms": [round(t * 1e3, 4) for t in v]} for k, v in rounds.items()}
    return out


def _machine() -> dict:
    import platform
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "keras": version("keras"),
            "tensorflow": version("tensorflow-cpu") or version("tensorflow"),
            "torch": version("torch"), "jax": version("jax"),
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def parser() -> argparse.ArgumentParser:
    """The command line, built without running anything (tests/test_docs.py checks the
    commands the docs quote against it)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 rounds of 16 steps, well under a minute for both backends")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-/inter-op threads per framework; 0: the framework's default")
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--backends", default="tensorflow,torch")
    p.add_argument("--json", help="write results here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 16, 6
    if args._child:
        print(json.dumps(run_backend(args)))
        return {}
    results = {}
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--_child", "--rounds", str(args.rounds), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--models", args.models,
               "--threads", str(args.threads)]
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'backend':<11} {'model':<5} {'config':<22} {'median ms/step':>15} {'ratio':>7} "
          f"{'ratio of medians':>17}")
    for backend, models in results.items():
        for model, rows in models.items():
            for cfg, row in rows.items():
                print(f"{backend:<11} {model:<5} {cfg:<22} {row['median_ms']:>15.3f} "
                      f"{row['ratio']:>7.3f} {row['ratio_of_medians']:>17.3f}")
    out = {"machine": _machine(),
           "command": " ".join(["python", "benchmarks/keras_overhead.py"]
                               + list(sys.argv[1:] if argv is None else argv)),
           "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                        "threads": args.threads, "models": args.models.split(","),
                        "backends": args.backends.split(","), "quick": args.quick},
           "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
