"""``watch(tx, activations={site: kind})`` and ``update(..., activations={site: output})``: dead
and saturated units, which an optax transformation cannot see by itself."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import gradwatch  # noqa: E402
from gradwatch import hookimpl  # noqa: E402


class Stats:
    """A run plugin keeping every StepStats the monitor receives."""

    def __init__(self) -> None:
        self.stats = []

    @hookimpl
    def gradwatch_step_stats(self, stats) -> None:
        self.stats.append(stats)


def run(dead_units: int, steps: int = 40, **options):
    """A 1-hidden-layer ReLU net whose first ``dead_units`` of 8 hidden units have a bias of
    -100 (they output 0 for every input: the label, by construction), trained with the hidden
    output handed to the watcher."""
    key = jax.random.key(0)
    params = {"fc0": {"w": jax.random.normal(key, (2, 8)) * 0.5,
                      "b": jnp.where(jnp.arange(8) < dead_units, -100.0, 0.1)},
              "out": {"w": jnp.ones((8, 1)) * 0.1, "b": jnp.zeros(1)}}
    x = jax.random.normal(jax.random.key(1), (64, 2))
    y = (x[:, 0] > 0).astype(jnp.float32)
    rec = Stats()
    w = gradwatch.jax.watch(optax.sgd(0.01), check_every=5, on_finding="log",
                            activations={"act0": "relu"}, plugins=[rec], **options)
    state = w.init(params)

    def loss_fn(p):
        h = jax.nn.relu(x @ p["fc0"]["w"] + p["fc0"]["b"])
        logits = (h @ p["out"]["w"] + p["out"]["b"])[:, 0]
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)), h

    @jax.jit
    def step(p, s):
        (loss, h), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        u, s = w.update(g, s, p, value=loss, activations={"act0": h})
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    w.flush(state, params)
    return w, rec.stats


def test_the_dead_fraction_is_measured_at_each_activation_step():
    w, stats = run(dead_units=6)
    sampled = [s for s in stats if s.activations]
    assert [s.step for s in sampled] == [25]  # activation_every's default: 5 checks of 5
    (site,) = sampled[0].activations.values()
    assert site.kind == "relu" and site.units == 8
    assert site.dead_fraction == pytest.approx(6 / 8)


def test_dead_units_are_reported_and_a_healthy_net_is_quiet():
    w, _ = run(dead_units=6, steps=60, activation_every=5)
    (finding,) = [f for f in w.report().findings if f.kind == "dead_units"]
    assert finding.layer == "act0" and finding.value == pytest.approx(0.75)
    healthy, stats = run(dead_units=0, steps=60, activation_every=5)
    assert not [f for f in healthy.report().findings if f.kind == "dead_units"]
    assert all(np.isclose(a.dead_fraction, 0) for s in stats for a in s.activations.values())


@pytest.mark.parametrize("activations, error, match", [
    pytest.param({"act0": "softmax"}, ValueError, "activations\\['act0'\\]", id="unknown-kind"),
    pytest.param(["act0"], TypeError, "activations must be a dict", id="not-a-dict"),
])
def test_bad_sites_are_refused_by_name(activations, error, match):
    with pytest.raises(error, match=match):
        gradwatch.jax.watch(optax.sgd(0.1), activations=activations)


def test_outputs_of_sites_never_named_are_refused_at_trace_time():
    params = {"fc0": {"w": jnp.ones((2, 2))}}
    w = gradwatch.jax.watch(optax.sgd(0.1), activations={"act0": "relu"})
    state = w.init(params)
    with pytest.raises(ValueError, match="act9"):
        w.update(params, state, params, activations={"act9": jnp.ones((4, 2))})
    plain = gradwatch.jax.watch(optax.sgd(0.1))
    with pytest.raises(ValueError, match="no sites were named"):
        plain.update(params, plain.init(params), params, activations={"act0": jnp.ones((4, 2))})
