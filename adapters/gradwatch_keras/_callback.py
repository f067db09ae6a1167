"""Keras 3 callback that sees the gradients the optimizer applies, inside compiled ``fit``.

Keras callbacks only see ``logs``. gradwatch wraps two methods of the model's optimizer for the
duration of ``fit`` (and restores them at the end):

* ``scale_loss(loss)`` — every backend's train step passes the batch loss through it: the loss
  is recorded there (not the running mean ``logs`` shows);
* ``apply(grads, variables)`` — gradients arrive after the backward pass and before the
  optimizer's own clipping; per-layer statistics are computed there with the backend's ops.

In graph mode (TensorFlow ``tf.function``, with or without XLA) the statistics are written into
one non-trainable state variable by ops inside the graph, gated by the optimizer's iteration
counter; the host reads that variable once per check, in ``on_train_batch_end``. In eager mode
(the PyTorch backend, ``run_eagerly=True``) the same numbers are kept as device tensors and
gated by a host counter. Either way: no second forward/backward pass, no ``run_eagerly``, and one
device-to-host transfer per check.
"""

from __future__ import annotations

import dataclasses
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

logger = logging.getLogger("gradwatch")

KERAS_OPTIONS = ("update_ratio", "sample_fraction")
_SAMPLED = {"relu": "relu", "relu6": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_NORM_LAYERS = {"BatchNormalization": "batchnorm", "LayerNormalization": "layernorm",
                "GroupNormalization": "groupnorm", "UnitNormalization": "unitnorm",
                "RMSNormalization": "rmsnorm"}
_RECURRENT = ("SimpleRNN", "LSTM", "GRU", "RNN", "ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D",
              "Bidirectional")


def _activation_name(fn: Any) -> str | None:
    name = getattr(fn, "__name__", None) or getattr(fn, "name", None)
    if not isinstance(name, str) or name == "linear":
        return None
    return name.lower()


def _is_tracing() -> bool:
    """True while a backend traces a graph (tf.function, XLA), False when ops run eagerly."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return keras.backend.backend() == "jax"


def _dense(g: Any) -> Any:
    # TensorFlow hands embeddings IndexedSlices; their values carry the gradient's entries.
    if type(g).__name__ == "IndexedSlices":
        import tensorflow as tf

        # Rows of repeated indices add up in the dense gradient: sum them before any norm.
        unique, position = tf.unique(g.indices)
        return tf.math.unsorted_segment_sum(g.values, position, tf.shape(unique)[0])
    return g


@dataclasses.dataclass
class _Layout:
    """Offsets of the pieces inside the flat state vector."""

    window: int
    layers: int
    sites: int

    @property
    def hist(self) -> int:
        return 0

    @property
    def loss(self) -> int:
        return self.window * self.layers

    @property
    def steps(self) -> int:
        return self.loss + self.window

    @property
    def extras(self) -> int:  # gmax, gbad, wnorm, wbad, ratio, change (L each) + step
        return self.steps + self.window

    @property
    def extras_size(self) -> int:
        return 6 * self.layers + 1

    @property
    def size(self) -> int:
        return self.extras + self.extras_size


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

    #: Batch-end work is a lock-protected read of one state variable; every step's numbers
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
        self._installed: list[tuple[Any, str]] = []
        self._wrapped_layers: list[tuple[Any, str, Any]] = []
        self._active = False

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
        if self._traced_present is None:
            return  # eager mode checks inside the training step itself (see _after_apply)
        if step // self.monitor.check_every > self._checked_upto // self.monitor.check_every:
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

    # -- setup -------------------------------------------------------------------------------

    def _begin(self) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise TypeError("GradWatchCallback needs a compiled model (model.optimizer is None)")
        self._uninstall()
        self._backend = keras.backend.backend()
        self._inner = getattr(optimizer, "inner_optimizer", optimizer)
        self._loss_scaled = optimizer is not self._inner
        self._optimizer = optimizer
        self._build_layers(model)
        self.monitor.set_context(RunContext(model=self._model_info(model, optimizer),
                                            layers=tuple(self._layer_infos())))
        self.monitor.reset()
        self.monitor.start()
        # Room for more than one check's steps: with asynchronous batch-end dispatch the read
        # may run a step or two behind training.
        window = 2 * self.monitor.check_every + 4
        L = len(self._layer_names)
        self._layout = _Layout(window, L, 0)
        self._sites: list[tuple[str, str, int]] = []  # name, kind, units
        self._prepare_samples()
        self._wrap_activations(model)
        self._layout = _Layout(window, L, len(self._sites))
        # Graph mode: one flat state vector, written in the train step, read once per check.
        init = np.full(self._layout.size, np.nan, dtype="float32")
        self._state = keras.Variable(init, trainable=False, dtype="float32",
                                     name="gradwatch_state")
        self._act_state = keras.Variable(np.full(max(len(self._sites), 1) + 1, np.nan, "float32"),
                                         trainable=False, dtype="float32",
                                         name="gradwatch_activations")
        self._pending_loss = keras.Variable(np.float32(np.nan), trainable=False, dtype="float32",
                                            name="gradwatch_loss")
        # Eager mode: device tensors per step, a host step counter.
        self._eager_rows: dict[int, tuple[int, Any, Any]] = {}
        self._eager_extras: Any = None
        self._eager_acts: dict[str, Any] = {}
        self._eager_loss: Any = None
        self._eager_step = int(ops.convert_to_numpy(self._inner.iterations))
        self._start_iter = self._eager_step
        self._epoch_base = 0
        self._last_host_step = 0
        self._checked_upto = 0
        self._last_seen_step = self._start_iter
        self._traced_present: list[bool] | None = None
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
                          recurrent=t in _RECURRENT)
                for i, (n, t) in enumerate(zip(self._layer_names, self._layer_types))]

    def _model_info(self, model: Any, optimizer: Any) -> ModelInfo:
        acts, norms = set(), set()
        residual = recurrent = False
        depth = 0
        for layer in model._flatten_layers(include_self=False, recursive=True):
            name = type(layer).__name__
            act = _activation_name(getattr(layer, "activation", None))
            if act:
                acts.add(act)
            if name in ("ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax"):
                acts.add({"ReLU": "relu", "LeakyReLU": "leaky_relu", "PReLU": "prelu",
                          "ELU": "elu", "Softmax": "softmax"}[name])
            if name in _NORM_LAYERS:
                norms.add(_NORM_LAYERS[name])
            if name == "Add":
                residual = True
            if name in _RECURRENT:
                recurrent = True
            if any(len(w.shape) >= 2 for w in getattr(layer, "_trainable_variables", [])):
                depth += 1
        lr = None
        try:
            lr = float(ops.convert_to_numpy(self._inner.learning_rate))
        except Exception:
            pass
        clipping = any(getattr(self._inner, a, None) for a in ("clipnorm", "global_clipnorm",
                                                               "clipvalue"))
        return ModelInfo(framework=f"keras/{keras.backend.backend()}", activations=frozenset(acts),
                         normalization=frozenset(norms), depth=depth,
                         residual=True if residual else None, recurrent=recurrent,
                         learning_rates=(lr,) if lr is not None else (),
                         optimizer=type(self._inner).__name__, clipping=clipping or None)

    def _prepare_samples(self) -> None:
        self._strides: dict[int, int] = {}
        self._scale: dict[int, float] = {}
        self._w0: dict[int, Any] = {}
        if self.update_ratio == "off":
            return
        for w in self._vars:
            n = int(np.prod(w.shape))
            stride = sample_stride(n, self.sample_fraction, self.update_ratio == "exact")
            self._strides[id(w)] = stride
            self._scale[id(w)] = n / max(len(range(0, n, stride)), 1)
            # A copy: on the PyTorch backend the strided sample is a view of the live variable.
            self._w0[id(w)] = ops.multiply(ops.convert_to_tensor(self._sample(w)), 1.0)

    def _sample(self, w: Any) -> Any:
        flat = ops.reshape(ops.cast(w, "float32"), (-1,))
        stride = self._strides[id(w)]
        return flat if stride == 1 else flat[::stride]

    def extra_memory_bytes(self) -> int:
        """Bytes held between steps: start-of-run samples and the state vectors."""
        held = sum(int(np.prod(t.shape)) * 4 for t in self._w0.values())
        return held + 4 * (self._layout.size + len(self._sites) + 2)

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
            before = None
            try:
                before = self._before_apply(grads, tv)
            except (GradientHealthError, Warning):
                raise
            except Exception as exc:
                self.monitor.internal_error("keras adapter (gradient statistics)", exc)
            result = original_apply(grads, trainable_variables)
            if before is not None:
                self._guard(self._after_apply, tv, before)
            return result

        optimizer.scale_loss = scale_loss
        self._installed.append((optimizer, "scale_loss"))
        inner.apply = apply
        self._installed.append((inner, "apply"))

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
        value = ops.cast(ops.mean(loss), "float32")
        if _is_tracing():
            self._pending_loss.assign(value)
        else:
            self._eager_loss = value

    def _sumsq(self, tensors: list[Any]) -> Any:
        if self._backend == "torch" and not _is_tracing():
            import torch

            n = torch.stack(torch._foreach_norm([ops.convert_to_tensor(t) for t in tensors], 2,
                                                dtype=torch.float32))
            return n * n
        return ops.stack([ops.sum(ops.square(ops.cast(t, "float32"))) for t in tensors])

    def _layer_sum(self, values: Any, segments: list[int]) -> Any:
        L = len(self._layer_names)
        onehot = np.zeros((len(segments), L), dtype="float32")
        onehot[np.arange(len(segments)), segments] = 1
        return ops.matmul(ops.reshape(values, (1, -1)), ops.convert_to_tensor(onehot))[0]

    def _before_apply(self, grads: list[Any], tv: list[Any]) -> Any:
        pairs = [(_dense(g), w) for g, w in zip(grads, tv)
                 if g is not None and id(w) in self._var_layer]
        if not pairs:
            return None
        segs = [self._var_layer[id(w)] for _, w in pairs]
        present = np.zeros(len(self._layer_names), dtype=bool)
        present[segs] = True
        sq = self._sumsq([g for g, _ in pairs])
        # A LossScaleOptimizer hands its inner optimizer unscaled gradients (and skips the step on
        # overflow); a static loss_scale_factor is divided out inside apply, after this point.
        scale = getattr(self._inner, "loss_scale_factor", None)
        layer_sq = self._layer_sum(sq, segs)
        if scale is not None:
            layer_sq = layer_sq / ops.square(ops.cast(scale, "float32"))
        norms = ops.sqrt(layer_sq)
        if _is_tracing():
            self._traced_present = present.tolist()
            return self._graph_before(pairs, segs, sq, norms, scale)
        return self._eager_before(pairs, segs, sq, norms, present, scale)

    def _grad_extras(self, pairs, segs, sq, scale) -> Any:
        L = len(self._layer_names)
        gmax = ops.stack([ops.max(ops.abs(ops.cast(g, "float32"))) for g, _ in pairs])
        if scale is not None:
            gmax = gmax / ops.cast(scale, "float32")
        layer_max = ops.segment_max(gmax, ops.convert_to_tensor(np.array(segs, "int32")),
                                    num_segments=L)
        gbad = self._layer_sum(ops.cast(ops.logical_not(ops.isfinite(sq)), "float32"), segs)
        return layer_max, gbad

    def _weights(self, tv: list[Any]) -> list[Any]:
        return [w for w in tv if id(w) in self._var_layer]

    def _weight_extras(self, ws: list[Any], before: list[Any] | None) -> Any:
        segs = [self._var_layer[id(w)] for w in ws]
        wsq = self._sumsq([ops.cast(w, "float32") for w in ws])
        wnorm = ops.sqrt(self._layer_sum(wsq, segs))
        wbad = self._layer_sum(ops.cast(ops.logical_not(ops.isfinite(wsq)), "float32"), segs)
        nan = ops.full((len(self._layer_names),), np.nan, dtype="float32")
        if not self._w0:
            return wnorm, wbad, nan, nan
        scale = ops.convert_to_tensor(np.array([self._scale[id(w)] for w in ws], "float32"))
        now = [self._sample(w) for w in ws]

        def layer_norm(ts):
            return ops.sqrt(self._layer_sum(self._sumsq(ts) * scale, segs))

        change = layer_norm([a - self._w0[id(w)] for a, w in zip(now, ws)]) / layer_norm(
            [self._w0[id(w)] for w in ws])
        ratio = nan
        if before is not None:
            ratio = layer_norm([a - b for a, b in zip(now, before)]) / layer_norm(before)
        return wnorm, wbad, ratio, change

    # Eager mode (PyTorch backend, run_eagerly=True): python gating, device tensors kept.

    def _eager_before(self, pairs, segs, sq, norms, present, scale) -> Any:
        step = self._eager_step + 1
        extras = None
        if self.monitor.is_check_step(step - self._start_iter):
            extras = self._grad_extras(pairs, segs, sq, scale)
        self._eager_pending = (step, norms, present, extras)
        if extras is not None and self._w0:
            return [ops.convert_to_tensor(ops.copy(self._sample(w))) for w in self._weights(
                [w for _, w in pairs])], [w for _, w in pairs]
        return [], [w for _, w in pairs]

    def _after_apply(self, tv: list[Any], before: Any) -> None:
        if _is_tracing():
            return self._graph_after(tv, before)
        samples, ws = before
        step, norms, present, extras = self._eager_pending
        self._eager_step = step
        window = self._layout.window
        self._eager_rows[step % window] = (step, norms, present, self._eager_loss)
        self._eager_loss = None
        if extras is not None:
            wnorm, wbad, ratio, change = self._weight_extras(self._weights(ws), samples or None)
            self._eager_extras = (step, extras[0], extras[1], wnorm, wbad, ratio, change)
            # Eager mode checks here, in the training thread: Keras may run batch-end callbacks
            # on a thread pool far behind training, and a strict-mode error belongs to this step.
            with self._lock:
                try:
                    self._check()
                except BaseException:
                    self._uninstall()
                    raise

    # Graph mode (tf.function, XLA): gated by the optimizer's iteration counter.

    def _graph_before(self, pairs, segs, sq, norms, scale) -> Any:
        L = len(self._layer_names)
        lay = self._layout
        it = ops.cast(self._inner.iterations, "int32")
        step = it + 1
        is_check = ops.equal(ops.mod(step - self._start_iter, self.monitor.check_every), 0)
        slot = ops.mod(it, lay.window)
        state = ops.cast(ops.convert_to_tensor(self._state), "float32")
        state = ops.slice_update(state, [slot * L], ops.cast(norms, "float32"))
        state = ops.slice_update(state, [lay.loss + slot],
                                 ops.reshape(ops.convert_to_tensor(self._pending_loss), (1,)))
        state = ops.slice_update(state, [lay.steps + slot],
                                 ops.reshape(ops.cast(step, "float32"), (1,)))
        ws = [w for _, w in pairs]
        old = state[lay.extras:lay.extras + 2 * L]
        sizes = [int(np.prod(self._sample(w).shape)) for w in ws] if self._w0 else []

        def check_work():
            # One cond for all check-step work before the update: gradient extras, and the
            # weight samples the update ratio compares against after it.
            gmax, gbad = self._grad_extras(pairs, segs, sq, scale)
            return ops.concatenate([gmax, gbad] + [self._sample(w) for w in ws if sizes])

        def idle():
            return ops.concatenate([old, ops.zeros((sum(sizes),), "float32")])

        out = ops.cond(is_check, check_work, idle)
        state = ops.slice_update(state, [lay.extras], out[:2 * L])
        self._state.assign(state)
        return is_check, ((out[2 * L:], sizes) if sizes else None), ws

    def _graph_after(self, tv: list[Any], before: Any) -> None:
        is_check, snap, ws = before
        lay = self._layout
        L = len(self._layer_names)

        def weight_extras():
            samples = None
            if snap is not None:
                flat, sizes = snap
                samples, pos = [], 0
                for n in sizes:
                    samples.append(flat[pos:pos + n])
                    pos += n
            parts = self._weight_extras(ws, samples)
            step = ops.cast(self._inner.iterations, "float32")
            return ops.concatenate(list(parts) + [ops.reshape(step, (1,))])

        state = ops.cast(ops.convert_to_tensor(self._state), "float32")
        old = state[lay.extras + 2 * L:lay.size]
        state = ops.slice_update(state, [lay.extras + 2 * L],
                                 ops.cond(is_check, weight_extras, lambda: old))
        self._state.assign(state)

    # -- activations -------------------------------------------------------------------------

    def _wrap_activations(self, model: Any) -> None:
        if self.monitor.activation_every is None:
            return
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if type(layer).__name__ in _RECURRENT:
                continue  # their activations act inside the cell's loop
            fn = getattr(layer, "activation", None)
            kind = _SAMPLED.get(_activation_name(fn) or "")
            if kind is None and type(layer).__name__ == "ReLU":
                kind, fn = "relu", None
            if kind is None:
                continue
            path = getattr(layer, "path", None) or layer.name
            if path.startswith(f"{model.name}/"):
                path = path[len(model.name) + 1:]
            index = len(self._sites)
            self._sites.append((path, kind, 0))
            if fn is not None:
                wrapped = self._activation_wrapper(fn, kind, index)
                self._wrapped_layers.append((layer, "activation", fn))
                layer.activation = wrapped
            else:
                original_call = layer.call
                wrapped_call = self._activation_wrapper(original_call, kind, index)
                self._wrapped_layers.append((layer, "call", original_call))
                layer.call = wrapped_call

    def _activation_wrapper(self, fn, kind: str, index: int):
        def wrapped(*args, **kwargs):
            y = fn(*args, **kwargs)
            self._guard(self._sample_activation, y, kind, index)
            return y

        wrapped.__name__ = getattr(fn, "__name__", "activation")
        return wrapped

    def _activation_value(self, y: Any, kind: str) -> Any:
        y = ops.cast(y, "float32")
        units = int(y.shape[-1]) if y.shape[-1] is not None else 1
        if kind == "relu":
            alive = ops.any(ops.reshape(y > 0, (-1, units)), axis=0)
            return 1 - ops.mean(ops.cast(alive, "float32"))
        if kind == "sigmoid":
            return ops.mean(ops.cast(y * (1 - y) < 0.25 * SATURATION_DERIVATIVE, "float32"))
        return ops.mean(ops.cast(1 - y * y < SATURATION_DERIVATIVE, "float32"))

    def _sample_activation(self, y: Any, kind: str, index: int) -> None:
        if not self._active or self._in_test or len(getattr(y, "shape", ())) < 2:
            return  # (while tracing test_step, _in_test keeps the sampling out of its graph)
        name, _, _ = self._sites[index]
        self._sites[index] = (name, kind, int(y.shape[-1] or 0))
        every = self.monitor.activation_every
        if _is_tracing():
            step = ops.cast(self._inner.iterations, "int32") + 1 - self._start_iter
            sample = ops.equal(ops.mod(step, every), 0)
            # Inside a layer call under mixed precision, float32 variables read as the compute
            # dtype: cast back so both branches agree.
            current = ops.cast(ops.convert_to_tensor(self._act_state), "float32")
            value = ops.cond(sample, lambda: self._activation_value(y, kind),
                             lambda: current[index])
            current = ops.slice_update(current, [index], ops.reshape(value, (1,)))
            self._act_state.assign(current)
            return
        step = self._eager_step + 1 - self._start_iter
        if step % every == 0 and not self._in_test:
            self._eager_acts[name] = self._activation_value(y, kind)

    # Validation and predict batches run the same layers; they are not training steps.
    _in_test = False

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
        if self._backend_eager():
            stats = self._eager_stats()
        else:
            stats = self._graph_stats()
        if stats is not None:
            self.monitor.check(stats)

    def _backend_eager(self) -> bool:
        return self._traced_present is None

    def _graph_stats(self) -> StepStats | None:
        lay = self._layout
        L = len(self._layer_names)
        host = ops.convert_to_numpy(ops.concatenate([
            ops.convert_to_tensor(self._state), ops.convert_to_tensor(self._act_state)]))
        host = host.astype(float)
        steps = host[lay.steps:lay.steps + lay.window]
        ok = np.isfinite(steps) & (steps > self._last_seen_step)
        if not ok.any():
            return None
        order = np.argsort(steps[ok])
        slots = np.flatnonzero(ok)[order]
        step_ids = steps[slots].astype(np.int64)
        self._last_seen_step = int(step_ids[-1])
        hist = host[:lay.window * L].reshape(lay.window, L)[slots]
        loss = host[lay.loss:lay.loss + lay.window][slots]
        present = np.array(self._traced_present or [True] * L, dtype=bool)
        has_grad = np.tile(present, (len(slots), 1))
        ex = host[lay.extras:lay.size]
        gmax, gbad, wnorm, wbad, ratio, change = (ex[i * L:(i + 1) * L] for i in range(6))
        extras_step = ex[6 * L]
        # With steps_per_execution the read may come a few steps after the check step: the
        # weight statistics of any check step in this window are new.
        fresh = bool(np.isfinite(extras_step)) and int(extras_step) in set(step_ids.tolist())
        acts = host[lay.size:lay.size + len(self._sites)]
        activations = {name: self._act_stats(kind, float(val), units)
                       for (name, kind, units), val in zip(self._sites, acts) if np.isfinite(val)}
        self._act_state.assign(np.full(max(len(self._sites), 1) + 1, np.nan, "float32")) \
            if activations else None
        return self._stats(step_ids, hist, has_grad, loss,
                           (gmax, gbad, wnorm, wbad, ratio, change) if fresh else None, activations)

    def _eager_stats(self) -> StepStats | None:
        rows = sorted((r for r in self._eager_rows.values() if r[0] > self._last_seen_step),
                      key=lambda r: r[0])
        if not rows:
            return None
        L = len(self._layer_names)
        parts = [ops.stack([r[1] for r in rows]),
                 ops.stack([r[3] if r[3] is not None else ops.convert_to_tensor(np.float32(np.nan))
                            for r in rows])]
        extras = self._eager_extras
        fresh = extras is not None and extras[0] in {r[0] for r in rows}
        if fresh:
            parts += [ops.stack([ops.convert_to_tensor(x) for x in extras[1:]])]
        names = list(self._eager_acts)
        if names:
            parts.append(ops.stack([self._eager_acts[n] for n in names]))
        host = ops.convert_to_numpy(ops.concatenate([ops.reshape(p, (-1,)) for p in parts]))
        host = host.astype(float)
        n = len(rows)
        hist = host[:n * L].reshape(n, L)
        loss = host[n * L:n * L + n]
        pos = n * L + n
        ex = None
        if fresh:
            ex = tuple(host[pos + i * L:pos + (i + 1) * L] for i in range(6))
            pos += 6 * L
        kinds = {name: (kind, units) for name, kind, units in self._sites}
        activations = {name: self._act_stats(kinds[name][0], float(val), kinds[name][1])
                       for name, val in zip(names, host[pos:pos + len(names)])}
        self._eager_acts = {}
        self._eager_extras = None
        step_ids = np.array([r[0] for r in rows], dtype=np.int64)
        self._last_seen_step = int(step_ids[-1])
        has_grad = np.array([r[2] for r in rows], dtype=bool)
        has_loss = np.array([r[3] is not None for r in rows])
        return self._stats(step_ids, hist, has_grad, loss, ex, activations, has_loss)

    @staticmethod
    def _act_stats(kind: str, value: float, units: int) -> ActivationStats:
        if kind == "relu":
            return ActivationStats(kind=kind, dead_fraction=value, units=units)
        return ActivationStats(kind=kind, saturated_fraction=value, units=units)

    def _stats(self, step_ids, hist, has_grad, loss, extras, activations,
               has_loss=None) -> StepStats:
        base = self._start_iter
        gmax = gbad = wnorm = wbad = ratio = change = None
        if extras is not None:
            gmax, gbad, wnorm, wbad, ratio, change = extras
        if has_loss is None:
            has_loss = ~np.isnan(loss) | np.isinf(loss)
        return StepStats(
            step=int(step_ids[-1] - base), layers=tuple(self._layer_names),
            steps=step_ids - base, grad_norm=np.where(has_grad, hist, np.nan), has_grad=has_grad,
            loss=loss, has_loss=has_loss, grad_size=self._sizes, grad_max=gmax,
            grad_nonfinite=gbad, weight_norm=wnorm, weight_nonfinite=wbad,
            update_ratio=None if (ratio is None or not self._w0) else ratio,
            weight_change=None if (change is None or not self._w0) else change,
            activations=activations,
        )
