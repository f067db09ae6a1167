"""What detectors know about the run besides the numbers: the layers and the model's makeup."""

from __future__ import annotations

import dataclasses

from ._stats import LayerInfo, ModelInfo


@dataclasses.dataclass
class RunContext:
    """Layers in depth order plus the model summary the adapter built; shared by all detectors.

    Mutable on purpose: an adapter refreshes ``model`` (e.g. the learning rate after a scheduler
    step, clipping once observed) and every detector sees it on its next message.
    """

    model: ModelInfo
    layers: tuple[LayerInfo, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def describe(self, index: int) -> str:
        """``'0' (Linear, first of 11)`` — the layer, its type and where it sits."""
        layer = self.layers[index]
        n = len(self.layers)
        if n == 1:
            where = "the only layer"
        elif index == 0:
            where = f"first of {n}"
        elif index == n - 1:
            where = f"last of {n}"
        else:
            where = f"{index + 1} of {n}"
        return f"'{layer.name}' ({layer.type}, {where})"

    def span(self, indices: list[int]) -> str:
        """Name a set of layers compactly: ``'0'-'6' (7 of 11 layers)`` or a short list."""
        names = [self.layers[i].name for i in indices]
        n = len(self.layers)
        if len(indices) == 1:
            return f"layer '{names[0]}'"
        contiguous = indices == list(range(indices[0], indices[-1] + 1))
        if contiguous:
            return f"layers '{names[0]}'-'{names[-1]}' ({len(indices)} of {n})"
        shown = ", ".join(f"'{x}'" for x in names[:6])
        more = f" and {len(names) - 6} more" if len(names) > 6 else ""
        return f"layers {shown}{more} ({len(indices)} of {n})"


def empty_context(layers: tuple[str, ...] = ()) -> RunContext:
    """A context with bare layer names and no model knowledge (for tests and generic use)."""
    return RunContext(
        model=ModelInfo(framework="unknown", depth=len(layers)),
        layers=tuple(LayerInfo(name=n, type="Layer", num_params=0) for n in layers),
    )


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What sinks are told about the watched run: a frozen description, not the engine.

    Handed to every sink hook; a new one is made when the adapter reports a change (layers,
    learning rate, clipping), so a sink that keeps one keeps what was true when it got it.
    """

    #: The run name given to the watcher (``name=``), or ``None``.
    name: str | None
    #: The adapter's framework name: ``"torch"``, ``"keras"``, or a third party's.
    framework: str
    #: The watched layers in depth order.
    layers: tuple[LayerInfo, ...]
    #: What the adapter saw of the model (activations, normalisation, optimizer, LR, clipping).
    model: ModelInfo
    #: Optimizer steps between checks.
    check_every: int
    #: Steps between activation samples and detail checks, or ``None`` when disabled.
    activation_every: int | None

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)
