"""What both recorders of a fit share: the variables, their samples, the sites, the schedule."""

from __future__ import annotations

import dataclasses
from typing import Any

from gradwatch import kit

from ._activations import ActivationSampler
from ._ops import KerasOps
from ._samples import WeightSamples


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """One fit's recording plan."""

    #: The backend's ops.
    ops: KerasOps
    #: The watched variables ``[V]``.
    variables: list[Any]
    #: Their weight samples (update ratios, weight change).
    samples: WeightSamples
    #: The activation sites and their wrappers.
    activations: ActivationSampler
    #: The run's monitor: ``check_every``, ``activation_every``, the schedule.
    monitor: kit.Monitor
    #: The optimizer's iterations when the fit began (the fit's steps count from there).
    start: int
    #: Steps the recorders keep: more than one check's, since a read may come a few steps
    #: after its check step (steps_per_execution, asynchronous batch ends).
    window: int
