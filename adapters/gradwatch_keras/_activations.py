"""Forward activations: which outputs are sampled, the wrappers that see them, and their measure.

A layer's ``activation`` (ReLU, sigmoid, tanh) or a ``ReLU`` layer's ``call`` is wrapped for the
fit. On activation steps the wrapper keeps the output: in graph mode as a tensor of the trace
(the graph recorder measures it inside the check step's cond, so other steps pay nothing per
site), in eager mode as its measured value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import keras
from keras import ops

from gradwatch import kit

from ._distribute import all_reduce, replica
from ._kinds import RECURRENT, function_kind
from ._model import relative_path
from ._ops import is_tracing


class Probe(NamedTuple):
    """How one site's outputs are measured."""

    #: ``"relu"`` (dead units), ``"sigmoid"`` or ``"tanh"`` (saturated outputs).
    kind: str
    #: The outputs are already >= 0 (a ReLU that does not leak).
    nonneg: bool


def activation_value(y: Any, probe: Probe) -> Any:
    """Dead fraction of a ReLU's units, or saturated fraction of a sigmoid/tanh's outputs."""
    y = ops.cast(y, "float32")
    units = int(y.shape[-1]) if y.shape[-1] is not None else 1
    if probe.kind == "relu":
        # A unit is alive when its outputs sum to more than 0, a reduction much cheaper than
        # any(y > 0).
        total = ops.sum(ops.reshape(y if probe.nonneg else ops.relu(y), (-1, units)), axis=0)
        return 1 - ops.mean(ops.cast(total > 0, "float32"))
    if probe.kind == "sigmoid":
        return ops.mean(ops.cast(y * (1 - y) < 0.25 * kit.SATURATION_DERIVATIVE, "float32"))
    return ops.mean(ops.cast(1 - y * y < kit.SATURATION_DERIVATIVE, "float32"))


class ActivationSampler:
    """The activation sites of one fit and what their wrappers kept.

    Args:
        monitor: The run's monitor (schedule, guard).
        eager_gating: Whether wrappers stay idle outside activation steps (the PyTorch backend,
            where every step runs eagerly); elsewhere the step may be traced, and tracing must
            see the wrappers work.
    """

    def __init__(self, monitor: kit.Monitor, eager_gating: bool) -> None:
        self._monitor = monitor
        self._eager_gating = eager_gating
        #: Sampled sites, in model order (``units`` known once an output was seen).
        self.sites: list[kit.ActivationSite] = []
        self._wrapped: list[tuple[Any, str, Any]] = []
        #: Whether the wrappers look at outputs at all (the next step samples, or may be traced).
        self.due = False
        #: The fit's step about to run (eager mode).
        self._next = 1
        #: Validation and predict batches run the same layers; they are not training steps.
        self.in_test = False
        #: Graph mode: the outputs the step being traced produced, by replica and site.
        self.traced: dict[int, dict[int, tuple[Any, Probe]]] = {}
        #: Eager mode: measured values of the step that just ran, by site.
        self.eager: dict[int, Any] = {}

    def wrap(self, model: Any) -> None:
        """Wrap the model's sampled activations (none when activation sampling is off)."""
        if self._monitor.activation_every is None:
            return
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if type(layer).__name__ in RECURRENT:
                continue  # their activations act inside the cell's loop
            fn = getattr(layer, "activation", None)
            if isinstance(fn, keras.layers.Layer):
                continue  # (activation=keras.layers.ReLU()): that layer is a site of its own
            kind = kit.SAMPLED_ACTIVATIONS.get(function_kind(fn) or "")
            nonneg = kind == "relu"  # ReLU outputs are >= 0 (a ReLU layer's too, unless it leaks)
            if kind is None and type(layer).__name__ == "ReLU":
                kind, fn = "relu", None
                nonneg = not getattr(layer, "negative_slope", 0)
            if kind is None:
                continue
            index = len(self.sites)
            self.sites.append(kit.ActivationSite(relative_path(layer, model), kind))
            attr = "activation" if fn is not None else "call"
            original = fn if fn is not None else layer.call
            self._wrapped.append((layer, attr, original))
            setattr(layer, attr, self._wrapper(original, Probe(kind, nonneg), index))
        self.step_done(0)

    def unwrap(self) -> None:
        for layer, attr, original in self._wrapped:
            if attr == "call":
                vars(layer).pop("call", None)  # the class's own method shows through again
            else:
                setattr(layer, attr, original)
        self._wrapped = []
        self.due = False

    def step_done(self, step: int) -> None:
        """Eager mode: the fit's step ``step`` ran; the wrappers get ready for the next."""
        self._next = step + 1
        self.due = bool(self._wrapped) and (
            not self._eager_gating or self._monitor.is_activation_step(self._next))

    def _wrapper(self, fn: Any, probe: Probe, index: int) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            y = fn(*args, **kwargs)
            if self.due:
                self._monitor.guard("keras adapter (activations)", self._sample, y, probe, index)
            return y

        wrapped.__name__ = getattr(fn, "__name__", "activation")
        return wrapped

    def _sample(self, y: Any, probe: Probe, index: int) -> None:
        if self.in_test or len(getattr(y, "shape", ())) < 2:
            return  # (while tracing test_step, in_test keeps the sampling out of its graph)
        site = self.sites[index]
        if not site.units:
            self.sites[index] = dataclasses.replace(site, units=int(y.shape[-1] or 0))
        if is_tracing():
            # Only kept here; the check step's cond measures it on activation steps.
            self.traced.setdefault(replica()[0], {})[index] = (y, probe)
            return
        if not self._monitor.is_activation_step(self._next):
            return
        value = activation_value(y, probe)
        rid, replicas = replica()
        if replicas > 1:  # eager tf.distribute: the mean over the replicas' shards
            value = all_reduce("MEAN", value)
        if not rid:
            self.eager[index] = value

    def take_traced(self, rid: int) -> dict[int, tuple[Any, Probe]]:
        """What the step being traced on replica ``rid`` kept (forgotten here)."""
        return self.traced.pop(rid, {})

    def take_eager(self) -> dict[int, Any]:
        """Eager mode: the measured values since the last read (forgotten here)."""
        out, self.eager = self.eager, {}
        return out
