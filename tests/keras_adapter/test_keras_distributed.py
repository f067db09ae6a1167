"""GradWatchCallback under tf.distribute.MirroredStrategy: two replicas (two logical CPU devices)
see the globally reduced gradients, the global batch's loss, and report each finding once.

Logical devices must be configured before TensorFlow initialises, so the runs happen in a fresh
interpreter (one, shared by the tests of this module) that prints its numbers as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKEND

pytestmark = [
    pytest.mark.skipif(BACKEND != "tensorflow",
                       reason="tf.distribute.MirroredStrategy is TensorFlow's; this backend is "
                              f"{BACKEND}"),
    pytest.mark.slow,  # one interpreter, seven fits under two strategies: ~20-40 s
]

SCRIPT = textwrap.dedent('''
    import json, math, warnings
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    import gradwatch
    from gradwatch import hookimpl
    from gradwatch.keras import GradWatchCallback


    class Recorder:
        def __init__(self):
            self.stats = []

        @hookimpl
        def gradwatch_step_stats(self, stats):
            self.stats.append(stats)


    def circles(n, seed=0):
        rng = np.random.default_rng(seed)
        t = rng.uniform(0, 2 * math.pi, n)
        outer = np.arange(n) % 2 == 0
        r = np.where(outer, 1.0, 0.5)
        x = np.c_[r * np.cos(t), r * np.sin(t)] + rng.normal(0, 0.05, (n, 2))
        return x.astype("float32"), outer.astype("float32")


    def run(strategy, depth, activation, lr, scale, epochs, n, clipnorm=None, compile={},
            policy="float32", **options):
        keras.utils.set_random_seed(0)
        keras.mixed_precision.set_global_policy(policy)
        with strategy.scope():
            model = keras.Sequential(
                [keras.Input((2,))]
                + [keras.layers.Dense(32, activation=activation, name=f"d{i}")
                   for i in range(depth)]
                + [keras.layers.Dense(1, name="out")], name="mlp")
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr, clipnorm=clipnorm),
                          loss=keras.losses.BinaryCrossentropy(from_logits=True), **compile)
        x, y = circles(n)
        rec = Recorder()
        cb = GradWatchCallback(plugins=[rec], **options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(x * scale, y, batch_size=64, epochs=epochs, shuffle=False, verbose=0,
                      callbacks=[cb])
        keras.mixed_precision.set_global_policy("float32")
        internal = [str(w.message) for w in caught
                    if issubclass(w.category, gradwatch.GradWatchInternalWarning)]
        stats = rec.stats
        return {
            "replicas": strategy.num_replicas_in_sync,
            "steps": cb.report().steps,
            "internal": internal + list(cb.report().internal_errors),
            "findings": [[f.kind, f.layer, f.step] for f in cb.findings],
            "warning_findings": sum(f.is_warning for f in cb.findings),
            "warnings": sum(issubclass(w.category, gradwatch.GradientHealthWarning)
                            for w in caught),
            "stat_steps": np.concatenate([s.steps for s in stats]).tolist(),
            "grad_norm": np.concatenate([s.grad_norm for s in stats]).tolist(),
            "grad_max": [s.grad_max.tolist() for s in stats if s.grad_max is not None],
            "loss": np.concatenate([s.loss for s in stats]).tolist(),
            "saturated": [[s.step, {k: a.saturated_fraction for k, a in s.activations.items()}]
                          for s in stats if s.activations],
        }


    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single = tf.distribute.OneDeviceStrategy("/cpu:0")
    # lr 0: the weights stay put, so every step's gradient is that of its global batch of 64
    # (32 per replica), whichever way it is computed.
    still = dict(depth=3, activation="tanh", lr=0.0, scale=1.0, epochs=1, n=256, check_every=2)
    sigmoid = dict(depth=10, activation="sigmoid", lr=0.1, scale=100.0, epochs=4, n=512,
                   check_every=2, activation_every=4)
    out = {
        "single": run(single, **still),
        "mirrored": run(mirrored, **still),
        "mirrored-clipnorm": run(mirrored, **still, clipnorm=1e-3),
        "mirrored-eager": run(mirrored, **still, compile={"run_eagerly": True}),
        # A LossScaleOptimizer applies the update from a merge_call: other threads than the
        # forward pass's call the inner optimizer's apply.
        "mirrored-mixed-float16": run(mirrored, **still, policy="mixed_float16"),
        "sigmoid-single": run(single, **sigmoid),
        "sigmoid-mirrored": run(mirrored, **sigmoid),
    }
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def runs() -> dict:
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="-1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mirrored", "mirrored-clipnorm", "mirrored-eager",
                                  "mirrored-mixed-float16", "sigmoid-mirrored"])
def test_fit_under_mirrored_strategy_runs_on_two_replicas_without_errors(runs, name):
    run = runs[name]
    assert run["replicas"] == 2
    assert run["internal"] == []
    # Optimizer steps, not replica steps: 256 / 64 and 4 x 512 / 64.
    assert run["steps"] == (4 if "sigmoid" not in name else 32)
    assert run["stat_steps"] == list(range(1, run["steps"] + 1))


@pytest.mark.parametrize("name", [
    pytest.param("mirrored", id="keras-all-reduce"),
    # clipnorm: Keras clips each replica's gradient before its all-reduce; gradwatch reduces the
    # unclipped gradients itself and measures before clipping, as on one device.
    pytest.param("mirrored-clipnorm", id="clipnorm-own-all-reduce"),
    pytest.param("mirrored-eager", id="run-eagerly"),
    pytest.param("mirrored-mixed-float16", id="mixed-float16-loss-scale-optimizer"),
])
def test_gradient_statistics_are_those_of_the_global_batch(runs, name):
    single, run = runs["single"], runs[name]
    assert runs["single"]["replicas"] == 1
    rtol = 1e-2 if "float16" in name else 1e-5  # (against the float32 run)
    np.testing.assert_allclose(run["grad_norm"], single["grad_norm"], rtol=rtol)
    np.testing.assert_allclose(run["grad_max"], single["grad_max"], rtol=rtol)
    # Keras divides each replica's loss by the number of replicas: their sum is the global loss.
    np.testing.assert_allclose(run["loss"], single["loss"], rtol=rtol)


def test_each_finding_is_reported_once_not_once_per_replica(runs):
    single, mirrored = runs["sigmoid-single"], runs["sigmoid-mirrored"]
    kinds = {(kind, layer) for kind, layer, _ in single["findings"]}
    assert {("vanishing_gradient", "d0"), ("saturated_units", "d0")} <= kinds, single
    assert mirrored["findings"] == single["findings"]
    # one Python warning per warning-severity finding (info findings are logged, not warned)
    assert mirrored["warnings"] == single["warnings"] == single["warning_findings"] > 0


def test_activation_statistics_are_those_of_the_global_batch(runs):
    single, mirrored = runs["sigmoid-single"], runs["sigmoid-mirrored"]
    assert [step for step, _ in mirrored["saturated"]] == [step for step, _ in single["saturated"]]
    for (_, got), (_, want) in zip(mirrored["saturated"], single["saturated"]):
        assert got.keys() == want.keys()
        np.testing.assert_allclose(list(got.values()), list(want.values()), atol=0.02)
