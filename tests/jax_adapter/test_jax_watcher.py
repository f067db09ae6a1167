"""The optax watcher as a transformation: under jax.jit, inside optax.chain and optax.MultiSteps,
one host transfer per check, the options it takes and refuses."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest
from conftest import bce, jax, jnp, kinds, mlp_apply, mlp_params, optax, train
from gradwatch_jax import JaxWatcher

import gradwatch
from gradwatch.experiments import moons


def test_the_watcher_is_an_optax_transformation_with_extra_args():
    w = gradwatch.jax.watch(optax.adamw(1e-3))
    assert isinstance(w, JaxWatcher)
    assert isinstance(w, optax.GradientTransformationExtraArgs)
    assert gradwatch.watch(optax.sgd(0.1)).__class__ is JaxWatcher  # claimed by the plugin
    assert gradwatch.watch(w) is w


def test_updates_are_exactly_the_wrapped_transformations():
    params = mlp_params(2)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    plain, watched = optax.adamw(1e-2), gradwatch.jax.watch(optax.adamw(1e-2))
    s1, s2 = plain.init(params), watched.init(params)
    for _ in range(3):
        u1, s1 = jax.jit(plain.update)(grads, s1, params)
        u2, s2 = jax.jit(lambda g, s, p: watched.update(g, s, p, value=1.0))(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_host_transfer_per_check(monkeypatch):
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    calls = []
    real = w._core._receive
    monkeypatch.setattr(w._core, "_receive", lambda payload: (calls.append(1), real(payload)))
    run = train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=52)
    # Checks at 5, 10, ..., 50; each is sent at the start of the step after it.
    assert len(calls) == 10 and w.transfers == 10 and w.step == 50
    w.flush(run.state, run.params)
    assert w.transfers == 10  # 52 is no check step: nothing more to send
    assert w.report().checks == 10


def test_flush_sends_the_last_check_from_the_state():
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=10)
    run = train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=50)
    assert w.step == 40
    w.flush(run.state, run.params)
    assert w.step == 50 and w.report().steps == 50
    w.flush(run.state, run.params)
    assert w.transfers == 5  # once


@pytest.mark.parametrize("k", [pytest.param(4, id="k4"), pytest.param(3, id="k3")])
def test_multisteps_counts_optimizer_steps_not_micro_batches(k):
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    tx = optax.MultiSteps(w, every_k_schedule=k)
    run = train(mlp_params(3), mlp_apply(jax.nn.relu), tx, steps=21, micro=k)
    # 21 optimizer steps from 21 * k micro-batches: checks at 5, 10, 15, 20, each once.
    assert w.step == 20 and w.transfers == 4
    assert w.report().steps == 20
    assert int(run.state.gradient_step) == 21


def test_multisteps_measures_the_accumulated_gradient():
    # Micro-batch gradients +1 and -1 alternate: each optimizer step sees their mean, 0.
    params = {"layer0": {"w": jnp.ones((4, 4))}}
    w = gradwatch.jax.watch(optax.sgd(0.1), check_every=2, update_ratio="off")
    stats = []
    w.monitor.pm.register(_Stats(stats))
    tx = optax.MultiSteps(w, every_k_schedule=2)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    for i in range(2 * 5):
        sign = 1.0 if i % 2 else -1.0
        g = jax.tree.map(lambda p, s=sign: jnp.full_like(p, s), params)
        _, state = upd(g, state, params)
    jax.effects_barrier()
    assert stats and all(np.all(s.grad_norm == 0) for s in stats)


class _Stats:
    def __init__(self, out):
        self.out = out

    @gradwatch.hookimpl
    def gradwatch_step_stats(self, stats):
        self.out.append(stats)


def test_inside_a_chain_with_clipping_after_it():
    # The watcher first, clipping after: gradients are measured before clipping.
    w = gradwatch.jax.watch(optax.identity(), check_every=5)
    tx = optax.chain(w, optax.clip_by_global_norm(1e-3), optax.sgd(0.05))
    train(mlp_params(3), mlp_apply(jax.nn.relu), tx, steps=30)
    assert w.step == 25
    assert w.report().grad_norms is not None
    assert w.report().layers[-1].grad_norm > 1e-3  # the unclipped norm


def test_wrapping_a_chain_with_clipping_measures_before_clipping():
    stats = []
    w = gradwatch.jax.watch(optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(0.05)),
                            check_every=5, plugins=[_Stats(stats)])
    train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=30)
    total = [float(np.sqrt(np.nansum(s.grad_norm[-1] ** 2))) for s in stats]
    assert min(total) > 1e-2  # well above the clip norm: measured before clipping


def test_update_without_params_measures_gradients_only():
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=2)
    params = mlp_params(2)
    state = w.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    for _ in range(5):
        _, state = jax.jit(w.update)(g, state)
    assert w.step == 4 and w.report().internal_errors == ()


def test_report_and_remove():
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    run = train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=30)
    report = w.remove()
    assert w.removed and report.steps == 25 and report.framework == "jax"
    assert [row.name for row in report.layers] == ["layer0", "layer1", "layer2", "layer3"]
    w.flush(run.state, run.params)  # ignored after remove()
    assert w.report().checks == report.checks


def test_the_sink_lets_go_of_a_removed_or_collected_watcher():
    import gc

    from gradwatch_jax import _sink

    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    run = train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=12)
    sid = w._core._sink_id
    assert sid in _sink._sinks and w.transfers == 2
    w.remove()
    assert sid not in _sink._sinks
    train(run.params, mlp_apply(jax.nn.relu), w, steps=12)  # still runs: checks are dropped
    assert w.transfers == 2
    w2 = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    train(mlp_params(3), mlp_apply(jax.nn.relu), w2, steps=6)
    sid2 = w2._core._sink_id
    assert sid2 in _sink._sinks
    del w2
    gc.collect()
    assert sid2 not in _sink._sinks


def test_strict_mode_stops_the_jitted_step_and_keeps_the_error():
    w = gradwatch.jax.watch(optax.sgd(0.05), on_finding="raise", check_every=5)
    with pytest.raises(jax.errors.JaxRuntimeError) as failed:
        train(mlp_params(10), mlp_apply(jax.nn.sigmoid), w, steps=100)
    assert isinstance(w.error, gradwatch.GradientHealthError)
    assert w.error.finding.kind == "vanishing_gradient"
    # The step's error carries the finding, as said in the log (the steps dispatched after the
    # failed one each wrap it in "Error dispatching computation: ").
    assert str(failed.value).endswith(f"GradientHealthError: {w.error}")
    with pytest.raises(gradwatch.GradientHealthError):
        w.report()


def test_a_failed_strict_run_does_not_break_the_next_watcher():
    # The failed run's arrays stay alive while its exception (and so its traceback) is held, as
    # in a notebook; a later watcher's report must not raise their error.
    strict = gradwatch.jax.watch(optax.sgd(0.05), on_finding="raise", check_every=5)
    with pytest.raises(jax.errors.JaxRuntimeError) as failed:
        train(mlp_params(10), mlp_apply(jax.nn.sigmoid), strict, steps=100)
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    run = train(mlp_params(10), mlp_apply(jax.nn.sigmoid), w, steps=60)
    w.flush(run.state, run.params)
    assert failed.value is not None and w.transfers == 12
    assert "vanishing_gradient" in kinds(w)


@pytest.mark.parametrize("name, value", [
    pytest.param("optimizer", object(), id="optimizer"),
    pytest.param("scaler", object(), id="scaler"),
    pytest.param("ranks", "all", id="ranks"),
    pytest.param("guard", "skip", id="guard"),
    pytest.param("activation_every", 50, id="activation_every"),
])
def test_options_that_cannot_work_in_jax_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        gradwatch.jax.watch(optax.sgd(0.1), **{name: value})


@pytest.mark.parametrize("options, name", [
    pytest.param({"update_ratio": "sometimes"}, "update_ratio", id="update_ratio"),
    pytest.param({"sample_fraction": 2.0}, "sample_fraction", id="sample_fraction"),
    pytest.param({"check_every": 0}, "check_every", id="check_every"),
    pytest.param({"transfer": "pigeon"}, "transfer", id="transfer"),
])
def test_bad_option_values_raise_value_error_naming_the_parameter(options, name):
    with pytest.raises(ValueError, match=name):
        gradwatch.jax.watch(optax.sgd(0.1), **options)


def test_unknown_options_and_non_transformations_raise_type_error():
    with pytest.raises(TypeError, match="bogus"):
        gradwatch.jax.watch(optax.sgd(0.1), bogus=1)
    with pytest.raises(TypeError, match="GradientTransformation"):
        gradwatch.jax.watch("adam")


def test_activation_every_none_is_accepted():
    gradwatch.jax.watch(optax.sgd(0.1), activation_every=None)


@pytest.mark.parametrize("mode", ["sampled", "exact", "off"])
def test_update_ratio_modes(mode):
    w = gradwatch.jax.watch(optax.sgd(1e-7), update_ratio=mode, check_every=5)
    train(mlp_params(3), mlp_apply(jax.nn.relu), w, steps=100)
    assert ("stalled_update" in kinds(w)) == (mode != "off"), w.report()


def test_the_plugin_module_imports_no_jax():
    code = ("import sys, gradwatch, gradwatch.jax, gradwatch_jax.plugin; "
            "from gradwatch._manager import get_plugin_manager, adapter_names; "
            "assert 'jax' in adapter_names(get_plugin_manager()); "
            "bad = [m for m in ('jax', 'optax', 'flax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _sigmoid_step(w):
    """A deep sigmoid MLP's jitted step with ``w`` (vanishing: its first layer's gradient is
    orders of magnitude below its last's) and its inputs."""
    params = mlp_params(10)
    apply = mlp_apply(jax.nn.sigmoid)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(lambda q: bce(apply(q, xb), yb))(p)
        u, s = w.update(g, s, p, value=loss)
        return optax.apply_updates(p, u), s

    return step, params, w.init(params)


