"""The model being fit as gradwatch sees it: trainable variables by layer, LayerInfo, ModelInfo."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import kit

from ._kinds import NORM_LAYERS, RECURRENT, function_kind, has_kernel, layer_activation_kind
from ._structure import Structure

logger = logging.getLogger("gradwatch")

_CLIPPING = ("clipnorm", "global_clipnorm", "clipvalue")


def relative_path(layer: Any, model: Any) -> str:
    """A layer's path relative to the model being fit (``"dense"``, ``"block/dense"``)."""
    path = getattr(layer, "path", None) or layer.name
    return path[len(model.name) + 1:] if path.startswith(f"{model.name}/") else path


def clips(optimizer: Any) -> bool:
    """Whether the optimizer clips gradients (by norm, global norm or value)."""
    return any(getattr(optimizer, a, None) for a in _CLIPPING)


class WatchedVariables:
    """The model's trainable variables, in ``model.trainable_weights`` order, and their layers.

    A variable's layer is its path less the variable's own name (``"sequential/dense/kernel"``
    -> ``"dense"``), so layers are numbered in the order their first variable comes.
    """

    def __init__(self, model: Any) -> None:
        prefix = f"{model.name}/"

        def layer_path(w: Any) -> str:
            path = w.path.rsplit("/", 1)[0] if "/" in w.path else w.path
            return path[len(prefix):] if path.startswith(prefix) else path

        types: dict[str, str] = {}
        for layer in model._flatten_layers(include_self=False, recursive=True):
            for w in getattr(layer, "_trainable_variables", []):
                types.setdefault(layer_path(w), type(layer).__name__)
        #: The watched variables ``[V]``.
        self.variables: list[Any] = list(model.trainable_weights)
        index: dict[str, int] = {}
        for w in self.variables:
            index.setdefault(layer_path(w), len(index))
        #: Layer names in depth order, and their classes' names.
        self.layers: tuple[str, ...] = tuple(index)
        self.types: tuple[str, ...] = tuple(types.get(n, "Layer") for n in index)
        #: Layer index of each variable ``[V]``.
        self.tensor_layer = np.array([index[layer_path(w)] for w in self.variables], dtype=np.intp)
        #: Entries per variable ``[V]``.
        self.numel = np.array([int(np.prod(w.shape)) for w in self.variables], dtype=float)
        #: Position of each variable by ``id`` (on TensorFlow also of its ``value``, which the
        #: distributed update passes on).
        self.position: dict[int, int] = {}
        tensorflow = keras.backend.backend() == "tensorflow"
        for i, w in enumerate(self.variables):
            self.position[id(w)] = i
            if tensorflow:
                self.position[id(w.value)] = i
        #: Whether any variable is float64.
        self.float64 = any(str(w.dtype) == "float64" for w in self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def layout(self, sample_scale: np.ndarray | None = None) -> kit.TensorLayout:
        return kit.TensorLayout(self.layers, self.tensor_layer, self.numel, sample_scale)

    def layer_infos(self) -> list[kit.LayerInfo]:
        """One :class:`kit.LayerInfo` per layer (its init gain read in one transfer)."""
        kernels: dict[int, Any] = {}
        for w, i in zip(self.variables, self.tensor_layer.tolist()):
            if len(w.shape) >= 2 and i not in kernels:
                kernels[i] = w
        gains: dict[int, float] = {}
        if kernels:
            vals = ops.convert_to_numpy(ops.stack([
                ops.std(ops.cast(k, "float32")) * math.sqrt(int(np.prod(k.shape[:-1])))
                for k in kernels.values()]))  # one transfer, at train begin only
            gains = {i: float(g) for i, g in zip(kernels, vals)}
        sizes = np.bincount(self.tensor_layer, weights=self.numel, minlength=len(self.layers))
        return [kit.LayerInfo(name=n, type=t, num_params=int(sizes[i]), init_gain=gains.get(i),
                              recurrent=t in RECURRENT, matrix=i in kernels)
                for i, (n, t) in enumerate(zip(self.layers, self.types))]


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the model's layers and graph say, read once per fit."""

    #: The summary advice is chosen from.
    info: kit.ModelInfo
    #: Activation sites in model order as (layer path, kind); ``""`` for a graph operation.
    sites: tuple[tuple[str, str], ...]
    #: How many activation sites of each kind (Dense/Conv ``activation``, activation layers,
    #: activation operations of a functional graph).
    counts: dict[str, int]


def model_facts(model: Any, optimizer: Any) -> ModelFacts:
    """Activations, normalisation, depth, skip connections, recurrence, LR and clipping of
    ``model`` fit with ``optimizer`` (the inner one under a LossScaleOptimizer)."""
    norms = set()
    recurrent = False
    depth = 0
    sites: list[tuple[str, str]] = []
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    ids = {id(layer) for layer in layers}
    # Counted once: an RNN layer's ``activation`` is its cell's, a Dense's activation layer
    # (``activation=keras.layers.ReLU()``) is a layer of the model itself.
    cells = {id(layer) for layer in layers if getattr(layer, "cell", None) is not None}
    for layer in layers:
        name = type(layer).__name__
        kind = layer_activation_kind(layer)
        fn = getattr(layer, "activation", None)
        if kind is None and id(layer) not in cells and id(fn) not in ids:
            kind = function_kind(fn)
        if kind:
            sites.append((relative_path(layer, model), kind))
        if name in NORM_LAYERS:
            norms.add(NORM_LAYERS[name])
        if name in RECURRENT:
            recurrent = True
        if has_kernel(layer):
            depth += 1
    structure = Structure()
    try:
        residual = structure.facts(model)[1]
    except Exception as exc:  # a graph this reading does not know: unknown
        logger.debug("gradwatch could not read the model's graph: %r", exc)
        residual = None
    sites += [("", kind) for kind in structure.op_activations]
    counts = dict(collections.Counter(kind for _, kind in sites))
    lr = None
    try:
        lr = float(ops.convert_to_numpy(optimizer.learning_rate))
    except Exception:
        pass
    info = kit.ModelInfo(framework=f"keras/{keras.backend.backend()}",
                         activations=frozenset(counts), activation_counts=dict(counts),
                         normalization=frozenset(norms), depth=depth, residual=residual,
                         recurrent=recurrent, learning_rates=(lr,) if lr is not None else (),
                         optimizer=type(optimizer).__name__, clipping=clips(optimizer) or None)
    return ModelFacts(info=info, sites=tuple(sites), counts=counts)
