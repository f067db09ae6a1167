"""Activation kinds by name (Keras functions, layers and graph ops), and which layers count."""

from __future__ import annotations

from typing import Any

import keras

#: Normalisation layers by class name, and the kind each is reported as.
NORM_LAYERS = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm",
               "GroupNormalization": "groupnorm", "UnitNormalization": "unitnorm",
               "RMSNormalization": "rmsnorm"}
#: Recurrent layers and their cells by class name: their activations act inside the loop over
#: time steps (not sampled), and a variable's layer is its cell (``gru/gru_cell``). Without the
#: cells, the torch backend (which runs the cell's own ``call`` at every time step) sampled a GRU
#: cell's tanh as a site, and a GRU's LayerInfo was not marked recurrent.
RECURRENT = ("SimpleRNN", "LSTM", "GRU", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
             "Bidirectional", "SimpleRNNCell", "LSTMCell", "GRUCell", "StackedRNNCells",
             "ConvLSTMCell")

#: Activation kinds by their name without underscores, lower case: the torch adapter's names
#: (``nn.LeakyReLU`` -> "leaky_relu", ``nn.SiLU`` -> "silu", ``nn.Hardsigmoid`` ->
#: "hardsigmoid", ...) for Keras' functions (``"swish"``, ``"hard_sigmoid"``), layers and ops.
ACTIVATION_KINDS = {
    "relu": "relu", "relu6": "relu6", "leakyrelu": "leaky_relu", "prelu": "prelu", "elu": "elu",
    "selu": "selu", "celu": "celu", "gelu": "gelu", "silu": "silu", "swish": "silu",
    "mish": "mish", "sigmoid": "sigmoid", "hardsigmoid": "hardsigmoid",
    "logsigmoid": "logsigmoid", "tanh": "tanh", "hardtanh": "hardtanh",
    "tanhshrink": "tanhshrink", "softplus": "softplus", "softsign": "softsign",
    "hardsilu": "hardswish", "hardswish": "hardswish", "softmax": "softmax",
    "logsoftmax": "logsoftmax", "glu": "glu", "exponential": "exponential",
    "hardshrink": "hardshrink", "softshrink": "softshrink", "sparsemax": "sparsemax",
    "sparseplus": "sparseplus", "squareplus": "squareplus", "sparsesigmoid": "sparsesigmoid",
    "threshold": "threshold",
}
#: Not activations (a layer's default ``activation``).
IDENTITY = {"linear", "identity"}


def activation_kind(name: str | None, *, known_only: bool = False) -> str | None:
    """The kind of an activation called ``name`` ("swish" -> "silu", "LeakyReLU" ->
    "leaky_relu"); an unknown function's own name, lower case, unless ``known_only``."""
    if not isinstance(name, str) or not name or name.lower() in IDENTITY:
        return None
    kind = ACTIVATION_KINDS.get(name.lower().replace("_", ""))
    return kind if kind is not None or known_only else name.lower()


def layer_activation_kind(layer: Any) -> str | None:
    """The kind of an activation layer (``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU``,
    ``Softmax``; ``Activation`` and ``Lambda`` of an activation function), else None."""
    name = type(layer).__name__
    if name == "ReLU":
        if getattr(layer, "negative_slope", 0):
            return "leaky_relu"
        max_value = getattr(layer, "max_value", None)
        return "relu6" if max_value is not None and float(max_value) == 6.0 else "relu"
    if name in ("LeakyReLU", "PReLU", "ELU", "Softmax"):
        return activation_kind(name)
    if name == "Lambda":
        return function_kind(getattr(layer, "function", None), known_only=True)
    return None


def function_kind(fn: Any, *, known_only: bool = False) -> str | None:
    """The kind of a layer's ``activation`` (a function, ``functools.partial`` of one, or an
    activation layer); None for ``linear``/None and for what cannot be named (a lambda)."""
    if fn is None:
        return None
    if isinstance(fn, keras.layers.Layer):
        return layer_activation_kind(fn)
    fn = getattr(fn, "func", fn)  # functools.partial(keras.activations.relu, max_value=6)
    name = getattr(fn, "__name__", None)
    if name == "<lambda>":
        return None
    return activation_kind(name, known_only=known_only)


def has_kernel(layer: Any) -> bool:
    """A parameterised layer in the sense of depth: it owns a trainable matrix or kernel."""
    return any(len(w.shape) >= 2 for w in getattr(layer, "_trainable_variables", []))