def _moons_steps(step, params, state, steps=100, after=None):
    """``steps`` jitted steps on random batches of 64 two-moons points; ``after(state, params)``
    after each."""
    x, y = moons(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(x), 64)
        params, state = step(params, state, x[idx], y[idx])
        if after is not None:
            after(state, params)
    return params, state


def test_transfer_state_reads_checks_from_the_state_without_a_callback():
    w = gradwatch.jax.watch(optax.sgd(0.05), transfer="state", check_every=5)
    step, params, state = _sigmoid_step(w)
    x, y = moons(seed=0)
    traced = str(jax.make_jaxpr(step)(params, state, x[:64], y[:64]))
    assert "callback" not in traced and "ffi_call" not in traced
    _moons_steps(step, params, state, after=w.read)
    assert w.transfers == 20 and w.step == 100
    assert "vanishing_gradient" in kinds(w)


def test_read_needs_transfer_state():
    w = gradwatch.jax.watch(optax.sgd(0.05))
    with pytest.raises(ValueError, match="transfer"):
        w.read(None)


@pytest.mark.parametrize("update_ratio", ["sampled", "exact"])
def test_a_step_that_donates_params_and_state_runs(update_ratio):
    # jax.jit(donate_argnums=...) over params and the optimizer state is the usual training
    # step (flax's TrainState too); XLA refuses to donate one buffer twice, so no two leaves of
    # the state may share one, nor a leaf of the state and one of the params.
    params = {"fc0": {"w": jnp.ones((2, 40)), "b": jnp.zeros(40)}, "out": {"w": jnp.ones((40, 1))}}
    w = gradwatch.jax.watch(optax.sgd(0.1), check_every=2, update_ratio=update_ratio)
    state = w.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s):
        g = jax.tree_util.tree_map(jnp.ones_like, p)
        u, s = w.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(4):
        params, state = step(params, state)
    w.flush(state, params)
    assert w.step == 4 and w.report().steps == 4


