"""Keras 3 callback that sees the gradients the optimizer applies, inside compiled ``fit``.

Keras callbacks only see ``logs``. gradwatch wraps two methods of the model's optimizer for the
duration of ``fit`` (and restores them at the end):

* ``scale_loss(loss)`` — every backend's train step passes the batch loss through it: the loss
  is recorded there (not the running mean ``logs`` shows);
* ``apply(grads, variables)`` — gradients arrive after the backward pass and before the
  optimizer's own clipping; per-variable statistics are computed there with the backend's ops.

The device computes per-variable numbers only (squared gradient norms every step; max |g|,
g . W with the weights before the update, weight norms and update sizes on check steps); the
host sums them into per-layer numbers with numpy, once per check, after the one device-to-host
transfer.

In graph mode (TensorFlow ``tf.function``, with or without XLA) a step writes one row of a ring
buffer (one scatter op); check-step work sits under a ``tf.cond`` on the optimizer's iteration
counter; the host reads the state variables once per check, in ``on_train_batch_end``. Under a
``tf.distribute`` strategy the state variables are per replica (``ON_READ``, summed when read),
the gradient statistics are those of the all-reduced gradient and are written by the first
replica only. In eager mode (the PyTorch backend, ``run_eagerly=True``) the same numbers are
kept as device tensors and gated by a host counter.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import _validate as v
from gradwatch._context import RunContext, empty_context
from gradwatch._detectors import SATURATION_DERIVATIVE
from gradwatch._findings import Finding, GradientHealthError
from gradwatch._monitor import CORE_OPTIONS, Monitor
from gradwatch._report import Report
from gradwatch._stats import ActivationStats, LayerInfo, ModelInfo, StepStats, sample_stride

try:  # the core's helper for StepStats.grad_norm_orthogonal (where the core has that field)
    from gradwatch._stats import orthogonal_norms
except ImportError:  # pragma: no cover - an older core
    orthogonal_norms = None

#: The StepStats fields this core has: optional ones are passed only where they exist.

logger = logging.getLogger("gradwatch")

KERAS_OPTIONS = ("update_ratio", "sample_fraction")
_SAMPLED = {"relu": "relu", "relu6": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_NORM_LAYERS = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm",
                "GroupNormalization": "groupnorm", "UnitNormalization": "unitnorm",
                "RMSNormalization": "rmsnorm"}
_RECURRENT = ("SimpleRNN", "LSTM", "GRU", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
              "Bidirectional")


#: Activation kinds by their name without underscores, lower case: the torch adapter's names
#: (``nn.LeakyReLU`` -> "leaky_relu", ``nn.SiLU`` -> "silu", ``nn.Hardsigmoid`` ->
#: "hardsigmoid", ...) for Keras' functions (``"swish"``, ``"hard_sigmoid"``), layers and ops.
_ACTIVATION_KINDS = {
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
_IDENTITY = {"linear", "identity"}


def _activation_kind(name: str | None, *, known_only: bool = False) -> str | None:
    """The kind of an activation called ``name`` ("swish" -> "silu", "LeakyReLU" ->
    "leaky_relu"); an unknown function's own name, lower case, unless ``known_only``."""
    if not isinstance(name, str) or not name or name.lower() in _IDENTITY:
        return None
    kind = _ACTIVATION_KINDS.get(name.lower().replace("_", ""))
    return kind if kind is not None or known_only else name.lower()


def _layer_activation_kind(layer: Any) -> str | None:
    """The kind of an activation layer (``ReLU``, ``LeakyReLU``, ``PReLU``, ``ELU``,
    ``Softmax``; ``Activation`` and ``Lambda`` of an activation function), else None."""
    name = type(layer).__name__
    if name == "ReLU":
        if getattr(layer, "negative_slope", 0):
            return "leaky_relu"
        max_value = getattr(layer, "max_value", None)
        return "relu6" if max_value is not None and float(max_value) == 6.0 else "relu"
    if name in ("LeakyReLU", "PReLU", "ELU", "Softmax"):
        return _activation_kind(name)
    if name == "Lambda":
        return _function_kind(getattr(layer, "function", None), known_only=True)
    return None


def _function_kind(fn: Any, *, known_only: bool = False) -> str | None:
    """The kind of a layer's ``activation`` (a function, ``functools.partial`` of one, or an
    activation layer); None for ``linear``/None and for what cannot be named (a lambda)."""
    if fn is None:
        return None
    if isinstance(fn, keras.layers.Layer):
        return _layer_activation_kind(fn)
    fn = getattr(fn, "func", fn)  # functools.partial(keras.activations.relu, max_value=6)
    name = getattr(fn, "__name__", None)
    if name == "<lambda>":
        return None
    return _activation_kind(name, known_only=known_only)


def _has_kernel(layer: Any) -> bool:
    """A parameterised layer in the sense of depth: it owns a trainable matrix or kernel."""
    return any(len(w.shape) >= 2 for w in getattr(layer, "_trainable_variables", []))


#: Merges that gate rather than combine (squeeze-excitation, GLU): a multiplicative path past a
#: parameterised layer is not taken for a skip connection.
_GATES = {"Multiply", "Dot"}


class _Structure:
    """What a model's graph says about skip connections and functional activations.

    ``facts(layer)`` is ``(depth, skip)``: depth, the number of parameterised layers (see
    :func:`_has_kernel`) on the longest path through the layer; skip, True when its graph has a
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
        own = int(_has_kernel(layer))
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
                    kind = _activation_kind(name, known_only=True)
                    if kind is not None:
                        self.op_activations.append(kind)
                if len(got) > 1 and name not in _GATES and any(
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


def _is_tracing() -> bool:
    """True while a backend traces a graph (tf.function, XLA), False when ops run eagerly."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return keras.backend.backend() == "jax"


def _replica() -> tuple[int, int]:
    """(replica id, replicas in sync) of the running step: (0, 1) outside tf.distribute."""
    if keras.backend.backend() != "tensorflow":
        return 0, 1
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return 0, 1
    rid = tf.get_static_value(ctx.replica_id_in_sync_group)
    return (int(rid) if rid is not None else 0), int(ctx.num_replicas_in_sync)


def _all_reduce(op: str, values: Any) -> Any:
    """Sum or mean over the replicas of the running tf.distribute step (all must call it)."""
    import tensorflow as tf

    return tf.distribute.get_replica_context().all_reduce(getattr(tf.distribute.ReduceOp, op),
                                                          values)


def _reachable(t: Any) -> bool:
    """A tensor recorded earlier in this trace (the loss, an activation) can be used here: it
    belongs to the graph being built or to one it is nested in (a cond branch, a loop body)."""
    import tensorflow as tf

    graph = getattr(t, "graph", None)
    g = tf.compat.v1.get_default_graph()
    while g is not None:
        if graph is g:
            return True
        g = getattr(g, "outer_graph", None)
    return False


