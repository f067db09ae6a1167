"""Severity: whether a finding is a problem (a warning) or a fact (info), from the whole run.

A detector looks at one signal. Whether what it found is a problem often depends on the others:
a stalled update is the LR schedule doing its job when the LR has decayed to a tenth of its peak;
a gradient spike that clipping contains while the loss does not follow is not an explosion; a
plateau or saturated units are worth a warning when something explains them or the loss is stuck.
Those decisions live here, one small rule per kind, each reading a :class:`RunEvidence` that the
monitor assembles at every check, so every rule can be tested with plain values.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from ._findings import Finding

#: The kinds that explain a stuck loss (a plateau is then a symptom with a cause). Saturation
#: is not among them: it is itself a warning only when it hurts (see ``_saturated``), and two
#: facts that would explain each other must not make each other warnings.
EXPLAINS_PLATEAU = frozenset({"vanishing_gradient", "stalled_update", "dead_units",
                              "loss_divergence", "exploding_gradient", "nonfinite"})


@dataclasses.dataclass(frozen=True)
class RunEvidence:
    """What the run as a whole says at one check, beside the finding being judged."""

    step: int
    #: Kinds held at warning severity at this check by any detector (the finding judged
    #: excluded), and kinds that were ever raised as warnings earlier in the run.
    active: frozenset[str] = frozenset()
    seen: frozenset[str] = frozenset()
    #: The current learning rate over the largest the run has used (the LR schedule's decay);
    #: ``None`` when the adapter does not know the learning rate.
    lr_fraction: float | None = None
    #: The adapter saw the gradients being clipped (or otherwise rescaled) before the step.
    clipping: bool = False
    #: The loss at the start of the run (median of the first few), the median of the recent
    #: steps, and that of the steps about ``trend_steps`` before them; NaN when not observed.
    loss_start: float = math.nan
    loss_recent: float = math.nan
    loss_before: float = math.nan

    @property
    def loss_falling(self) -> bool:
        """The loss is clearly going down: 5 % below where it was a few checks ago, or 10 %
        below its start."""
        recent = self.loss_recent
        if not math.isfinite(recent):
            return False
        before, start = self.loss_before, self.loss_start
        return ((math.isfinite(before) and recent < before - 0.05 * abs(before))
                or (math.isfinite(start) and recent < start - 0.1 * abs(start)))

    @property
    def loss_rising(self) -> bool:
        """The loss is clearly going up: 10 % above where it was a few checks ago."""
        recent, before = self.loss_recent, self.loss_before
        return math.isfinite(recent) and math.isfinite(before) and recent > before + 0.1 * abs(before)


#: A rule returns ``(severity, why)``; ``why`` is appended to an info finding's message.
Rule = Callable[[Finding, RunEvidence], "tuple[str, str]"]

#: An LR at or below this fraction of the run's peak is a decayed schedule.
LR_DECAYED = 0.1
#: A starved layer whose gradient grew this much over its starved checks is warming up.
WARMUP_GROWTH = 3.0
#: A stuck plateau with nothing to explain it is a warning once it lasts this many steps.
STUCK_STEPS = 1000
#: A run whose 5-step median loss rose this far above its start before it got stuck was
#: knocked into a trivial solution (a blow-up, then the unigram or class-prior loss).
BLOWN_UP = 1.3
#: A loss below this fraction of its start: the model has clearly learnt.
LEARNT = 0.5
#: A jump in the loss is a divergence (a warning) once it has held this many steps in a row;
#: before that, and when it came back down sooner, it is an excursion (info). Twice the jump
#: test's default ``spike_steps``: the 5-step median can only stay up for 10 steps when most of
#: those steps' losses are high. A real divergence costs one more check to be a warning.
JUMP_HOLD_STEPS = 10


def _stalled(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    if ev.lr_fraction is not None and ev.lr_fraction <= LR_DECAYED:
        return "info", (f"the learning-rate schedule has decayed the LR to "
                        f"{100 * ev.lr_fraction:.2g}% of its peak, so small updates are expected")
    return "warning", ""


def _exploding(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    if ev.clipping and not ev.loss_rising and not ({"loss_divergence", "nonfinite"} & ev.active):
        return "info", "the gradients are clipped before the step and the loss does not follow"
    return "warning", ""


def _vanishing(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    growth = f.evidence.get("growth") if isinstance(f.evidence, dict) else None
    if growth is None or not ev.loss_falling:
        return "warning", ""
    if growth >= WARMUP_GROWTH:
        return "info", (f"the gradient grew {growth:.2g}x over these checks while the loss falls: "
                        "warm-up, not vanishing (a warning follows if it stops growing)")
    if ev.loss_recent < LEARNT * ev.loss_start:
        return "info", (f"the loss fell to {ev.loss_recent / ev.loss_start:.2g} of its start, so "
                        "the model learns without these layers' help (a warning follows if "
                        "the loss stops falling)")
    return "warning", ""


def _large_update(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    if ev.loss_falling and not ev.loss_rising and not (
            {"loss_divergence", "nonfinite", "exploding_gradient"} & ev.active):
        return "info", "the loss keeps falling, so the large steps do not hurt (yet)"
    return "warning", ""


def _plateau(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    stuck = f.evidence.get("stuck") if isinstance(f.evidence, dict) else None
    if stuck is None:
        return "warning", ""  # not a plateau the built-in detector measured: nothing to weigh
    if not stuck:
        return "info", "the loss fell before it levelled off, which is what convergence looks like"
    causes = sorted((ev.active | ev.seen) & EXPLAINS_PLATEAU)
    if causes:
        return "warning", ""
    peak = f.evidence.get("peak")
    if peak is not None and peak >= BLOWN_UP:
        return "warning", ""
    waited = float(f.value)
    if waited >= STUCK_STEPS:
        return "warning", ""
    return "info", (f"nothing else is wrong yet; deep nets often sit at their starting loss "
                    f"before they learn (a warning follows after {STUCK_STEPS} steps)")


def _divergence(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    evidence = f.evidence if isinstance(f.evidence, dict) else {}
    held = evidence.get("held")
    if evidence.get("test") != "jump" or held is None or held >= JUMP_HOLD_STEPS:
        return "warning", ""
    if "nonfinite" in ev.active:
        return "warning", ""  # the jump came with Inf/NaN: no excursion
    if evidence.get("ongoing"):
        return "info", (f"the jump has held for {held} steps so far; a warning follows if it "
                        f"holds for {JUMP_HOLD_STEPS}")
    return "info", (f"the loss came back down after {held} steps: an excursion, not a "
                    f"divergence")


def _saturated(f: Finding, ev: RunEvidence) -> tuple[str, str]:
    # It hurts when the gradient vanishes or the loss is stuck for good (a plateau that is a
    # warning); a tanh net fed unscaled inputs that still learns is only a fact.
    if {"vanishing_gradient", "loss_plateau"} & ev.active:
        return "warning", ""
    return "info", "the gradient still flows and the loss is not stuck for good, so it does not hurt yet"


#: Rules in the order they are applied: a rule sees the severities decided before it (a plateau
#: sees whether the vanishing gradient beside it is a warning; saturation sees the plateau).
RULES: dict[str, Rule] = {
    "stalled_update": _stalled,
    "exploding_gradient": _exploding,
    "vanishing_gradient": _vanishing,
    "large_update": _large_update,
    "loss_divergence": _divergence,
    "loss_plateau": _plateau,
    "saturated_units": _saturated,
}


def judge(finding: Finding, evidence: RunEvidence) -> Finding:
    """The finding with the severity its rule gives on ``evidence`` (kinds without a rule, and
    findings a detector already marked as info, keep theirs)."""
    rule = RULES.get(finding.kind)
    if rule is None or finding.severity == "info":
        return finding
    severity, why = rule(finding, evidence)
    if severity == finding.severity:
        return finding
    message = finding.message
    if why:
        message = f"{message.rstrip('.')} (info: {why})."
    return dataclasses.replace(finding, severity=severity, message=message)


def judge_all(findings: list[Finding], evidence: RunEvidence,
              ruled: list[bool] | None = None) -> list[Finding]:
    """Judge the findings of one check together, in :data:`RULES` order: each sees, as
    ``active``, the warning-severity kinds of the others (decided ones with their final
    severity, the rest with their detector's). ``ruled[i]`` False leaves finding ``i`` as its
    detector made it (a third-party detector decides its own severity)."""
    out = list(findings)
    order = {kind: i for i, kind in enumerate(RULES)}
    for i in sorted(range(len(out)), key=lambda j: order.get(out[j].kind, -1)):
        if out[i].kind not in RULES or (ruled is not None and not ruled[i]):
            continue
        others = frozenset(f.kind for j, f in enumerate(out) if j != i and f.is_warning)
        out[i] = judge(out[i], dataclasses.replace(evidence, active=evidence.active | others))
    return out
