"""The reference experiments in PyTorch: every run meets its expected verdict, with the numbers
the lesson is about (gradient ratio, weight change, loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from gradwatch_torch import experiments as tx  # noqa: E402

from gradwatch import experiments as ex  # noqa: E402
from gradwatch._events import first_last_ratio, read_runs, weight_change_percent  # noqa: E402

#: The runner the plugin gives the command line.
RUNNER = ex.experiment_runners()["torch"]
NAMES = [e.name for e in ex.EXPERIMENTS]
SETTINGS = [pytest.param(s, id=s.name) for s in ex.SETTINGS]
#: The repairs of the deep-sigmoid failure: the gradient must reach the first layer.
REPAIRS = ["shallow-sigmoid", "deep-relu", "deep-leaky-relu", "deep-prelu", "deep-tanh-xavier",
           "deep-sigmoid-batchnorm", "deep-sigmoid-residual", "explode-repaired",
           "dying-relu-leaky-0.3"]


def train(exp, tmp_path, settings=ex.EXACT):
    events = tmp_path / f"{exp.name}-{exp.seed}-{settings.name}.jsonl"
    raw = RUNNER.run(exp, events, settings)
    [run] = read_runs(events)
    return raw, run


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("name", NAMES)
def test_experiment_meets_its_expected_verdict(name, settings, tmp_path):
    # Under gradwatch's defaults (sampled update ratios) as under exact measurement.
    exp = ex.get(name)
    threads = torch.get_num_threads()
    raw, run = train(exp, tmp_path, settings)
    assert ex.judge(exp, run.kinds) == [], raw.report
    assert (raw.experiment, raw.framework, raw.settings) == (name, "torch", settings.name)
    # The event file (what plots and `gradwatch report` read) says what the watcher said.
    assert [(f.kind, f.step, f.layer) for f in run.findings] == [
        (f.kind, f.step, f.layer) for f in raw.findings]
    assert list(run.layers) == ex.layer_names(exp)
    assert run.ended and run.steps == exp.steps
    assert raw.steps_seen == raw.batches == exp.steps
    assert torch.get_num_threads() == threads  # the run's one-thread setting is undone
    if name in REPAIRS:
        assert first_last_ratio(run) > 1e-2, raw.report
        assert weight_change_percent(run)["fc0"] > 0.5
        assert raw.final_loss < 0.69  # it learned something


def test_the_failure_shows_the_classic_symptoms(tmp_path):
    exp = ex.get("deep-sigmoid")
    raw, run = train(exp, tmp_path)
    vanishing = next(f for f in run.findings if f.kind == "vanishing_gradient")
    assert vanishing.layer == "fc0" and vanishing.step <= 30
    assert first_last_ratio(run) < 1e-6
    change = weight_change_percent(run)
    assert change["fc0"] < 1e-4 and change["out"] > 1  # first layer ~0%, last layer moves
    assert raw.final_loss == pytest.approx(math.log(2), abs=0.01)
    assert raw.final_accuracy < 0.6


@pytest.mark.parametrize("name, max_ratio", [
    pytest.param("deep-sigmoid-xavier", 1e-4, id="xavier-does-not-rescue-sigmoid"),
    pytest.param("deep-relu-default-init", 1e-2, id="relu-needs-he-init"),
])
def test_honest_negative_results_still_vanish(name, max_ratio, tmp_path):
    raw, run = train(ex.get(name), tmp_path)
    assert "vanishing_gradient" in run.kinds
    assert first_last_ratio(run) < max_ratio
    assert raw.final_loss == pytest.approx(math.log(2), abs=0.01)


def test_exploding_gradients_and_their_repairs(tmp_path):
    raw, run = train(ex.get("explode"), tmp_path)
    assert run.findings[0].kind == "exploding_gradient" and run.findings[0].step <= 2
    assert math.isnan(raw.final_loss)
    raw, run = train(ex.get("explode-clip-only"), tmp_path)
    # Clipping keeps the numbers finite but the gradients, measured before clipping, stay huge
    # and so does the loss.
    assert "exploding_gradient" in run.kinds and math.isfinite(raw.final_loss)
    assert raw.final_loss > 10
    raw, run = train(ex.get("explode-repaired"), tmp_path)
    assert raw.final_loss < 0.5 and not run.findings


def test_leaky_relu_repairs_dead_units(tmp_path):
    dead, run = train(ex.get("dying-relu"), tmp_path)
    finding = next(f for f in run.findings if f.kind == "dead_units")
    assert finding.value >= 0.5
    leaky, _ = train(ex.get("dying-relu-leaky-0.3"), tmp_path)
    assert leaky.final_loss < dead.final_loss - 0.1


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_verdicts_are_not_luck(name, seed, tmp_path):
    exp = ex.get(name).with_(seed=seed)
    raw, run = train(exp, tmp_path, ex.DEFAULT)
    assert ex.judge(exp, run.kinds) == [], raw.report


@pytest.mark.parametrize("name", ["deep-sigmoid-batchnorm", "deep-prelu", "deep-sigmoid-residual",
                                  "dying-relu-leaky-0.3"])
def test_the_model_is_the_spec(name):
    exp = ex.get(name)
    model = tx.build(exp)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    for lin, (w, b) in zip(linears, ex.initial_weights(exp), strict=True):
        assert np.array_equal(lin.weight.detach().numpy(), w.T)
        assert np.array_equal(lin.bias.detach().numpy(), b)
    params = [n for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    assert params == ex.layer_names(exp)
    if exp.residual:
        assert type(model).__name__ == "ResidualMLP"
        # The skip is real: the output differs from the same weights without skips.
        x = torch.from_numpy(exp.dataset()[0][:8])
        plain = tx.build(exp.with_(residual=False))
        assert not torch.allclose(model(x), plain(x))
