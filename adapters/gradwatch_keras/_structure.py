"""What a Keras model's graph says: parameterised depth, skip connections, activation ops."""

from __future__ import annotations

from typing import Any

import keras

from ._kinds import activation_kind, has_kernel

#: Merges that gate rather than combine (squeeze-excitation, GLU): a multiplicative path past a
#: parameterised layer is not taken for a skip connection.
GATES = {"Multiply", "Dot"}


class Structure:
    """What a model's graph says about skip connections and functional activations.

    ``facts(layer)`` is ``(depth, skip)``: depth, the number of parameterised layers (see
    :func:`has_kernel`) on the longest path through the layer; skip, True when its graph has a
    skip connection, False when its graph can be read and has none, None when some part cannot
    be read (a subclassed model's ``call``, a custom layer that calls sub-layers) and no skip
    was found elsewhere.

    A skip connection: a node of a functional graph with several input tensors (``Add``,
    ``Concatenate``, ``Average``, ``Maximum``, ``keras.ops.add``, ... , anything but a
    multiplicative gate) where two of them come from the same model input through different
    numbers of parameterised layers: one path goes through a parameterised layer that the other
    skips (ResNet's ``Add``, DenseNet's ``Concatenate``, a projection shortcut).
    """

    def __init__(self) -> None:
        self._memo: dict[int, tuple[int, bool | None]] = {}
        #: Activation kinds of the operations of functional graphs (``keras.ops.relu(x)``).
        self.op_activations: list[str] = []

    def facts(self, layer: Any) -> tuple[int, bool | None]:
        key = id(layer)
        if key not in self._memo:
            self._memo[key] = (0, None)  # (a layer reached again while it is being read)
            self._memo[key] = self._read(layer)
        return self._memo[key]

    @staticmethod
    def _join(skips: list[bool | None], readable: bool) -> bool | None:
        if any(s is True for s in skips):
            return True
        if not readable or any(s is None for s in skips):
            return None
        return False

    def _read(self, layer: Any) -> tuple[int, bool | None]:
        if isinstance(layer, keras.Sequential):
            parts = [self.facts(sub) for sub in layer.layers]
            return sum(d for d, _ in parts), self._join([s for _, s in parts], True)
        if isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth"):
            return self._functional(layer)
        subs = list(layer._flatten_layers(include_self=False, recursive=False))
        parts = [self.facts(sub) for sub in subs]
        own = int(has_kernel(layer))
        builtin = type(layer).__module__.startswith("keras.")
        if builtin:
            # Keras' own layers (MultiHeadAttention, Bidirectional, TimeDistributed, RNN) have
            # no skip in their own call; what they wrap may.
            depth = 1 if own or any(d for d, _ in parts) else 0
            return depth, self._join([s for _, s in parts], True)
        # A user-defined layer: its call is not read. One without sub-layers is a plain
        # parameterised layer; a subclassed model, or a layer that calls sub-layers, may add a
        # skip we cannot see.
        readable = not subs and not isinstance(layer, keras.Model)
        return own + sum(d for d, _ in parts), self._join([s for _, s in parts], readable)

    def _functional(self, model: Any) -> tuple[int, bool | None]:
        # Per tensor: (parameterised layers on the longest path to it, model inputs it comes
        # from). Nodes by decreasing depth: every node after the nodes it reads from.
        seen: dict[int, tuple[int, frozenset]] = {}
        skips: list[bool | None] = []
        by_depth = model._nodes_by_depth
        for level in sorted(by_depth, reverse=True):
            for node in by_depth[level]:
                inputs = list(node.arguments.keras_tensors)
                got = [seen.get(id(t), (0, frozenset((id(t),)))) for t in inputs]
                op = node.operation
                name = type(op).__name__
                depth = 0
                if isinstance(op, keras.layers.Layer):
                    depth, skip = self.facts(op)
                    skips.append(skip)
                else:
                    kind = activation_kind(name, known_only=True)
                    if kind is not None:
                        self.op_activations.append(kind)
                if len(got) > 1 and name not in GATES and any(
                        a[0] != b[0] and a[1] & b[1]
                        for k, a in enumerate(got) for b in got[k + 1:]):
                    skips.append(True)
                here = max((d for d, _ in got), default=0) + depth
                sources = frozenset().union(*(src for _, src in got)) if got else \
                    frozenset(id(t) for t in node.outputs)
                for t in node.outputs:
                    seen[id(t)] = (here, sources)
        depth = max((seen.get(id(t), (0,))[0] for t in model._outputs), default=0)
        return depth, self._join(skips, True)
