"""What gradwatch knows of a parameter pytree: its leaves in order, the layer each belongs to
(named from the pytree path), and the LayerInfo / ModelInfo the core's detectors read."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from gradwatch import kit

#: A pytree's first key that names a flax variable collection, not a layer.
_COLLECTIONS = ("params",)
#: A path's last keys that are a variable's box (flax nnx ``Variable.value``), not a name.
_BOXES = ("value", "raw_value")


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_names(path: Sequence[Any]) -> tuple[str, ...]:
    """A leaf's pytree path as strings, without flax's collection key and nnx's value box."""
    names = [_key(k) for k in path]
    while len(names) > 1 and names[-1] in _BOXES:
        names.pop()
    if len(names) > 1 and names[0] in _COLLECTIONS:
        names.pop(0)
    return tuple(names)


def layer_of(names: tuple[str, ...]) -> str:
    """The layer a leaf belongs to: its path less the parameter's own name (``Dense_0/kernel``
    -> ``Dense_0``, ``{'layer0': {'w': ...}}`` -> ``layer0``); a top-level leaf is its own
    layer."""
    return "/".join(names[:-1] if len(names) > 1 else names)


def _natural(name: str) -> tuple:
    """Sort key reading digit runs as numbers: ``Dense_2`` before ``Dense_10`` (a pytree
    flattens dict keys in string order, which puts ``Dense_10`` second)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclasses.dataclass(frozen=True)
class Leaves:
    """The watched leaves of a parameter pytree, in flatten order, and their layers."""

    #: The pytree's structure (gradients and updates must have the same).
    treedef: Any
    #: Each leaf's path names ``[T]``.
    names: tuple[tuple[str, ...], ...]
    #: Each leaf's shape ``[T]``.
    shapes: tuple[tuple[int, ...], ...]
    #: Layer names in depth order.
    layers: tuple[str, ...]
    #: Each leaf's layer index ``[T]``.
    tensor_layer: tuple[int, ...]

    @property
    def numel(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]


def _insertion_order(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Leaf paths of nested dicts (and lists/tuples) in the order the user's code made them:
    jax flattens a dict's keys sorted, but flax creates its parameters in call order
    (``Dense_0``, ``BatchNorm_0``, ``Dense_1``), and a hand-built dict keeps insertion order."""
    if isinstance(tree, Mapping):
        out = []
        for k, v in tree.items():
            out += _insertion_order(v, (*prefix, str(k)))
        return out
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        out = []
        for i, v in enumerate(tree):
            out += _insertion_order(v, (*prefix, str(i)))
        return out
    return [prefix]


def _depth_order(owner: list[str], tree: Any) -> tuple[str, ...]:
    """Layers in depth order: the order their parameters appear in the user's tree where it is
    made of dicts (flax, hand-built), else by name with numbers read as numbers (``Dense_2``
    before ``Dense_10``)."""
    names = set(owner)
    try:
        seen = [layer_of(leaf_names(path)) for path in _insertion_order(tree)]
    except Exception:  # an exotic container: fall back to the names
        seen = []
    ordered = [n for n in dict.fromkeys(seen) if n in names]
    if set(ordered) == names:
        return tuple(ordered)
    return tuple(sorted(dict.fromkeys(owner), key=_natural))


def leaves_of(tree: Any) -> Leaves:
    """The leaves of ``tree`` (params, or gradients shaped like them) and their layers."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = tuple(leaf_names(path) for path, _ in flat)
    shapes = tuple(tuple(np.shape(leaf)) for _, leaf in flat)
    owner = [layer_of(n) for n in names]
    layers = _depth_order(owner, tree)
    index = {name: i for i, name in enumerate(layers)}
    return Leaves(treedef, names, shapes, layers, tuple(index[o] for o in owner))


def _layer_type(shapes: list[tuple[int, ...]]) -> str:
    ndim = max((len(s) for s in shapes), default=0)
    return "Conv" if ndim >= 3 else "Dense" if ndim == 2 else "Param"


def _init_gain(leaves: list[Any]) -> float | None:
    """Weight std times sqrt(fan_in) of the layer's matrix (flax convention: the kernel's last
    axis is the output, so fan_in is the product of the others); None when not concrete."""
    mats = [x for x in leaves if np.ndim(x) >= 2]
    if not mats:
        return None
    try:
        w = np.asarray(mats[0], dtype=np.float64)
    except Exception:  # a tracer: init ran under jit
        return None
    if w.size < 2:
        return None
    fan_in = math.prod(w.shape[:-1])
    return float(w.std() * math.sqrt(fan_in))


def layer_infos(leaves: Leaves, params: Any) -> tuple[kit.LayerInfo, ...]:
    values = jax.tree_util.tree_leaves(params)
    out = []
    for i, name in enumerate(leaves.layers):
        mine = [t for t, layer in enumerate(leaves.tensor_layer) if layer == i]
        shapes = [leaves.shapes[t] for t in mine]
        out.append(kit.LayerInfo(
            name=name, type=_layer_type(shapes),
            num_params=int(sum(math.prod(s) for s in shapes)),
            init_gain=_init_gain([values[t] for t in mine]) if len(values) == len(
                leaves.shapes) else None,
            matrix=any(len(s) >= 2 for s in shapes)))
    return tuple(out)


def model_info(infos: Sequence[kit.LayerInfo], learning_rates: tuple[float, ...] = (),
               activations: frozenset[str] = frozenset()) -> kit.ModelInfo:
    """What an optax transformation lets gradwatch see of the model: its parameter layers, and
    the kinds of the activation sites the user named (normalisation and skip connections live
    in the model's code, not in the pytree, so they are not known)."""
    return kit.ModelInfo(framework="jax", depth=sum(1 for i in infos if i.matrix),
                         learning_rates=learning_rates, activations=activations)


def learning_rate_leaves(state: Any) -> list[int]:
    """Indices, among ``state``'s leaves, of the learning rates ``optax.inject_hyperparams``
    keeps (``hyperparams['learning_rate']``): read at each check with the rest."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    found = []
    for i, (path, _) in enumerate(flat):
        names = [_key(k) for k in path]
        if len(names) >= 2 and names[-1] == "learning_rate" and names[-2] == "hyperparams":
            found.append(i)
    return found