def _dense(g: Any) -> tuple[Any, Any]:
    """The gradient's entries and, for a sparse gradient, the variable rows they belong to
    (None for a dense one)."""
    # TensorFlow hands embeddings IndexedSlices; their values carry the gradient's entries.
    if type(g).__name__ == "IndexedSlices":
        import tensorflow as tf

        # Rows of repeated indices add up in the dense gradient: sum them before any norm.
        unique, position = tf.unique(g.indices)
        return tf.math.unsorted_segment_sum(g.values, position, tf.shape(unique)[0]), unique
    return g, None


def _f32(t: Any) -> Any:
    import tensorflow as tf

    t = tf.convert_to_tensor(t)
    return t if t.dtype == tf.float32 else tf.cast(t, tf.float32)


class _GraphState:
    """The one TensorFlow variable graph mode writes, read whole once per check.

    A float32 matrix ``K = V + 2`` wide (V watched variables). Rows ``0..window-1`` are a ring
    buffer, one row per step: half squared gradient norm per variable (``tf.nn.l2_loss``, one op
    each), the batch loss, the step id. Below them, blocks written on check steps: ``grads``
    (max |g| per variable, then g . W and the half squared norm of W per variable, W the
    weights before the update),
    ``weights`` (half squared norms per variable of the weights, the sampled update and the
    sampled change since the start, then the step id) and, on activation steps, ``acts`` (one
    value per activation site, then the step id). One variable, so that a check's read is one op
    and one device-to-host copy.

    Under a tf.distribute strategy it is ``ON_READ`` with ``SUM`` aggregation: every replica
    writes its own copy and reading sums them. The first replica writes the gradient and weight
    numbers (of the all-reduced gradient, the same on every replica) and the step ids, the
    others zeros; every replica writes its loss (Keras has divided it by the number of replicas,
    so the sum is the global batch's loss) and its activations (the host divides those by the
    number of replicas).
    """

    def __init__(self, strategy: Any, replicas: int, window: int, n_vars: int,
                 n_sites: int) -> None:
        import tensorflow as tf

        self.window, self.width = window, n_vars + 2
        self.blocks: dict[str, tuple[int, int]] = {}  # name -> (first row, length)
        rows = window
        for name, size in (("grads", 3 * n_vars), ("weights", 4 * n_vars + 1),
                           ("acts", n_sites + 1)):
            self.blocks[name] = (rows, size)
            rows += -(-size // self.width)
        kwargs: dict[str, Any] = {}
        if replicas > 1:
            kwargs = {"synchronization": tf.VariableSynchronization.ON_READ,
                      "aggregation": tf.VariableAggregation.SUM}
        with strategy.scope():
            self.var = tf.Variable(tf.zeros((rows, self.width), tf.float32), trainable=False,
                                   name="gradwatch_state", **kwargs)
        self.local = (tuple(strategy.experimental_local_results(self.var)) if replicas > 1
                      else (self.var,))

    def write_row(self, rid: int, slot: Any, row: Any) -> None:
        import tensorflow as tf

        tf.raw_ops.ResourceScatterUpdate(resource=self.local[rid].handle, indices=slot,
                                         updates=row)

    def write(self, name: str, rid: int, values: Any) -> None:
        import tensorflow as tf

        first, size = self.blocks[name]
        rows = -(-size // self.width)
        pad = rows * self.width - size
        if pad:
            values = tf.concat([values, tf.zeros((pad,))], 0)
        tf.raw_ops.ResourceScatterUpdate(
            resource=self.local[rid].handle, indices=np.arange(first, first + rows),
            updates=tf.reshape(values, (rows, self.width)))

    def read(self) -> np.ndarray:
        """Everything, summed over replicas: one read, one device-to-host copy."""
        return np.asarray(self.var.value(), dtype=float)

    def block(self, host: np.ndarray, name: str) -> np.ndarray:
        first, size = self.blocks[name]
        return host[first:].reshape(-1)[:size]

    def nbytes(self) -> int:
        return 4 * int(np.prod(self.var.shape))


#: What the wrapped ``apply`` gets back when the statistics are taken in Keras' all-reduce.
_CAPTURED = object()


class _Capture:
    """Per-trace hand-over from the wrapped all-reduce back to the wrapped ``apply``."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.before: Any = None


class GradWatchCallback(keras.callbacks.Callback):
    """Watches ``model.fit`` for unhealthy gradients, updates, losses and activations.

    Args:
        update_ratio: ``"sampled"`` (default) estimates update/weight ratios from a fixed
            strided sample of every variable (about ``sample_fraction`` of its entries, at least
            32); ``"exact"`` uses every entry; ``"off"`` skips them.
        sample_fraction: Defaults to ``0.02``.
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``activation_every``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.

    Example:

    ```python
    cb = GradWatchCallback()
    model.fit(x, y, epochs=20, callbacks=[cb])
    print(cb.report())
    ```
    """

    #: Batch-end work is a lock-protected read of the state variables; every step's numbers
    #: carry their own step id, so Keras may dispatch it asynchronously.
    async_safe = True

    def __init__(self, *, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(CORE_OPTIONS))
        if unknown:
            raise TypeError(f"GradWatchCallback got unexpected option(s) {', '.join(unknown)}; "
                            f"valid options: {', '.join(KERAS_OPTIONS + CORE_OPTIONS)}")
        self.update_ratio = v.choice("update_ratio", update_ratio, ("sampled", "exact", "off"))
        self.sample_fraction = v.fraction("sample_fraction", sample_fraction)
        #: The framework-neutral engine (findings, report, sinks).
        self.monitor = Monitor(empty_context(), **options)
        self._lock = threading.Lock()
        #: Per-thread trace state (tf.distribute traces each replica's step in its own thread).
        self._tls = threading.local()
        self._installed: list[tuple[Any, str]] = []
        self._wrapped_layers: list[tuple[Any, str, Any]] = []
        self._active = False
        self._graph: _GraphState | None = None
        self._float64 = False
        #: Activation sites of the fitted model by kind (set in ``on_train_begin``).
        self._activation_counts: dict[str, int] = {}
        self._activation_sites: list[tuple[str, str]] = []

    # -- Keras hooks -------------------------------------------------------------------------

    def set_model(self, model: Any) -> None:
        super().set_model(model)
        # A train function traced before our wrappers existed would never call them.
        if getattr(model, "train_function", None) is not None and not self._active:
            model.train_function = None

    def on_train_begin(self, logs: Any = None) -> None:
        try:
            self._begin()
        except (GradientHealthError, Warning):
            raise
        except Exception as exc:
            self._uninstall()
            self.monitor.internal_error("keras adapter (on_train_begin)", exc)

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if not self._active:
            return
        step = self._epoch_base + int(batch) + 1
        self._last_host_step = step
        if not self._traced:
            return  # eager mode checks inside the training step itself (see _eager_after)
        every = self._check_every
        if step // every > self._checked_upto // every:
            self._checked_upto = step
            with self._lock:
                try:
                    self._guard(self._check)
                except BaseException:
                    # Strict mode (or a warning turned error) ends fit() here, and Keras will
                    # not call on_train_end: leave the model as it was before raising.
                    self._teardown()
                    raise

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self._active:
            self._epoch_base = self._last_host_step

    def on_train_end(self, logs: Any = None) -> None:
        if not self._active:
            return
        with self._lock:
            self._guard(self._check)  # the steps since the last check
        if self._last_host_step and not self.monitor.report().steps and self._vars:
            logger.warning(
                "gradwatch saw none of the %d training batches: the model's train_step did not "
                "call optimizer.apply (a custom train_step?), so no gradient was observed.",
                self._last_host_step)
        self._teardown()
        self.monitor.end()

    def _teardown(self) -> None:
        self._uninstall()
        if self.model is not None:
            self.model.train_function = None  # next fit traces without our wrappers

    # -- public API --------------------------------------------------------------------------

    @property
    def findings(self) -> list[Finding]:
        """Findings of the current (or last) ``fit``, in order of occurrence."""
        return self.monitor.findings

    def report(self) -> Report:
        """Per-layer table and findings; ``str()`` renders it."""
        return self.monitor.report()

    def extra_memory_bytes(self) -> int:
        """Bytes held between steps: start-of-run weight samples and the state variables."""
        held = sum(int(np.prod(t.shape)) * 4 for t in self._w0)
        return held + (self._graph.nbytes() if self._graph is not None else 0)

    # -- setup -------------------------------------------------------------------------------

    def _begin(self) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise TypeError("GradWatchCallback needs a compiled model (model.optimizer is None)")
        self._uninstall()
        self._backend = keras.backend.backend()
        self._inner = getattr(optimizer, "inner_optimizer", optimizer)
        self._optimizer = optimizer
        self._float64 = any(str(w.dtype) == "float64" for w in model.trainable_weights)
        self._build_layers(model)
        self.monitor.set_context(RunContext(model=self._model_info(model, optimizer),
                                            layers=tuple(self._layer_infos())))
        self.monitor.reset()
        self.monitor.start()
        self._check_every = self.monitor.check_every
        # Room for more than one check's steps: with asynchronous batch-end dispatch the read
        # may run a step or two behind training.
        self._window = 2 * self._check_every + 4
        self._sites: list[tuple[str, str, int]] = []  # name, kind, units
        self._prepare_samples()
        self._wrap_activations(model)
        self._strategy = getattr(model, "distribute_strategy", None)
        self._replicas = 1
        if self._backend == "tensorflow" and self._strategy is not None:
            self._replicas = int(self._strategy.num_replicas_in_sync)
        # Under tf.distribute the wrapped apply sees one replica's gradient; the statistics are
        # of the all-reduced one. Keras reduces after clipping, so gradwatch takes Keras' own
        # reduction only where nothing clips or accumulates between apply and the reduction
        # (free); otherwise it reduces the gradients once more itself (one more all-reduce).
        self._dist_mode = None
        if self._replicas > 1:
            clips = any(getattr(self._inner, a, None) for a in ("clipnorm", "global_clipnorm",
                                                                "clipvalue"))
            own = clips or getattr(self._inner, "gradient_accumulation_steps", None) or \
                getattr(model, "run_eagerly", False) or \
                not hasattr(self._inner, "_all_reduce_sum_gradients")
            self._dist_mode = "all_reduce" if own else "keras"
        # A static loss_scale_factor is divided out inside apply; gradients taken before that
        # are divided on the host. Keras' reduction sees them already divided.
        scale = getattr(self._inner, "loss_scale_factor", None)
        self._grad_scale = None if (scale is None or self._dist_mode == "keras") else float(scale)
        self._graph = None
        if self._backend == "tensorflow":
            self._graph = _GraphState(self._strategy, self._replicas, self._window,
                                      len(self._vars), len(self._sites))
        self._traced = False
        self._traced_present = np.zeros(len(self._vars), dtype=bool)
        self._traced_loss = False
        # What the step being traced recorded, by replica: the loss and the activation sites'
        # outputs (under a LossScaleOptimizer, tf.distribute calls apply from other threads
        # than the forward pass's).
        self._traced_losses: dict[int, Any] = {}
        self._traced_acts: dict[int, dict[int, Any]] = {}
        # Eager mode: device tensors per step, a host step counter.
        self._eager_rows: dict[int, tuple[int, tuple[int, ...], Any, Any]] = {}
        self._eager_extras: Any = None
        self._eager_acts: dict[int, Any] = {}
        self._eager_loss: Any = None
        self._eager_step = int(ops.convert_to_numpy(self._inner.iterations))
        self._start_iter = self._eager_step
        self._epoch_base = 0
        self._last_host_step = 0
        self._checked_upto = 0
        self._last_seen_step = self._start_iter
        self._last_act_step = self._start_iter
        self._act_due = self._eager_act_due(self._eager_step + 1)
        self._install(optimizer)
        self._active = True

    def _build_layers(self, model: Any) -> None:
        self._layer_names: list[str] = []
        self._layer_types: list[str] = []
        self._var_layer: dict[int, int] = {}
        index: dict[str, int] = {}
        prefix = f"{model.name}/"

        def layer_path(w: Any) -> str:
            # Variable paths are layer paths ("sequential/dense/kernel"); names are given
            # relative to the model being fit ("dense", "block/dense").
            path = w.path.rsplit("/", 1)[0] if "/" in w.path else w.path
            return path[len(prefix):] if path.startswith(prefix) else path

        types = {}
        for layer in model._flatten_layers(include_self=False, recursive=True):
            for w in getattr(layer, "_trainable_variables", []):
                types.setdefault(layer_path(w), type(layer).__name__)
        self._vars = list(model.trainable_weights)
        for w in self._vars:
            name = layer_path(w)
            if name not in index:
                index[name] = len(self._layer_names)
                self._layer_names.append(name)
                self._layer_types.append(types.get(name, "Layer"))
            self._var_layer[id(w)] = index[name]
        self._sizes = np.zeros(len(self._layer_names))
        for w in self._vars:
            self._sizes[self._var_layer[id(w)]] += int(np.prod(w.shape))

    def _layer_infos(self) -> list[LayerInfo]:
        kernels: dict[int, Any] = {}
        for w in self._vars:
            i = self._var_layer[id(w)]
            if len(w.shape) >= 2 and i not in kernels:
                kernels[i] = w
        gains: dict[int, float] = {}
        if kernels:
            vals = ops.convert_to_numpy(ops.stack([
                ops.std(ops.cast(k, "float32")) * math.sqrt(int(np.prod(k.shape[:-1])))
                for k in kernels.values()]))  # one transfer, at train begin only
            gains = {i: float(g) for i, g in zip(kernels, vals)}
        return [LayerInfo(name=n, type=t, num_params=int(self._sizes[i]), init_gain=gains.get(i),
                          recurrent=t in _RECURRENT, matrix=i in kernels)
                for i, (n, t) in enumerate(zip(self._layer_names, self._layer_types))]

    def _model_info(self, model: Any, optimizer: Any) -> ModelInfo:
        norms = set()
        recurrent = False
        depth = 0
        sites: list[tuple[str, str]] = []  # (layer path, activation kind), in model order
        layers = list(model._flatten_layers(include_self=False, recursive=True))
        ids = {id(layer) for layer in layers}
        # Counted once: an RNN layer's ``activation`` is its cell's, a Dense's activation layer
        # (``activation=keras.layers.ReLU()``) is a layer of the model itself.
        cells = {id(layer) for layer in layers if getattr(layer, "cell", None) is not None}
        for layer in layers:
            name = type(layer).__name__
            path = getattr(layer, "path", None) or layer.name
            if path.startswith(f"{model.name}/"):
                path = path[len(model.name) + 1:]
            kind = _layer_activation_kind(layer)
            fn = getattr(layer, "activation", None)
            if kind is None and id(layer) not in cells and id(fn) not in ids:
                kind = _function_kind(fn)
            if kind:
                sites.append((path, kind))
            if name in _NORM_LAYERS:
                norms.add(_NORM_LAYERS[name])
            if name in _RECURRENT:
                recurrent = True
            if _has_kernel(layer):
                depth += 1
        structure = _Structure()
        try:
            residual = structure.facts(model)[1]
        except Exception as exc:  # a graph this reading does not know: unknown
            logger.debug("gradwatch could not read the model's graph: %r", exc)
            residual = None
        sites += [("", kind) for kind in structure.op_activations]
        #: Activation sites in model order, as (layer path, kind); "" for a graph operation.
        self._activation_sites = sites
        #: How many activation sites of each kind the model has (Dense/Conv ``activation``,
        #: activation layers, activation operations of a functional graph).
        self._activation_counts = dict(collections.Counter(kind for _, kind in sites))
        acts = set(self._activation_counts)
        lr = None
        try:
            lr = float(ops.convert_to_numpy(self._inner.learning_rate))
        except Exception:
            pass
        clipping = any(getattr(self._inner, a, None) for a in ("clipnorm", "global_clipnorm",
                                                               "clipvalue"))
        return ModelInfo(framework=f"keras/{keras.backend.backend()}", activations=frozenset(acts),
                         activation_counts=dict(self._activation_counts),
                         normalization=frozenset(norms), depth=depth,
                         residual=residual, recurrent=recurrent,
                         learning_rates=(lr,) if lr is not None else (),
                         optimizer=type(self._inner).__name__, clipping=clipping or None)

    def _prepare_samples(self) -> None:
        V = len(self._vars)
        self._var_index: dict[int, int] = {}
        for i, w in enumerate(self._vars):
            self._var_index[id(w)] = i
            if self._backend == "tensorflow":
                self._var_index[id(w.value)] = i  # what the distributed update passes on
        seg = np.array([self._var_layer[id(w)] for w in self._vars], dtype=np.int64)
        # Variables sorted by layer, and where each layer starts: per-layer sums on the host are
        # one np.add.reduceat (every layer owns at least one variable).
        self._order = np.argsort(seg, kind="stable")
        self._starts = np.flatnonzero(np.r_[True, np.diff(seg[self._order]) != 0]) if V else seg
        self._strides: list[int] = []
        self._sample_scale = np.ones(V)
        self._w0: list[Any] = []
        self._w0_sq = np.full(V, np.nan)
        if self.update_ratio == "off" or not V:
            return
        for i, w in enumerate(self._vars):
            n = int(np.prod(w.shape))
            stride = sample_stride(n, self.sample_fraction, self.update_ratio == "exact")
            self._strides.append(stride)
            self._sample_scale[i] = n / max(len(range(0, n, stride)), 1)
        # Copies: on the PyTorch backend the strided sample is a view of the live variable.
        self._w0 = [self._copy(self._sample(w, i)) for i, w in enumerate(self._vars)]
        self._w0_sq = ops.convert_to_numpy(self._norms(self._w0)).astype(float) ** 2

    def _sample(self, w: Any, i: int) -> Any:
        """The fixed strided sample of variable ``i`` (on the PyTorch backend a view)."""
        stride = self._strides[i]
        if self._backend == "torch":
            flat = self._tensor(w).detach().reshape(-1).float()
        else:
            flat = ops.reshape(ops.cast(w, "float32"), (-1,))
        return flat if stride == 1 else flat[::stride]

    def _tensor(self, x: Any) -> Any:
        """The backend tensor behind ``x``; on PyTorch without Keras' per-call dispatch."""
        if self._backend == "torch":
            return x.value if isinstance(x, keras.Variable) else x
        return ops.convert_to_tensor(x)

    # -- wrappers ----------------------------------------------------------------------------

    def _install(self, optimizer: Any) -> None:
        inner = self._inner
        original_apply = inner.apply
        original_scale = optimizer.scale_loss

        def scale_loss(loss):
            self._guard(self._record_loss, loss)
            return original_scale(loss)

        def apply(grads, trainable_variables=None):
            tv = (list(trainable_variables) if trainable_variables is not None
                  else list(inner._trainable_variables))
            grads = list(grads)
            before = self._guard(self._before_apply, grads, tv)
            result = original_apply(grads, trainable_variables)
            if before is not None:
                self._guard(self._after_apply, before)
            return result

        optimizer.scale_loss = scale_loss
        self._installed.append((optimizer, "scale_loss"))
        inner.apply = apply
        self._installed.append((inner, "apply"))
        if self._dist_mode == "keras":
            original_reduce = inner._all_reduce_sum_gradients

            def all_reduce_sum_gradients(grads_and_vars):
                reduced = original_reduce(grads_and_vars)
                self._guard(self._reduced, reduced)
                return reduced

            inner._all_reduce_sum_gradients = all_reduce_sum_gradients
            self._installed.append((inner, "_all_reduce_sum_gradients"))

    def _uninstall(self) -> None:
        for obj, attr in self._installed:
            vars(obj).pop(attr, None)  # the class's own method shows through again
        self._installed = []
        for layer, attr, original in self._wrapped_layers:
            if attr == "call":
                vars(layer).pop("call", None)
            else:
                setattr(layer, attr, original)
        self._wrapped_layers = []
        self._active = False

    def _guard(self, fn, *args) -> Any:
        try:
            return fn(*args)
        except (GradientHealthError, Warning):
            raise
        except Exception as exc:
            self.monitor.internal_error(f"keras adapter ({fn.__name__})", exc)
            return None

    # -- per-step statistics -----------------------------------------------------------------

    def _record_loss(self, loss: Any) -> None:
        if self._backend == "torch" and not len(loss.shape):
            self._eager_loss = loss.detach()  # keeps no autograd graph alive between checks
            return
        if _is_tracing():
            self._traced_losses[_replica()[0]] = loss
            return
        rid, replicas = _replica()
        t = ops.convert_to_tensor(loss)
        if self._backend == "torch":
            t = t.detach()
        if len(t.shape):
            t = ops.mean(t)
        if replicas > 1:  # eager tf.distribute: Keras divided each replica's loss by their number
            import tensorflow as tf

            t = _all_reduce("SUM", tf.stop_gradient(t))
        if not rid:
            self._eager_loss = t

    def _by_index(self, grads: list[Any], tv: list[Any]) -> dict[int, Any]:
        """Raw gradients of the watched variables (IndexedSlices kept), by variable index."""
        index = self._var_index
        return {index[id(w)]: g for g, w in zip(grads, tv) if g is not None and id(w) in index}

    @staticmethod
    def _densified(raw: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """(gradient entries by variable index, variable rows of the sparse ones)."""
        grads, rows = {}, {}
        for i, g in raw.items():
            grads[i], r = _dense(g)
            if r is not None:
                rows[i] = r
        return grads, rows

    def _reduce_raw(self, raw: dict[int, Any]) -> dict[int, Any]:
        """Sum over the replicas of the raw gradients (every replica must call it). Sparse
        gradients are reduced as IndexedSlices, before their repeated rows are summed: the
        replicas' shards touch different rows."""
        keys = sorted(raw)
        return dict(zip(keys, _all_reduce("SUM", [raw[k] for k in keys]))) if keys else {}

    def _before_apply(self, grads: list[Any], tv: list[Any]) -> Any:
        if not _is_tracing():
            rid, replicas = _replica()
            raw = self._by_index(grads, tv)
            if replicas > 1 and raw:  # eager tf.distribute: every replica joins in
                raw = self._reduce_raw(raw)
            return None if rid else self._eager_before(*self._densified(raw))
        self._traced = True
        rid, replicas = _replica()
        if replicas > 1 and self._dist_mode == "keras":
            if rid:
                return self._graph_before(None, rid=rid)
            # The statistics are taken in the wrapped all-reduce, inside the original apply.
            self._tls.capture = _Capture(_current_graph())
            return _CAPTURED
        if replicas > 1:
            reduced = self._reduce_raw(self._by_index(grads, tv))
            if rid:
                return self._graph_before(None, rid=rid)
            return self._graph_before(*self._densified(reduced))
        return self._graph_before(*self._densified(self._by_index(grads, tv)))

    def _reduced(self, reduced: list[tuple[Any, Any]]) -> None:
        """The all-reduced gradients, inside the first replica's original apply."""
        capture = getattr(self._tls, "capture", None)
        if capture is None or capture.graph is not _current_graph() or capture.before is not None:
            return
        g, w = zip(*reduced) if reduced else ((), ())
        capture.before = self._graph_before(*self._densified(self._by_index(list(g), list(w))))

    def _after_apply(self, before: Any) -> None:
        if before is _CAPTURED:
            capture, self._tls.capture = self._tls.capture, None
            before = capture.before if capture is not None else None
            if before is None:
                return
        if _is_tracing():
            return self._graph_after(before)
        return self._eager_after(before)

    # Graph mode (tf.function, XLA): gated by the optimizer's iteration counter.

    def _graph_before(self, grads: dict[int, Any] | None, rows: dict[int, Any] | None = None,
                      rid: int = 0) -> Any:
        import tensorflow as tf

        with tf.name_scope("gradwatch"):  # named in TensorBoard graphs and profiles
            return self._graph_before_ops(grads, rid, rows or {})

    def _graph_before_ops(self, grads: dict[int, Any] | None, rid: int,
                          rows: dict[int, Any]) -> Any:
        """Writes this step's row; on check steps also max |g|, g . W (the weights not yet
        updated) and the activations, and takes the weight samples the update ratio compares
        against after the update. ``grads`` is None on replicas other than the first: they
        write only their loss and activations. ``rows``: the variable rows of sparse
        gradients."""
        import tensorflow as tf

        if grads is not None and not grads:
            return None
        state = self._graph
        V = len(self._vars)
        it = ops.convert_to_tensor(self._inner.iterations)
        step = it + 1
        zero = tf.constant(0.0)
        nan = tf.constant(np.nan, tf.float32)
        if grads is not None:
            present = np.zeros(V, dtype=bool)
            present[list(grads)] = True
            self._traced_present = present
            row = [tf.nn.l2_loss(_f32(grads[i])) if i in grads else nan for i in range(V)]
        else:
            row = [zero] * V
        loss = self._traced_losses.pop(rid, None)
        if loss is not None and _reachable(loss):
            self._traced_loss = True
            row.append(_f32(loss) if not len(loss.shape) else tf.reduce_mean(_f32(loss)))
        else:
            row.append(nan)
        row.append(tf.cast(step, tf.float32) if grads is not None else zero)
        state.write_row(rid, tf.math.floormod(it, self._window), tf.stack(row))

        every, act_every = self._check_every, self.monitor.activation_every
        acts = self._take_activations(rid)
        snapshot = grads is not None and bool(self._w0)
        sizes = [int(t.shape[0]) for t in self._w0] if snapshot else []

        def check_work():
            if grads is not None:
                gmax = [tf.reduce_max(tf.abs(_f32(grads[i]))) if i in grads else nan
                        for i in range(V)]
                dots = [self._dot(grads[i], i, rows.get(i)) if i in grads else nan
                        for i in range(V)]
                wsq = [tf.nn.l2_loss(_f32(w)) for w in self._vars]  # (not yet updated)
                state.write("grads", rid, tf.stack(gmax + dots + wsq))
            if acts:
                self._gated(step, act_every, lambda: self._graph_activations(acts, step, rid))
            if snapshot:
                return tf.concat([self._sample(w, i) for i, w in enumerate(self._vars)], 0)
            return zero

        def idle():
            return tf.zeros((sum(sizes),)) if snapshot else zero

        if grads is None and not acts:
            return None
        is_check = self._is_due(step, every)
        out = check_work() if is_check is None else tf.cond(is_check, check_work, idle)
        if grads is None:
            return None
        return step, is_check, ((out, sizes) if snapshot else None)

    def _is_due(self, step: Any, every: int) -> Any:
        """Whether ``step`` (a tensor) is due for work done every ``every`` steps of this fit;
        None when every step is."""
        import tensorflow as tf

        if every == 1:
            return None
        return tf.equal(tf.math.floormod(step - self._start_iter, every), 0)

    def _gated(self, step: Any, every: int | None, fn: Any) -> None:
        import tensorflow as tf

        if every is None:
            return
        due = self._is_due(step, every)
        if due is None or every == self._check_every:
            fn()  # (called inside the check step's cond already)
            return

        def work():
            fn()
            return tf.constant(0.0)

        tf.cond(due, work, lambda: tf.constant(0.0))

    def _graph_after(self, before: Any) -> None:
        import tensorflow as tf

        with tf.name_scope("gradwatch"):
            self._graph_after_ops(before)

    def _graph_after_ops(self, before: Any) -> None:
        import tensorflow as tf

        step, is_check, snapshot = before

        def weight_work():
            samples = tf.split(*snapshot) if snapshot is not None else None
            self._graph.write("weights", 0, self._weight_stats(samples, step))
            return tf.constant(0.0)

        if is_check is None:
            weight_work()
        else:
            tf.cond(is_check, weight_work, lambda: tf.constant(0.0))

    def _weight_stats(self, before: list[Any] | None, step: Any) -> Any:
        """Half squared norms per variable: weights, sampled update, sampled change since the
        start; then the step id."""
        import tensorflow as tf

        ws = [ops.convert_to_tensor(w) for w in self._vars]
        parts = [tf.stack([tf.nn.l2_loss(_f32(w)) for w in ws])]
        if before is not None:
            now = [self._sample(w, i) for i, w in enumerate(ws)]
            parts += [tf.stack([tf.nn.l2_loss(a - b) for a, b in zip(now, before)]),
                      tf.stack([tf.nn.l2_loss(b) for b in before]),
                      tf.stack([tf.nn.l2_loss(a - b) for a, b in zip(now, self._w0)])]
        else:
            parts.append(tf.fill((3 * len(ws),), np.float32(np.nan)))
        return tf.concat(parts + [tf.reshape(tf.cast(step, tf.float32), (1,))], 0)

    # Eager mode (PyTorch backend, run_eagerly=True): python gating, device tensors kept.

    def _norms(self, tensors: list[Any]) -> Any:
        """L2 norm of each tensor, one float32 vector, on the device."""
        if self._backend == "torch":
            import torch

            ts = [self._tensor(t) for t in tensors]
            if not self._float64:
                return torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32))
            # _foreach_norm's dtype may only widen: float64 tensors are measured in float64.
            wide = [i for i, t in enumerate(ts) if t.dtype == torch.float64]
            narrow = [i for i, t in enumerate(ts) if t.dtype != torch.float64]
            out: list[Any] = [None] * len(ts)
            for idx, kw in ((wide, {}), (narrow, {"dtype": torch.float32})):
                if idx:
                    for i, n in zip(idx, torch._foreach_norm([ts[i] for i in idx], 2, **kw)):
                        out[i] = n.float()
            return torch.stack(out)
        return ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(t, "float32")))) for t in tensors])

    def _max_abs(self, tensors: list[Any]) -> Any:
        if self._backend == "torch":
            import torch

            # One pass per tensor, nothing allocated; the inf-norm of _foreach_norm is ~10x
            # slower on CPU.
            ends = torch.stack([torch.stack(torch.aminmax(t)) if t.numel() else t.new_zeros(2)
                                for t in map(self._tensor, tensors)]).float()
            return ends.abs().amax(dim=1)
        return ops.stack([ops.max(ops.abs(ops.cast(t, "float32"))) for t in tensors])

    def _eager_before(self, grads: dict[int, Any], rows: dict[int, Any]) -> Any:
        if not grads:
            return None
        step = self._eager_step + 1
        present = tuple(sorted(grads))
        gs = [grads[i] for i in present]
        norms = self._norms(gs)
        if not self.monitor.is_check_step(step - self._start_iter):
            return step, present, norms, None, None
        samples = None
        if self._w0:  # copies: a sample can be a view of the weights the update changes
            samples = [self._copy(self._sample(w, i)) for i, w in enumerate(self._vars)]
        # max |g|, g . W and |W|, one vector: the weights are read here, before the update.
        check = self._cat([self._max_abs(gs), self._dots(gs, present, rows),
                           self._norms([self._vars[i] for i in present])])
        return step, present, norms, check, samples

    def _cat(self, parts: list[Any]) -> Any:
        if self._backend == "torch":
            import torch

            return torch.cat(parts)
        return ops.concatenate(parts)

    def _dot(self, g: Any, i: int, rows: Any = None) -> Any:
        """g . W of variable ``i`` at its current value (the sum of the products of their
        entries; for a sparse gradient, over the rows it touches), a float32 scalar. Graph mode
        and eager TensorFlow."""
        import tensorflow as tf

        w = ops.convert_to_tensor(self._vars[i])
        if rows is not None:
            w = tf.gather(w, rows)
        g = tf.convert_to_tensor(g)
        if g.dtype != tf.float64 or w.dtype != tf.float64:
            g, w = _f32(g), _f32(w)
        # (A fused multiply-and-sum: on CPU 5x faster than a MatMul of the flattened tensors.)
        return _f32(tf.reduce_sum(g * w))

    def _dots(self, gs: list[Any], present: tuple[int, ...], rows: dict[int, Any]) -> Any:
        """g . W per watched variable with a gradient (``present``), one float32 vector."""
        if self._backend != "torch":
            return ops.stack([self._dot(g, i, rows.get(i)) for g, i in zip(gs, present)])
        import torch

        out = []
        for g, i in zip(gs, present):
            g, w = self._tensor(g), self._tensor(self._vars[i]).detach()
            if not (g.dtype == w.dtype and g.dtype in (torch.float32, torch.float64)):
                g, w = g.float(), w.float()
            out.append(torch.dot(g.reshape(-1), w.reshape(-1)).float())
        return torch.stack(out) if out else torch.zeros(0)

    def _copy(self, t: Any) -> Any:
        return t.clone() if self._backend == "torch" else ops.multiply(t, 1.0)

    def _diffs(self, a: list[Any], b: list[Any]) -> list[Any]:
        if self._backend == "torch":
            import torch

            return torch._foreach_sub(a, b)
        return [x - y for x, y in zip(a, b)]

    def _eager_after(self, before: Any) -> None:
        step, present, norms, gmax, samples = before
        self._eager_step = step
        self._act_due = self._eager_act_due(step + 1)
        self._eager_rows[step % self._window] = (step, present, norms, self._eager_loss)
        self._eager_loss = None
        if gmax is None:
            return
        ws = self._vars
        parts = [self._norms(ws)]
        if samples is not None:
            now = [self._sample(w, i) for i, w in enumerate(ws)]
            parts += [self._norms(self._diffs(now, samples)), self._norms(samples),
                      self._norms(self._diffs(now, self._w0))]
        self._eager_extras = (step, present, gmax, parts)
        # Eager mode checks here, in the training thread: Keras may run batch-end callbacks on a
        # thread pool far behind training, and a strict-mode error belongs to this step.
        with self._lock:
            try:
                self._check()
            except BaseException:
                self._uninstall()
                raise

    # -- activations -------------------------------------------------------------------------

    def _wrap_activations(self, model: Any) -> None:
        if self.monitor.activation_every is None:
            return
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if type(layer).__name__ in _RECURRENT:
                continue  # their activations act inside the cell's loop
            fn = getattr(layer, "activation", None)
            if isinstance(fn, keras.layers.Layer):
                continue  # (activation=keras.layers.ReLU()): that layer is a site of its own
            kind = _SAMPLED.get(_function_kind(fn) or "")
            # ReLU outputs are >= 0 (a ReLU layer's too, unless it leaks): a unit is alive when
            # its outputs sum to more than 0, a reduction much cheaper than any(y > 0).
            nonneg = kind == "relu"
            if kind is None and type(layer).__name__ == "ReLU":
                kind, fn = "relu", None
                nonneg = not getattr(layer, "negative_slope", 0)
            if kind is None:
                continue
            path = getattr(layer, "path", None) or layer.name
            if path.startswith(f"{model.name}/"):
                path = path[len(model.name) + 1:]
            index = len(self._sites)
            self._sites.append((path, kind, 0))
            if fn is not None:
                wrapped = self._activation_wrapper(fn, (kind, nonneg), index)
                self._wrapped_layers.append((layer, "activation", fn))
                layer.activation = wrapped
            else:
                original_call = layer.call
                wrapped_call = self._activation_wrapper(original_call, (kind, nonneg), index)
                self._wrapped_layers.append((layer, "call", original_call))
                layer.call = wrapped_call

    def _activation_wrapper(self, fn, kind: tuple[str, bool], index: int):
        def wrapped(*args, **kwargs):
            y = fn(*args, **kwargs)
            if self._act_due:
                self._guard(self._sample_activation, y, kind, index)
            return y

        wrapped.__name__ = getattr(fn, "__name__", "activation")
        return wrapped

    def _activation_value(self, y: Any, kind: tuple[str, bool]) -> Any:
        kind, nonneg = kind
        y = ops.cast(y, "float32")
        units = int(y.shape[-1]) if y.shape[-1] is not None else 1
        if kind == "relu":
            total = ops.sum(ops.reshape(y if nonneg else ops.relu(y), (-1, units)), axis=0)
            return 1 - ops.mean(ops.cast(total > 0, "float32"))
        if kind == "sigmoid":
            return ops.mean(ops.cast(y * (1 - y) < 0.25 * SATURATION_DERIVATIVE, "float32"))
        return ops.mean(ops.cast(1 - y * y < SATURATION_DERIVATIVE, "float32"))

    def _sample_activation(self, y: Any, kind: tuple[str, bool], index: int) -> None:
        if not self._active or self._in_test or len(getattr(y, "shape", ())) < 2:
            return  # (while tracing test_step, _in_test keeps the sampling out of its graph)
        name, _, _ = self._sites[index]
        self._sites[index] = (name, kind[0], int(y.shape[-1] or 0))
        if _is_tracing():
            # Only kept here; the check step's cond (in apply) measures it on activation steps,
            # so steps without a sample pay nothing per site.
            self._traced_acts.setdefault(_replica()[0], {})[index] = (y, kind)
            return
        if not self.monitor.is_activation_step(self._eager_step + 1 - self._start_iter):
            return
        value = self._activation_value(y, kind)
        rid, replicas = _replica()
        if replicas > 1:  # eager tf.distribute: the mean over the replicas' shards
            value = _all_reduce("MEAN", value)
        if not rid:
            self._eager_acts[index] = value

    def _take_activations(self, rid: int) -> dict[int, tuple[Any, tuple[str, bool]]]:
        pending = self._traced_acts.pop(rid, {})
        return {i: yk for i, yk in pending.items() if _reachable(yk[0])}

    def _graph_activations(self, acts: dict[int, tuple[Any, tuple[str, bool]]], step: Any,
                           rid: int) -> None:
        import tensorflow as tf

        nan = tf.constant(np.nan, tf.float32)
        values = [self._activation_value(*acts[i]) if i in acts else nan
                  for i in range(len(self._sites))]
        stamp = tf.cast(step, tf.float32) if rid == 0 else tf.constant(0.0)
        self._graph.write("acts", rid, tf.stack(values + [stamp]))

    def _eager_act_due(self, step: int) -> bool:
        """In eager mode the wrappers sample only before an activation step (and on the
        TensorFlow backend, where the train step may be traced, always)."""
        if self._backend != "torch":
            return True
        return self.monitor.is_activation_step(step - self._start_iter)

    # Validation and predict batches run the same layers; they are not training steps.
    _in_test = False
    _act_due = False

    def on_test_begin(self, logs: Any = None) -> None:
        self._in_test = True

    def on_test_end(self, logs: Any = None) -> None:
        self._in_test = False

    def on_predict_begin(self, logs: Any = None) -> None:
        self._in_test = True

    def on_predict_end(self, logs: Any = None) -> None:
        self._in_test = False

    # -- the check ---------------------------------------------------------------------------

    def _check(self) -> None:
        stats = self._graph_stats() if self._traced else self._eager_stats()
        if stats is not None:
            self.monitor.check(stats)

    def _graph_stats(self) -> StepStats | None:
        state = self._graph
        V, W, S = len(self._vars), self._window, len(self._sites)
        host = state.read()
        hist = host[:W]
        gmax, dot, wsq = state.block(host, "grads").reshape(3, V)
        weights = state.block(host, "weights")
        acts = state.block(host, "acts")
        steps = hist[:, V + 1]
        ok = np.isfinite(steps) & (steps > self._last_seen_step)
        if not ok.any():
            return None
        slots = np.flatnonzero(ok)[np.argsort(steps[ok])]
        step_ids = steps[slots].astype(np.int64)
        self._last_seen_step = int(step_ids[-1])
        rows = hist[slots]
        sq = 2 * rows[:, :V]  # tf.nn.l2_loss is half the squared norm
        present = np.tile(self._traced_present, (len(slots), 1))
        loss = rows[:, V]
        has_loss = np.full(len(slots), self._traced_loss)
        # With steps_per_execution (or a late asynchronous read) the read may come a few steps
        # after the check step: the check-step numbers of any step in this window are new.
        extras = None
        stamp = weights[4 * V]
        if np.isfinite(stamp) and int(stamp) in set(step_ids.tolist()):
            at = int(np.flatnonzero(step_ids == int(stamp))[0])
            w = weights[:4 * V].reshape(4, V) * 2
            extras = self._layer_extras(sq[at], present[at], gmax, (dot, 2 * wsq), w[0], w[1],
                                        w[2], w[3])
        activations = {}
        if S and np.isfinite(acts[S]) and acts[S] > self._last_act_step:
            self._last_act_step = int(acts[S])
            activations = self._activation_stats(acts[:S] / self._replicas)
        return self._stats(step_ids, sq, present, loss, has_loss, extras, activations)

    def _eager_stats(self) -> StepStats | None:
        rows = sorted((r for r in self._eager_rows.values() if r[0] > self._last_seen_step),
                      key=lambda r: r[0])
        if not rows:
            return None
        parts = [r[2] for r in rows]
        losses = [r[3] for r in rows if r[3] is not None]
        parts += losses
        extras = self._eager_extras
        fresh = extras is not None and extras[0] in {r[0] for r in rows}
        if fresh:
            parts += [extras[2]] + extras[3]
        sites = sorted(self._eager_acts)
        parts += [self._eager_acts[i] for i in sites]
        host = self._to_host(parts)  # the one transfer
        V, n = len(self._vars), len(rows)
        sq = np.full((n, V), np.nan)
        present = np.zeros((n, V), dtype=bool)
        pos = 0
        for k, r in enumerate(rows):
            idx = list(r[1])
            sq[k, idx] = host[pos:pos + len(idx)] ** 2
            present[k, idx] = True
            pos += len(idx)
        has_loss = np.array([r[3] is not None for r in rows])
        loss = np.full(n, np.nan)
        loss[has_loss] = host[pos:pos + int(has_loss.sum())]
        pos += int(has_loss.sum())
        ex = None
        if fresh:
            p = list(extras[1])
            gmax, dot, wsq = np.full((3, V), np.nan)
            gmax[p], dot[p], wsq[p] = host[pos:pos + 3 * len(p)].reshape(3, len(p))
            wsq **= 2
            pos += 3 * len(p)
            k = 4 if self._w0 else 1
            w = host[pos:pos + k * V].reshape(k, V) ** 2
            pos += k * V
            if k == 1:
                w = np.vstack([w, np.full((3, V), np.nan)])
            at = [r[0] for r in rows].index(extras[0])
            ex = self._layer_extras(sq[at], present[at], gmax, (dot, wsq), w[0], w[1], w[2],
                                    w[3])
        values = np.full(len(self._sites), np.nan)
        values[sites] = host[pos:pos + len(sites)]
        activations = self._activation_stats(values) if sites else {}
        self._eager_acts = {}
        self._eager_extras = None
        step_ids = np.array([r[0] for r in rows], dtype=np.int64)
        self._last_seen_step = int(step_ids[-1])
        return self._stats(step_ids, sq, present, loss, has_loss, ex, activations)

    def _to_host(self, parts: list[Any]) -> np.ndarray:
        """Scalars and vectors, flattened into one float64 array: one device-to-host copy."""
        if self._backend == "torch":
            import torch

            flat = torch.cat([p.reshape(-1).float() for p in parts])
            return flat.detach().cpu().numpy().astype(float)
        flat = ops.concatenate([ops.reshape(ops.cast(p, "float32"), (-1,)) for p in parts])
        return ops.convert_to_numpy(flat).astype(float)

    # Per-variable numbers to per-layer numbers, on the host.

    def _layer_sum(self, x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x[..., self._order], self._starts, axis=-1)

    def _layer_extras(self, sq, present, gmax, along, wsq, rnum, rden, cnum) -> tuple:
        """Per-layer check-step numbers from per-variable ones; ``along`` is (g . W, |W|^2)
        per variable with the weights the gradient was computed at."""
        dot, wsq_before = along
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            has = self._layer_sum(present.astype(float)) > 0
            layer_dot = np.where(has, self._layer_sum(np.where(present, dot, 0.0)), np.nan)
            orth = None
            if orthogonal_norms is not None:
                rest = np.where(present, orthogonal_norms(sq, dot, wsq_before), 0.0)
                orth = np.where(has, np.sqrt(self._layer_sum(rest)), np.nan)
            g = np.where(present, gmax, -np.inf)[self._order]
            layer_max = np.maximum.reduceat(g, self._starts)
            layer_max = np.where(np.isneginf(layer_max), np.nan, layer_max)
            gbad = self._layer_sum((present & ~np.isfinite(sq)).astype(float))
            wnorm = np.sqrt(self._layer_sum(wsq))
            wbad = self._layer_sum((~np.isfinite(wsq)).astype(float))
            s = self._sample_scale
            ratio = np.sqrt(self._layer_sum(s * rnum) / self._layer_sum(s * rden))
            change = np.sqrt(self._layer_sum(s * cnum) / self._layer_sum(s * self._w0_sq))
        if self._grad_scale is not None:
            layer_max = layer_max / self._grad_scale
            layer_dot = layer_dot / self._grad_scale
            orth = orth / self._grad_scale if orth is not None else None
        return layer_max, gbad, wnorm, wbad, ratio, change, (layer_dot, orth)

    def _activation_stats(self, values: np.ndarray) -> dict[str, ActivationStats]:
        out = {}
        for (name, kind, units), value in zip(self._sites, values):
            if not np.isfinite(value):
                continue
            if kind == "relu":
                out[name] = ActivationStats(kind=kind, dead_fraction=float(value), units=units)
            else:
                out[name] = ActivationStats(kind=kind, saturated_fraction=float(value),
                                            units=units)
        return out

    def _stats(self, step_ids, sq, present, loss, has_loss, extras, activations) -> StepStats:
        base = self._start_iter
        L = len(self._layer_names)
        if L:
            with np.errstate(invalid="ignore"):
                grad_norm = np.sqrt(self._layer_sum(np.where(present, sq, 0.0)))
            has_grad = self._layer_sum(present.astype(float)) > 0
        else:
            grad_norm = np.zeros((len(step_ids), 0))
            has_grad = np.zeros((len(step_ids), 0), dtype=bool)
        if self._grad_scale is not None:
            grad_norm = grad_norm / self._grad_scale
        gmax = gbad = wnorm = wbad = ratio = change = None
        orth = None
        if extras is not None:
            # g . W reaches the detectors as the gradient less its part along W.
            gmax, gbad, wnorm, wbad, ratio, change, (_, orth) = extras
        return StepStats(
            step=int(step_ids[-1] - base), layers=tuple(self._layer_names),
            steps=step_ids - base, grad_norm=np.where(has_grad, grad_norm, np.nan),
            has_grad=has_grad, loss=loss, has_loss=has_loss, grad_size=self._sizes,
            grad_max=gmax, grad_nonfinite=gbad, weight_norm=wnorm, weight_nonfinite=wbad,
            update_ratio=None if (ratio is None or not self._w0) else ratio,
            weight_change=None if (change is None or not self._w0) else change,
            grad_norm_orthogonal=orth, activations=activations,
        )


def _current_graph() -> Any:
    import tensorflow as tf

    return tf.compat.v1.get_default_graph()
