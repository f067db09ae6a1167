"""Per-tensor statistics with the backend's own ops: norms, max |g|, g . W, copies, the transfer.

:class:`TorchOps` calls torch directly (Keras' per-call dispatch costs more than the kernels on
small tensors); :class:`KerasOps` uses ``keras.ops`` and, for g . W and sparse gradients,
TensorFlow. Every method takes and returns device tensors, except :meth:`to_host`: the one copy
to the host a check makes. :class:`NormRows` keeps the per-step gradient norms (on PyTorch in one
preallocated tensor, written in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import ops


def is_tracing() -> bool:
    """True while a backend traces a graph (tf.function, XLA), False when ops run eagerly."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    return keras.backend.backend() == "jax"


def f32(t: Any) -> Any:
    """``t`` as a float32 TensorFlow tensor."""
    import tensorflow as tf

    t = tf.convert_to_tensor(t)
    return t if t.dtype == tf.float32 else tf.cast(t, tf.float32)


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``tf.cond`` kept as one functional ``If`` op.

    Inside a tf.function TensorFlow lowers an ``If`` to Switch/Merge nodes: one Switch per
    captured tensor (every gradient and variable here) and every node of both branches, which
    the executor then schedules on every step although the check branch runs on one in
    ``check_every``. Kept functional, an untaken check costs one call of the other branch.
    (Under XLA nothing is lowered anyway.)
    """
    import tensorflow as tf

    out = tf.cond(pred, true_fn, false_fn)
    if tf.executing_eagerly():  # eager: one branch ran, nothing to keep
        return out
    op = out.op.inputs[0].op if out.op.type == "Identity" and out.op.inputs else out.op
    if op.type in ("If", "StatelessIf"):
        try:
            from tensorflow.core.framework import attr_value_pb2

            op._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
        except Exception:  # pragma: no cover - another TensorFlow: lowered, as by default
            pass
    return out


#: The largest float32: a finite sum of squares beyond it is stored as this, not as inf.
F32_MAX = float(np.finfo(np.float32).max)


def norm32(t: Any) -> Any:
    """The L2 norm of ``t``, a float32 scalar; graph mode and eager TensorFlow.

    The squares are summed in float64: in float32 they overflow from a norm of ~1.8e19 on, and a
    gradient of finite entries would read as non-finite. A finite norm beyond float32 is stored
    as :data:`F32_MAX` (still huge); a NaN/Inf entry still gives NaN/Inf. (The norm, not its
    square, is what is stored: the host squares it in float64.)
    """
    import tensorflow as tf

    n = tf.sqrt(2 * tf.nn.l2_loss(tf.cast(tf.convert_to_tensor(t), tf.float64)))
    return tf.cast(tf.where(tf.math.is_finite(n), tf.minimum(n, F32_MAX), n), tf.float32)


def norms32(tensors: list[Any]) -> Any:
    """The L2 norm of each tensor, one float32 vector, at float32 cost: one ``tf.nn.l2_loss``
    per tensor, and only when one of those sums is not finite (it overflowed, or an entry is
    NaN/Inf) the float64 :func:`norm32` of each, in the untaken-by-default branch of one cond.
    Graph mode (the per-step ring-buffer row) and eager TensorFlow."""
    import tensorflow as tf

    half = tf.stack([tf.nn.l2_loss(f32(t)) for t in tensors])
    return cond(tf.reduce_all(tf.math.is_finite(half)),
                lambda: tf.sqrt(half) * np.float32(np.sqrt(2.0)),
                lambda: tf.stack([norm32(t) for t in tensors]))


def dense(g: Any) -> tuple[Any, Any]:
    """The gradient's entries and, for a sparse gradient, the variable rows they belong to
    (None for a dense one)."""
    # TensorFlow hands embeddings IndexedSlices; their values carry the gradient's entries.
    if type(g).__name__ == "IndexedSlices":
        import tensorflow as tf

        # Rows of repeated indices add up in the dense gradient: sum them before any norm.
        unique, position = tf.unique(g.indices)
        return tf.math.unsorted_segment_sum(g.values, position, tf.shape(unique)[0]), unique
    return g, None


def tf_dot(g: Any, w: Any, rows: Any = None) -> Any:
    """g . W (the sum of the products of their entries; for a sparse gradient, over the rows
    it touches), a float32 scalar. Graph mode and eager TensorFlow."""
    import tensorflow as tf

    w = ops.convert_to_tensor(w)
    if rows is not None:
        w = tf.gather(w, rows)
    g = tf.convert_to_tensor(g)
    if g.dtype != tf.float64 or w.dtype != tf.float64:
        g, w = f32(g), f32(w)
    # (A fused multiply-and-sum: on CPU 5x faster than a MatMul of the flattened tensors.)
    return f32(tf.reduce_sum(g * w))


class KerasOps:
    """``keras.ops`` (eager TensorFlow; graph mode samples weights with it too)."""

    def tensor(self, x: Any) -> Any:
        return ops.convert_to_tensor(x)

    def resolve(self, variables: list[Any]) -> list[Any]:
        """What the other methods should be given for ``variables`` (read once per check)."""
        return variables

    def flat(self, w: Any) -> Any:
        """``w`` as one float32 vector."""
        return ops.reshape(ops.cast(w, "float32"), (-1,))

    def norms(self, tensors: list[Any]) -> Any:
        """L2 norm of each tensor, one float32 vector (on PyTorch optionally written ``out=``
        a vector of the right length)."""
        if keras.backend.backend() == "tensorflow":
            return norms32(tensors)  # float64 only when a float32 sum overflowed
        # (JAX without x64 has no float64: there the sum stays float32 and may overflow.)
        n = ops.stack([ops.sqrt(ops.sum(ops.square(ops.cast(t, "float32")))) for t in tensors])
        n = ops.where(ops.isfinite(n), ops.minimum(n, F32_MAX), n)
        return ops.cast(n, "float32")

    def max_abs(self, tensors: list[Any]) -> Any:
        return ops.stack([ops.max(ops.abs(ops.cast(t, "float32"))) for t in tensors])

    def dots(self, grads: list[Any], weights: list[Any], rows: list[Any]) -> Any:
        """g . W per gradient and its variable, one float32 vector."""
        return ops.stack([tf_dot(g, w, r) for g, w, r in zip(grads, weights, rows)])

    def copy(self, t: Any) -> Any:
        return ops.multiply(t, 1.0)

    def cat(self, parts: list[Any]) -> Any:
        return ops.concatenate(parts)

    def stack(self, parts: list[Any]) -> Any:
        return ops.stack(parts)

    def split(self, x: Any, sizes: list[int]) -> list[Any]:
        """``x`` cut into consecutive pieces of ``sizes``."""
        return list(ops.split(x, np.cumsum(sizes)[:-1].tolist())) if len(sizes) > 1 else [x]

    def norm_rows(self, window: int, width: int) -> NormRows:
        """Storage for the gradient norms of the last ``window`` steps."""
        return NormRows(self, width)

    def to_host(self, parts: list[Any]) -> np.ndarray:
        """Scalars and vectors, flattened into one float64 array: one device-to-host copy."""
        flat = ops.concatenate([ops.reshape(ops.cast(p, "float32"), (-1,)) for p in parts])
        return ops.convert_to_numpy(flat).astype(float)


class NormRows:
    """Per step, the gradient L2 norm of each of ``width`` variables (NaN for a variable without
    a gradient), kept on the device by ring-buffer slot."""

    def __init__(self, ops: KerasOps, width: int) -> None:
        self._ops, self._width = ops, width
        self._rows: dict[int, Any] = {}

    def write(self, slot: int, tensors: list[Any], present: tuple[int, ...]) -> None:
        """The norms of ``tensors``, the gradients of the variables ``present``."""
        norms = self._ops.norms(tensors)
        if len(present) < self._width:
            norms = ops.scatter_update(ops.full((self._width,), np.nan),
                                       [[i] for i in present], norms)
        self._rows[slot] = norms

    def read(self, slots: list[int]) -> Any:
        """The rows of ``slots``, one ``[len(slots), width]`` tensor."""
        return ops.stack([self._rows[s] for s in slots])

    def row(self, slot: int) -> Any:
        """The row of ``slot`` (a ``[width]`` device tensor), or None when never written."""
        return self._rows.get(slot)


class _TorchNormRows(NormRows):
    """One preallocated ``[window, width]`` tensor, written in place."""

    def __init__(self, ops: TorchOps, window: int, width: int) -> None:
        import torch

        self._ops, self._width = ops, width
        self._buf = torch.full((window, width), float("nan"))

    def write(self, slot: int, tensors: list[Any], present: tuple[int, ...]) -> None:
        row = self._buf[slot]
        if len(present) == self._width:
            self._ops.norms(tensors, out=row)
        else:
            row.fill_(float("nan"))
            row[list(present)] = self._ops.norms(tensors)

    def read(self, slots: list[int]) -> Any:
        return self._buf[slots]  # (a copy: later steps write the buffer on)

    def row(self, slot: int) -> Any:
        return self._buf[slot]


class TorchOps(KerasOps):
    """torch itself, on the PyTorch backend.

    Args:
        float64: Whether any watched variable is float64 (measured in float64, not narrowed).
    """

    def __init__(self, float64: bool = False) -> None:
        import torch

        self._torch = torch
        self._float64 = float64
        # Flat float32 views of weight tensors, by id: Keras updates torch variables in place, so
        # a view stays the live weights for as long as the variable keeps its tensor.
        self._flat: dict[int, tuple[Any, Any]] = {}

    def tensor(self, x: Any) -> Any:
        """The torch tensor behind ``x``, without Keras' per-call dispatch."""
        return x.value if isinstance(x, keras.Variable) else x

    def resolve(self, variables: list[Any]) -> list[Any]:
        # (Keras' Variable.value costs a few µs a call; a check step would call it ~60 times.)
        return [self.tensor(w) for w in variables]

    def flat(self, w: Any) -> Any:
        # On a float32 tensor a view of the live weights (the same object while it lives).
        t = self.tensor(w)
        cached = self._flat.get(id(t))
        if cached is not None and cached[0] is t:
            return cached[1]
        flat = t.detach().reshape(-1).float()
        if flat.data_ptr() == t.data_ptr():
            self._flat[id(t)] = (t, flat)
        return flat

    def norms(self, tensors: list[Any], out: Any = None) -> Any:
        torch = self._torch
        ts = [self.tensor(t) for t in tensors]
        # Summed in float64: in float32 the squares of a finite gradient overflow from a norm of
        # ~1.8e19 on and it would read as non-finite. A finite norm beyond float32 is stored as
        # F32_MAX (still huge for the exploding detector); NaN/Inf entries still give NaN/Inf.
        n = torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float64)) if ts else \
            torch.zeros(0, dtype=torch.float64)
        n = torch.where(n.isfinite(), n.clamp(max=F32_MAX), n)
        if out is None:
            return n.float()
        return out.copy_(n)

    def max_abs(self, tensors: list[Any]) -> Any:
        torch = self._torch
        ts = [self.tensor(t) for t in tensors]
        # One pass per tensor, nothing allocated; the inf-norm of _foreach_norm is ~10x slower
        # on CPU.
        if self._float64 or not all(t.numel() for t in ts):
            ends = torch.stack([torch.stack(torch.aminmax(t)).float() if t.numel()
                                else t.new_zeros(2, dtype=torch.float32) for t in ts])
            return ends.abs().amax(dim=1)
        ends = [torch.aminmax(t) for t in ts]
        return torch.maximum(torch.stack([e.max for e in ends]),
                             torch.stack([e.min for e in ends]).neg())

    def dots(self, grads: list[Any], weights: list[Any], rows: list[Any]) -> Any:
        torch = self._torch
        wide = (torch.float32, torch.float64)
        out = []
        for g, w in zip(grads, weights):
            g, t = self.tensor(g), self.tensor(w)
            flat = self.flat(w) if t.dtype == torch.float32 else t.detach().reshape(-1)
            if not (g.dtype == flat.dtype and g.dtype in wide):
                g, flat = g.float(), flat.float()
            out.append(torch.dot(g.reshape(-1), flat))
        if self._float64:
            out = [d.float() for d in out]
        return torch.stack(out) if out else torch.zeros(0)

    def copy(self, t: Any) -> Any:
        return t.clone()

    def cat(self, parts: list[Any]) -> Any:
        return self._torch.cat(parts)

    def stack(self, parts: list[Any]) -> Any:
        return self._torch.stack(parts)

    def split(self, x: Any, sizes: list[int]) -> list[Any]:
        return list(self._torch.split(x, sizes))

    def norm_rows(self, window: int, width: int) -> NormRows:
        return _TorchNormRows(self, window, width)

    def to_host(self, parts: list[Any]) -> np.ndarray:
        flat = self._torch.cat([p.reshape(-1).float() for p in parts])
        return flat.detach().cpu().numpy().astype(float)


def ops_for(backend: str, float64: bool = False) -> KerasOps:
    """The ops of ``backend`` (``keras.backend.backend()``)."""
    return TorchOps(float64) if backend == "torch" else KerasOps()
