"""Findings, the warning categories they are raised as, and the strict-mode error."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

#: Every kind a built-in detector produces; third-party detectors may add their own.
KINDS = (
    "vanishing_gradient",
    "exploding_gradient",
    "nonfinite",
    "loss_plateau",
    "loss_divergence",
    "stalled_update",
    "large_update",
    "dead_units",
    "saturated_units",
)


#: A finding's severity: ``"warning"`` is a problem (a Python warning of its category by default);
#: ``"info"`` is a fact worth logging that is not a problem on the evidence so far (an INFO log
#: record, kept in ``findings``, the report and the event file; no Python warning).
SEVERITIES = ("warning", "info")


class GradientHealthWarning(UserWarning):
    """Base category of every warning gradwatch emits for a finding."""


class VanishingGradientWarning(GradientHealthWarning):
    """Layers receive almost no gradient."""


class ExplodingGradientWarning(GradientHealthWarning):
    """Gradients are far above their own history or grow with depth."""


class NonFiniteWarning(GradientHealthWarning):
    """NaN or Inf in gradients, weights or the loss."""


class LossPlateauWarning(GradientHealthWarning):
    """The loss stopped improving."""


class LossDivergenceWarning(GradientHealthWarning):
    """The loss spiked or rose far above its best."""


class UpdateRatioWarning(GradientHealthWarning):
    """Weight updates are far too small (stalled) or far too large for the weights."""


class DeadUnitsWarning(GradientHealthWarning):
    """A large share of ReLU units output zero for a whole batch."""


class SaturationWarning(GradientHealthWarning):
    """Sigmoid/tanh units sit in their flat region, where the gradient vanishes."""


class GradWatchInternalWarning(RuntimeWarning):
    """gradwatch itself failed (a detector bug, an unwritable file); training goes on."""


class GradientHealthError(RuntimeError):
    """Raised at a finding in strict mode (``on_finding="raise"``)."""

    def __init__(self, finding: Finding) -> None:
        super().__init__(finding.message)
        #: The finding that stopped training.
        self.finding = finding


WARNING_FOR_KIND: dict[str, type[GradientHealthWarning]] = {
    "vanishing_gradient": VanishingGradientWarning,
    "exploding_gradient": ExplodingGradientWarning,
    "nonfinite": NonFiniteWarning,
    "loss_plateau": LossPlateauWarning,
    "loss_divergence": LossDivergenceWarning,
    "stalled_update": UpdateRatioWarning,
    "large_update": UpdateRatioWarning,
    "dead_units": DeadUnitsWarning,
    "saturated_units": SaturationWarning,
}


def register_warning_category(kind: str, category: type[GradientHealthWarning]) -> None:
    """Emit findings of a third-party ``kind`` as ``category`` (a subclass of
    :class:`GradientHealthWarning`). A built-in kind keeps its own class."""
    if not isinstance(category, type) or not issubclass(category, GradientHealthWarning):
        raise TypeError(f"the warning category of kind {kind!r} must be a subclass of "
                        f"gradwatch.GradientHealthWarning, got {category!r}")
    if kind in KINDS:
        if WARNING_FOR_KIND[kind] is not category:
            raise ValueError(f"kind {kind!r} is built in; it is emitted as "
                             f"{WARNING_FOR_KIND[kind].__name__}")
        return
    WARNING_FOR_KIND[kind] = category


def warning_category(kind: str) -> type[GradientHealthWarning]:
    """The warning class a finding of ``kind`` is emitted as (the base class for unknown kinds)."""
    return WARNING_FOR_KIND.get(kind, GradientHealthWarning)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One unhealthy condition, reported when it starts.

    ``value`` is the observed statistic and ``threshold`` the limit it crossed, in the units the
    message states. ``evidence`` holds the numbers behind the message (JSON-serialisable).
    """

    #: One of :data:`KINDS` (or a third-party detector's own kind).
    kind: str
    #: Optimizer step at which the condition was observed.
    step: int
    #: Framework layer name, or ``None`` for model-wide conditions (the loss).
    layer: str | None
    value: float
    threshold: float
    #: One line a person reads in the log: what, where, the evidence.
    message: str
    #: Concrete mitigations, most likely first.
    advice: tuple[str, ...] = ()
    evidence: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: ``"warning"`` or ``"info"`` (see :data:`SEVERITIES`), decided per finding from evidence.
    severity: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise TypeError(f"Finding.kind must be a non-empty str, got {self.kind!r}")
        if isinstance(self.step, bool) or not isinstance(self.step, numbers.Integral) or self.step < 0:
            raise TypeError(f"Finding.step must be an int >= 0, got {self.step!r}")
        object.__setattr__(self, "step", int(self.step))
        if self.layer is not None and not isinstance(self.layer, str):
            raise TypeError(f"Finding.layer must be a str or None, got {self.layer!r}")
        object.__setattr__(self, "value", float(self.value))
        object.__setattr__(self, "threshold", float(self.threshold))
        object.__setattr__(self, "advice", tuple(str(a) for a in self.advice))
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def is_warning(self) -> bool:
        """True for a warning-severity finding (a problem), False for an info one (a fact)."""
        return self.severity == "warning"

    @property
    def category(self) -> type[GradientHealthWarning]:
        """The warning class this finding is emitted as."""
        return warning_category(self.kind)

    def render(self) -> str:
        """The message followed by the advice, as written to the log."""
        if not self.advice:
            return self.message
        return self.message + " Try: " + "; ".join(self.advice) + "."

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become the strings "NaN"/"Infinity")."""
        return {
            "kind": self.kind,
            "step": self.step,
            "layer": self.layer,
            "value": json_number(self.value),
            "threshold": json_number(self.threshold),
            "message": self.message,
            "advice": list(self.advice),
            "evidence": to_json_ready(dict(self.evidence)),
            "severity": self.severity,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            kind=data["kind"],
            step=int(data["step"]),
            layer=data.get("layer"),
            value=from_json_number(data.get("value")),
            threshold=from_json_number(data.get("threshold")),
            message=str(data.get("message", "")),
            advice=tuple(data.get("advice", ())),
            evidence=dict(data.get("evidence") or {}),
            severity=str(data.get("severity", "warning")),
        )


def json_number(x: float) -> float | str | None:
    """Strict JSON has no NaN/Infinity: spell them as strings so a reader can restore them."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def from_json_number(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, str):
        if x not in ("NaN", "Infinity", "-Infinity"):
            raise ValueError(f"not a number: {x!r}")
        return float(x.replace("Infinity", "inf"))
    return float(x)


def to_json_ready(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and non-finite floats to strict-JSON values."""
    if isinstance(obj, Mapping):
        return {str(k): to_json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_ready(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_json_ready(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return json_number(obj)
    return str(obj)
