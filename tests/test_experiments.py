"""The framework-neutral half of the reference experiments: data, specs, weights, verdicts,
settings, runners and their results."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import gradwatch
from gradwatch import experiments as ex
from gradwatch.experiments._results import RunRecord, format_table, write_results


@pytest.mark.parametrize("make", [ex.moons, ex.circles], ids=["moons", "circles"])
def test_data_is_made_in_code_balanced_and_reproducible(make):
    x, y = make(n=400, seed=3)
    assert x.shape == (400, 2) and y.shape == (400,)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert set(np.unique(y)) == {0.0, 1.0} and y.mean() == 0.5
    x2, y2 = make(n=400, seed=3)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    assert not np.array_equal(x, make(n=400, seed=4)[0])


def test_circles_put_class_one_inside():
    x, y = ex.circles(n=1000, noise=0.0, factor=0.5)
    r = np.hypot(x[:, 0], x[:, 1])
    assert np.allclose(r[y == 1], 0.5, atol=1e-6) and np.allclose(r[y == 0], 1.0, atol=1e-6)


def test_experiment_names_are_unique_and_every_lesson_is_there():
    names = [e.name for e in ex.EXPERIMENTS]
    assert len(names) == len(set(names))
    assert not set(names) & set(ex.GROUPS)  # --only NAME is never ambiguous
    assert set(ex.GROUPS) == {"failure", "fewer-layers", "relu", "init", "batchnorm", "residual",
                              "exploding", "dying"}
    failure = ex.get("deep-sigmoid")
    assert failure.depth >= 10 and failure.activation == "sigmoid"
    assert "vanishing_gradient" in failure.expect
    # The repairs of the failure must not report vanishing gradients.
    for name in ("shallow-sigmoid", "deep-relu", "deep-leaky-relu", "deep-prelu",
                 "deep-tanh-xavier", "deep-sigmoid-batchnorm", "deep-sigmoid-residual"):
        assert "vanishing_gradient" in ex.get(name).forbid, name
    assert 2 <= ex.get("shallow-sigmoid").depth <= 3


def test_select_by_name_group_and_comma_list_keeps_table_order():
    assert ex.select(None) == list(ex.EXPERIMENTS)
    assert [e.name for e in ex.select(["init"])] == [
        "deep-sigmoid-xavier", "deep-tanh-xavier", "deep-relu-default-init"]
    picked = ex.select(["deep-prelu,deep-sigmoid", "residual"])
    assert [e.name for e in picked] == ["deep-sigmoid", "deep-prelu", "deep-sigmoid-residual"]
    with pytest.raises(KeyError, match="unknown experiment.*'nope'"):
        ex.select(["nope"])


def test_judge_checks_expected_and_forbidden_kinds():
    failure = ex.get("deep-sigmoid")
    assert ex.judge(failure, ["vanishing_gradient", "loss_plateau", "saturated_units"]) == []
    assert ex.judge(failure, ["loss_plateau"]) == ["expected vanishing_gradient, not reported"]
    repair = ex.get("deep-relu")
    assert ex.judge(repair, []) == []
    assert ex.judge(repair, ["vanishing_gradient"]) == [
        "vanishing_gradient reported, expected none"]
    with pytest.raises(ValueError, match="both expected and forbidden"):
        repair.with_(expect=("vanishing_gradient",))


@pytest.mark.parametrize("name", [e.name for e in ex.EXPERIMENTS])
def test_initial_weights_follow_the_spec(name):
    exp = ex.get(name)
    weights = ex.initial_weights(exp)
    assert [(w.shape, b.shape) for w, b in weights] == [
        ((i, o), (o,)) for i, o in ex.layer_dims(exp)]
    assert all(w.dtype == np.float32 and b.dtype == np.float32 for w, b in weights)
    again = ex.initial_weights(exp)
    assert all(np.array_equal(w, w2) and np.array_equal(b, b2)
               for (w, b), (w2, b2) in zip(weights, again))
    w = weights[len(weights) // 2][0]  # a hidden width x width layer
    gain = w.std() * np.sqrt(w.shape[0]) / exp.init_scale
    expected_gain = {"default": 1 / np.sqrt(3), "xavier": 1.0, "he": np.sqrt(2)}[exp.init]
    assert gain == pytest.approx(expected_gain, rel=0.15)
    if exp.bias_init is not None:
        assert all(np.all(b == exp.bias_init) for _, b in weights[:-1])


def test_layer_names_list_the_parameterised_layers_in_depth_order():
    assert ex.layer_names(ex.get("shallow-sigmoid")) == ["fc0", "fc1", "out"]
    assert ex.layer_names(ex.get("deep-sigmoid-batchnorm"))[:4] == ["fc0", "bn0", "fc1", "bn1"]
    assert ex.layer_names(ex.get("deep-prelu"))[:3] == ["fc0", "act0", "fc1"]


def test_batches_are_shuffled_epochs_of_the_data():
    exp = ex.get("deep-sigmoid")
    idx = ex.batch_indices(exp)
    assert idx.shape == (exp.steps, exp.batch)
    per_epoch = exp.n // exp.batch
    first_epoch = idx[:per_epoch].reshape(-1)
    assert sorted(first_epoch) == list(range(exp.n))  # every example once per epoch
    assert np.array_equal(idx, ex.batch_indices(exp))


def test_loss_and_accuracy_match_their_definitions():
    logits = np.array([0.0, 2.0, -3.0, 50.0, -50.0])
    y = np.array([1, 1, 0, 0, 1])
    p = 1 / (1 + np.exp(-logits))
    with np.errstate(divide="ignore"):
        naive = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    naive[3], naive[4] = 50.0, 50.0  # where the naive formula overflows
    assert ex.bce_with_logits(logits, y) == pytest.approx(naive.mean(), rel=1e-9)
    assert ex.accuracy(logits, y) == pytest.approx(2 / 5)  # 0 counts as class 0


def test_the_core_stays_framework_free():
    # Importing everything the CLI needs must not pull in a framework or matplotlib: plots
    # import matplotlib when they are drawn, adapters their framework when a run starts.
    # Asking the plugins which frameworks can run imports none of them either.
    code = ("import sys, gradwatch, gradwatch._cli, gradwatch._events, gradwatch.experiments, "
            "gradwatch._plots, gradwatch._results; "
            "runners = gradwatch.experiments.experiment_runners(); "
            "[(r.unavailable(), r.label) for r in runners.values()]; "
            "print(sorted(runners)); "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'jax', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split("\n")[:2] == ["['jax', 'keras', 'torch']", "[]"]


def test_the_package_exports_its_public_names():
    # isidentifier: gradwatch is a pytest plugin distribution, so pytest rewrites its modules'
    # asserts and adds '@py_builtins'-style globals no user can import.
    public = {n for n in vars(ex) if n.isidentifier() and not n.startswith("_")} - {"annotations"}
    assert set(ex.__all__) == public


def test_settings_default_is_what_users_get():
    assert [s.name for s in ex.SETTINGS] == ["default", "exact"]
    assert ex.DEFAULT.options() == {}  # nothing passed: the watcher's own defaults
    assert ex.EXACT.options() == {"update_ratio": "exact"}
    assert ex.select_settings("all") == list(ex.SETTINGS)
    assert ex.select_settings("exact") == [ex.EXACT]
    with pytest.raises(KeyError, match="'nope'.*all, default, exact"):
        ex.select_settings("nope")


def test_a_runner_must_say_what_it_runs():
    with pytest.raises(TypeError, match="abstract"):
        ex.ExperimentRunner()  # type: ignore[abstract]


class _Stub(ex.ExperimentRunner):
    framework = "stub"

    def versions(self) -> str:
        return "stub 1.0"

    def run(self, exp, events, settings=ex.DEFAULT):
        raise NotImplementedError


def result(exp, **changes) -> ex.RunResult:
    report = gradwatch.Report(framework="stub", steps=exp.steps, checks=1, layers=(),
                              findings=())
    fields = dict(experiment=exp.name, framework="stub", settings="default",
                  findings=(gradwatch.Finding(kind="dead_units", step=50, layer="act1",
                                              value=0.7, threshold=0.5, message="dead"),),
                  final_loss=0.4, final_accuracy=0.8, seconds=1.5, batches=exp.steps,
                  report=report, versions="stub 1.0")
    fields.update(changes)
    return ex.RunResult(**fields)


def test_a_run_record_judges_the_runner_s_result(tmp_path):
    exp = ex.get("dying-relu")
    runner = _Stub()
    assert runner.label == "stub" and runner.unavailable() is None
    good = RunRecord.of(exp, ex.DEFAULT, framework="stub", label=runner.label,
                        result=result(exp), error=None, run=None, events="events/x.jsonl")
    assert good.passed and good.kinds == ["dead_units"] and good.seconds == 1.5
    # A step gradwatch did not see is a failure, whatever the findings.
    lost = RunRecord.of(exp, ex.EXACT, framework="stub", label="stub",
                        result=result(exp, report=dataclasses.replace(
                            result(exp).report, steps=exp.steps - 1)),
                        error=None, run=None, events="events/y.jsonl")
    assert lost.problems == (f"gradwatch saw {exp.steps - 1} of {exp.steps} steps",)
    crashed = RunRecord.of(exp, ex.DEFAULT, framework="stub", label="stub", result=None,
                           error="RuntimeError: boom", run=None, events="events/z.jsonl")
    assert crashed.problems[0] == "crashed: RuntimeError: boom"
    assert crashed.final_loss is None and not crashed.passed
    table = format_table([good, lost, crashed])
    assert "settings" in table.splitlines()[0] and table.count("FAIL") == 2
    json_path, _ = write_results(tmp_path, {"command": "test"}, [good, lost, crashed], [exp])
    rows = json.loads(open(json_path).read())["runs"]
    assert [(r["settings"], r["passed"]) for r in rows] == [
        ("default", True), ("exact", False), ("default", False)]
    assert rows[0]["findings"] == [{"kind": "dead_units", "step": 50, "layer": "act1",
                                    "severity": "warning"}]
    assert rows[1]["watch_options"] == {"update_ratio": "exact"}
    assert rows[2]["seconds"] is None and rows[2]["error"] == "RuntimeError: boom"