def test_the_default_step_keeps_jax_fast_dispatch():
    # A Python host callback anywhere in a jitted step (even under a cond never taken) takes it
    # off JAX's C++ dispatch path; on XLA:CPU the default transfer is the FFI sink instead.
    x, y = moons(seed=0)
    step, params, state = _sigmoid_step(gradwatch.jax.watch(optax.sgd(0.05), check_every=5))
    traced = str(jax.make_jaxpr(step)(params, state, x[:64], y[:64]))
    assert "callback" not in traced and "gradwatch_check_sink" in traced
    step2, params2, state2 = _sigmoid_step(
        gradwatch.jax.watch(optax.sgd(0.05), check_every=5, transfer="debug_callback"))
    assert "debug_callback" in str(jax.make_jaxpr(step2)(params2, state2, x[:64], y[:64]))


@pytest.mark.parametrize("transfer", ["callback", "debug_callback"])
def test_both_host_transfers_find_vanishing_the_same(transfer):
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5, transfer=transfer)
    step, params, state = _sigmoid_step(w)
    params, state = _moons_steps(step, params, state)
    w.flush(state, params)
    assert w.transfers == 20 and w.step == 100
    found = [f for f in w.findings if f.kind == "vanishing_gradient"]
    assert found and found[0].layer == "layer0"


