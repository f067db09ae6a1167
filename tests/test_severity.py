"""Severity rules: a finding is a warning (a problem) or info (a fact) from the run's evidence."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np
import pytest

import gradwatch
from gradwatch._severity import JUMP_HOLD_STEPS, STUCK_STEPS, RunEvidence, judge, judge_all


def make(kind, severity="warning", value=1.0, **evidence):
    return gradwatch.Finding(kind=kind, step=100, layer=None, value=value, threshold=1.0,
                             message=f"step 100: {kind}.", evidence=evidence,
                             severity=severity)


EV = RunEvidence(step=100)


# -- the evidence ----------------------------------------------------------------------------


@pytest.mark.parametrize("start, before, recent, falling, rising", [
    pytest.param(1.0, 1.0, 0.5, True, False, id="halved"),
    pytest.param(1.0, 0.8, 0.78, True, False, id="below-the-start"),
    pytest.param(1.0, 1.0, 0.97, False, False, id="flat"),
    pytest.param(1.0, 1.0, 1.2, False, True, id="rising"),
    pytest.param(math.nan, math.nan, math.nan, False, False, id="no-loss"),
])
def test_loss_trend(start, before, recent, falling, rising):
    ev = RunEvidence(step=1, loss_start=start, loss_before=before, loss_recent=recent)
    assert (ev.loss_falling, ev.loss_rising) == (falling, rising)


# -- one rule per kind -----------------------------------------------------------------------


@pytest.mark.parametrize("lr_fraction, severity", [
    pytest.param(0.05, "info", id="schedule-decayed-to-5%"),
    pytest.param(0.1, "info", id="decayed-to-10%"),
    pytest.param(0.5, "warning", id="half-the-peak"),
    pytest.param(None, "warning", id="lr-unknown"),
])
def test_a_stall_at_the_end_of_an_lr_schedule_is_info(lr_fraction, severity):
    f = judge(make("stalled_update"), dataclasses.replace(EV, lr_fraction=lr_fraction))
    assert f.severity == severity
    assert ("schedule" in f.message) is (severity == "info")


@pytest.mark.parametrize("clipping, recent, active, severity", [
    pytest.param(True, 1.0, frozenset(), "info", id="clipped-loss-flat"),
    pytest.param(True, 2.0, frozenset(), "warning", id="clipped-but-the-loss-rises"),
    pytest.param(True, 1.0, frozenset({"loss_divergence"}), "warning", id="clipped-diverging"),
    pytest.param(False, 1.0, frozenset(), "warning", id="not-clipped"),
])
def test_a_spike_that_clipping_contains_is_info(clipping, recent, active, severity):
    ev = dataclasses.replace(EV, clipping=clipping, loss_before=1.0, loss_recent=recent,
                             active=active)
    assert judge(make("exploding_gradient"), ev).severity == severity


@pytest.mark.parametrize("growth, recent, severity", [
    pytest.param(50.0, 0.5, "info", id="growing-while-the-loss-falls"),
    pytest.param(50.0, 1.0, "warning", id="growing-but-the-loss-is-flat"),
    pytest.param(1.0, 0.5, "warning", id="not-growing"),
])
def test_a_starved_layer_that_grows_while_the_loss_falls_is_warming_up(growth, recent, severity):
    ev = dataclasses.replace(EV, loss_start=1.0, loss_before=1.0, loss_recent=recent)
    assert judge(make("vanishing_gradient", growth=growth), ev).severity == severity


@pytest.mark.parametrize("stuck, waited, active, seen, severity", [
    pytest.param(False, 300, frozenset(), frozenset(), "info", id="converged"),
    pytest.param(True, 300, frozenset(), frozenset(), "info", id="stuck-alone-for-a-while"),
    pytest.param(True, STUCK_STEPS, frozenset(), frozenset(), "warning", id="stuck-for-good"),
    pytest.param(True, 300, frozenset({"vanishing_gradient"}), frozenset(), "warning",
                 id="explained-by-vanishing"),
    pytest.param(True, 300, frozenset(), frozenset({"loss_divergence"}), "warning",
                 id="after-a-blow-up"),
    pytest.param(True, 300, frozenset({"saturated_units"}), frozenset(), "info",
                 id="saturation-does-not-explain"),
    pytest.param(False, 300, frozenset({"vanishing_gradient"}), frozenset(), "info",
                 id="converged-beside-vanishing"),
])
def test_a_plateau_is_a_warning_when_explained_or_lasting(stuck, waited, active, seen, severity):
    ev = dataclasses.replace(EV, active=active, seen=seen)
    assert judge(make("loss_plateau", value=waited, stuck=stuck), ev).severity == severity


def test_a_plateau_without_the_detectors_evidence_keeps_its_severity():
    assert judge(make("loss_plateau"), EV).severity == "warning"


@pytest.mark.parametrize("active, severity", [
    pytest.param(frozenset(), "info", id="alone"),
    pytest.param(frozenset({"vanishing_gradient"}), "warning", id="gradient-vanishes"),
    pytest.param(frozenset({"loss_plateau"}), "warning", id="loss-stuck-for-good"),
])
def test_saturation_is_a_warning_only_when_it_hurts(active, severity):
    assert judge(make("saturated_units"), dataclasses.replace(EV, active=active)).severity == severity


@pytest.mark.parametrize("evidence, active, severity", [
    pytest.param(dict(test="jump", held=5, ongoing=True), frozenset(), "info", id="jump-so-far"),
    pytest.param(dict(test="jump", held=5, ongoing=False), frozenset(), "info", id="came-back"),
    pytest.param(dict(test="jump", held=JUMP_HOLD_STEPS, ongoing=True), frozenset(), "warning",
                 id="jump-that-holds"),
    pytest.param(dict(test="jump", held=3, ongoing=True), frozenset({"nonfinite"}), "warning",
                 id="jump-with-nan"),
    pytest.param(dict(test="rise"), frozenset(), "warning", id="rise"),
    pytest.param({}, frozenset(), "warning", id="third-party-evidence"),
])
def test_a_loss_jump_is_a_warning_once_it_holds(evidence, active, severity):
    f = judge(make("loss_divergence", **evidence), dataclasses.replace(EV, active=active))
    assert f.severity == severity
    if severity == "info":
        assert ("came back down" in f.message) is (not evidence["ongoing"])


def test_kinds_without_a_rule_and_info_findings_keep_their_severity():
    assert judge(make("nonfinite"), EV).severity == "warning"
    assert judge(make("stalled_update", severity="info"), EV).severity == "info"


def test_info_message_says_why():
    f = judge(make("stalled_update"), dataclasses.replace(EV, lr_fraction=0.01))
    assert f.message.startswith("step 100: stalled_update") and "(info: " in f.message


# -- findings judged together ----------------------------------------------------------------


def test_saturation_and_a_short_stuck_plateau_do_not_make_each_other_warnings():
    out = judge_all([make("saturated_units"), make("loss_plateau", value=300, stuck=True)], EV)
    assert [f.severity for f in out] == ["info", "info"]


def test_a_vanishing_gradient_makes_the_plateau_and_saturation_beside_it_warnings():
    found = [make("saturated_units"), make("loss_plateau", value=300, stuck=True),
             make("vanishing_gradient", growth=1.0)]
    assert [f.severity for f in judge_all(found, EV)] == ["warning"] * 3


def test_a_warming_up_layer_explains_no_plateau():
    ev = dataclasses.replace(EV, loss_start=1.0, loss_before=1.0, loss_recent=0.5)
    found = [make("loss_plateau", value=300, stuck=True), make("vanishing_gradient", growth=9.0)]
    assert [f.severity for f in judge_all(found, ev)] == ["info", "info"]


def test_unruled_findings_keep_their_detectors_severity():
    found = [make("stalled_update")]
    ev = dataclasses.replace(EV, lr_fraction=0.01)
    assert judge_all(found, ev, ruled=[False])[0].severity == "warning"


# -- in the monitor --------------------------------------------------------------------------


def flat_checks(n_steps, every=10, loss=0.69):
    for end in range(every, n_steps + 1, every):
        steps = np.arange(end - every + 1, end + 1)
        yield gradwatch.StepStats(
            step=end, layers=("0",), steps=steps, grad_norm=np.ones((every, 1)),
            has_grad=np.ones((every, 1), bool), loss=np.full(every, loss), grad_size=np.ones(1))


def test_a_stuck_plateau_is_logged_as_info_then_warned_once_it_lasts(caplog):
    caplog.set_level(logging.INFO, logger="gradwatch")
    ctx = gradwatch.RunContext(model=gradwatch.ModelInfo(framework="test"),
                               layers=(gradwatch.LayerInfo("0", "Linear", 4),))
    mon = gradwatch.Monitor(ctx, detectors=[gradwatch.LossPlateauDetector()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for stats in flat_checks(STUCK_STEPS + 100):
            mon.check(stats)
    told = [w for w in record if issubclass(w.category, gradwatch.LossPlateauWarning)]
    first, second = mon.findings
    assert (first.severity, second.severity) == ("info", "warning")
    assert first.step < 300 and second.step >= STUCK_STEPS
    assert len(told) == 1 and "stuck" in str(told[0].message)
    assert any("(info)" in r.getMessage() for r in caplog.records)  # the fact was logged
    assert mon.report().warnings == (second,)


def test_strict_mode_does_not_stop_on_info():
    ctx = gradwatch.RunContext(model=gradwatch.ModelInfo(framework="test"),
                               layers=(gradwatch.LayerInfo("0", "Linear", 4),))
    mon = gradwatch.Monitor(ctx, detectors=[gradwatch.LossPlateauDetector()], on_finding="raise")
    for stats in flat_checks(400):
        mon.check(stats)  # a stuck plateau for 400 steps: a fact, no raise
    assert [f.severity for f in mon.findings] == ["info"]
    with pytest.raises(gradwatch.GradientHealthError):
        for stats in flat_checks(STUCK_STEPS + 100):
            if stats.step > 400:
                mon.check(stats)


def test_the_event_file_keeps_the_severity(tmp_path):
    import json

    ctx = gradwatch.RunContext(model=gradwatch.ModelInfo(framework="test"),
                               layers=(gradwatch.LayerInfo("0", "Linear", 4),))
    path = tmp_path / "run.jsonl"
    mon = gradwatch.Monitor(ctx, detectors=[gradwatch.LossPlateauDetector()], events=path,
                            on_finding="log")
    for stats in flat_checks(300):
        mon.check(stats)
    mon.end()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    [f] = [e for e in events if e["event"] == "finding"]
    assert f["severity"] == "info"
    assert gradwatch.Finding.from_dict(f).severity == "info"


def test_a_run_knocked_into_a_trivial_solution_is_warned_at_its_plateau():
    """GPT-2 at lr 0.2: the loss blows up in its first steps, then sits just below its start
    (the unigram entropy). Stuck, with a 5-step peak far above the start: a warning at once,
    with the divergence advice, not 'check that the loss depends on these layers'."""
    det = gradwatch.LossPlateauDetector()
    det.bind(gradwatch.RunContext(model=gradwatch.ModelInfo(framework="test",
                                                            learning_rates=(0.2,)),
                                  layers=(gradwatch.LayerInfo("0", "Linear", 4),)))
    losses = [4.2, 5.5, 7.4, 7.0, 6.5, 6.0] + [3.9] * 300
    found = None
    for start in range(0, len(losses), 10):
        chunk = losses[start:start + 10]
        steps = np.arange(start + 1, start + len(chunk) + 1)
        stats = gradwatch.StepStats(step=int(steps[-1]), layers=("0",), steps=steps,
                                    grad_norm=np.ones((len(chunk), 1)),
                                    has_grad=np.ones((len(chunk), 1), bool),
                                    loss=np.array(chunk), grad_size=np.ones(1))
        result = det.update(stats)
        if result:
            found = result[0]
            break
    assert found is not None and found.step <= 250
    assert found.evidence["stuck"] is True and found.evidence["first"] == pytest.approx(4.2)
    assert found.evidence["peak"] >= 1.3
    assert "trivial solution" in found.message
    assert any("learning rate" in a for a in found.advice)
    assert judge(found, EV).severity == "warning"
    # the same plateau without the blow-up is a fact for now
    calm = dataclasses.replace(found, evidence={**found.evidence, "peak": 1.0})
    assert judge(calm, EV).severity == "info"


def loss_checks(losses, every=10):
    for end in range(every, len(losses) + 1, every):
        steps = np.arange(end - every + 1, end + 1)
        yield gradwatch.StepStats(
            step=end, layers=("0",), steps=steps, grad_norm=np.ones((every, 1)),
            has_grad=np.ones((every, 1), bool), loss=np.array(losses[end - every:end], float),
            grad_size=np.ones(1))


@pytest.mark.parametrize("length, warned", [
    pytest.param(6, False, id="a-6-step-excursion"),
    pytest.param(40, True, id="a-divergence-that-holds"),
])
def test_a_loss_excursion_that_recovers_is_info_and_a_divergence_is_warned(length, warned):
    # converged at 0.02 from a start of 0.7, then a jump to 1.4 for `length` steps
    losses = [0.7] * 20 + list(np.geomspace(0.7, 0.02, 60)) + [0.02] * 120
    losses += [1.4] * length + [0.02] * 60
    ctx = gradwatch.RunContext(model=gradwatch.ModelInfo(framework="test"),
                               layers=(gradwatch.LayerInfo("0", "Linear", 4),))
    mon = gradwatch.Monitor(ctx, detectors=[gradwatch.LossDivergenceDetector()])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for stats in loss_checks(losses):
            mon.check(stats)
    told = [w for w in record if issubclass(w.category, gradwatch.LossDivergenceWarning)]
    kinds = [(f.kind, f.severity) for f in mon.findings]
    assert ("loss_divergence", "info") in kinds  # the jump is told at once, as a fact
    assert bool(told) is warned and (("loss_divergence", "warning") in kinds) is warned
    if warned:  # one check later than the jump test first held
        first_info = next(f for f in mon.findings if f.severity == "info")
        warning = next(f for f in mon.findings if f.is_warning)
        assert 0 < warning.step - first_info.step <= 2 * 10