def test_without_the_sink_checks_go_by_debug_callback_and_that_is_said_once(monkeypatch, caplog):
    from gradwatch_jax import _sink, _watcher

    monkeypatch.setattr(_sink, "register", lambda: "RuntimeError: no such FFI API")
    monkeypatch.setattr(_watcher, "_said", set())
    caplog.set_level("INFO", logger="gradwatch")
    x, y = moons(seed=0)
    watchers = [gradwatch.jax.watch(optax.sgd(0.05), check_every=5) for _ in range(2)]
    for w in watchers:
        step, params, state = _sigmoid_step(w)
        assert "debug_callback" in str(jax.make_jaxpr(step)(params, state, x[:64], y[:64]))
        for i in range(60):
            params, state = step(params, state, x[i:i + 64], y[i:i + 64])
        w.flush(state, params)
        assert w.transfers == 12
        assert "vanishing_gradient" in kinds(w)
    said = [r.getMessage() for r in caplog.records if "FFI check sink" in r.getMessage()]
    assert len(said) == 1 and "no such FFI API" in said[0]


def test_a_packed_check_unpacks_exactly():
    from gradwatch_jax import _device

    payload = {"count": jnp.int32(2**24 + 1), "grad_sq": jnp.arange(6, dtype=jnp.float32)
               .reshape(2, 3) * 0.1, "has_loss": jnp.array([True, False]),
               "acts_step": jnp.int32(-7)}
    vector, layout = jax.jit(lambda p: _device.pack(p, (3, 9))[0])(payload), \
        _device.pack(payload, (3, 9))[1]
    host = np.asarray(vector)
    assert list(host[:2].view(np.int32)) == [3, 9]
    out = _device.unpack(host, layout)
    assert int(out["count"]) == 2**24 + 1  # exact: bit-cast, not rounded through float32
    assert int(out["acts_step"]) == -7
    np.testing.assert_array_equal(out["grad_sq"], np.asarray(payload["grad_sq"]))
    assert out["has_loss"].tolist() == [True, False] and out["has_loss"].dtype == bool


@pytest.mark.parametrize("dtype", ["bfloat16", "float64"])
def test_weights_of_other_dtypes_are_sampled_and_measured(dtype):
    if dtype == "float64" and not jax.config.jax_enable_x64:
        # float64 arrays need x64 mode, which is process-wide: run this case in a subprocess.
        code = ("import jax; jax.config.update('jax_enable_x64', True); import sys, pytest; "
                f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r} + "
                "'::test_weights_of_other_dtypes_are_sampled_and_measured[float64]']))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=str(__import__("pathlib").Path(__file__).parent))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return
    params = jax.tree.map(lambda p: p.astype(dtype), mlp_params(2))
    w = gradwatch.jax.watch(optax.sgd(0.05), check_every=5)
    state = w.init(params)
    assert state.start.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
    run = train(params, mlp_apply(jax.nn.relu), w, steps=40)
    w.flush(run.state, run.params)
    assert w.transfers == 8
    layers = w.report().layers
    assert layers and all(np.isfinite(row.update_ratio) and row.update_ratio > 0
                          for row in layers)
