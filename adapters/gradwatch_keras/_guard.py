"""``guard="skip"``: an optimizer step whose gradients are not finite is not applied.

The wrapped ``apply`` (:mod:`._optimizer`) hands the real update to :meth:`StepGuard.apply`.
Traced (tf.function, with or without XLA) the decision is made in the graph, as Keras' own
``LossScaleOptimizer`` makes it: ``ops.cond(all finite, apply, skip)``, so a skipped step leaves
the variables, the optimizer's slots and ``optimizer.iterations`` exactly as they were. The skip
branch writes the skip into a small variable of its own (a count, the last 16 skipped steps, and
which variables were non-finite at the last one); the callback reads it at each batch end (one
small host read per batch, or per execution with ``steps_per_execution``) and tells the monitor,
so the finding names the step. Eager (the PyTorch backend, ``run_eagerly=True``) the flags are
read on the host before the update: one sync a step, the trade a loss scaler makes. On JAX
(Keras' stateless trainer) the update runs in a stateless scope of its own under ``lax.cond``,
as ``LossScaleOptimizer.stateless_apply`` runs it, and the skips' variable rides in the
optimizer's variables for the fit (see :mod:`._jaxgraph`), read at batch begins.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from keras import ops

from gradwatch import kit

#: Skipped steps remembered between two reads of the traced guard's variable.
RING = 16


class StepGuard:
    """Skips the updates of one fit whose gradients are not finite.

    Args:
        monitor: The run's monitor (told of each skip).
        tensor_layer: The layer index of each watched variable.
        start: The optimizer's iterations when the fit began (steps count from there).
        traced: Whether the backend traces the train step (TensorFlow): then the skips are
            kept in a variable read by :meth:`poll`.
    """

    def __init__(self, monitor: kit.Monitor, tensor_layer: np.ndarray, start: int,
                 traced: bool, jax_fit: tuple[Any, Any] | None = None) -> None:
        self._monitor = monitor
        self._layer = np.asarray(tensor_layer)
        self._start = start
        self._seen = 0
        #: The batch number of a step, where the fit knows it (set by the fit).
        self.batch_of: Callable[[int], Any] = lambda step: None
        self._var = None
        #: The JAX backend: (the model, the optimizer whose apply is wrapped).
        self._jax = jax_fit
        size = (1 + RING + len(self._layer),)
        if jax_fit is not None:
            # Carried in the trainer's state like the recorder's matrix (see _jaxgraph).
            self._var = jax_fit[1].add_variable(size, initializer="zeros", dtype="float32",
                                                name="gradwatch_guard")
        elif traced:
            import tensorflow as tf

            self._var = tf.Variable(tf.zeros(size, tf.float32), trainable=False,
                                    name="gradwatch_guard")

    def remove(self) -> None:
        """The end of the fit: on JAX the variable leaves the optimizer."""
        if self._jax is not None:
            from ._jaxgraph import remove_variable

            remove_variable(self._jax[1], self._var)

    def apply(self, grads: dict[int, Any], run: Callable[[], Any], step: Any,
              tracing: bool, norms: Any = None) -> Any:
        """Runs ``run`` (the real update) unless a gradient in ``grads`` (dense, by variable
        position) is not finite; ``step`` is the step being taken (iterations + 1). Eager,
        ``norms`` (this step's per-variable gradient norms, already recorded) is read first:
        a non-finite gradient has a non-finite norm, so the gradients themselves are read only
        when one is (a float32 norm can also overflow on huge finite gradients)."""
        positions = sorted(grads)
        if not positions:
            return run()
        if not tracing and norms is not None:
            row = ops.take(norms, np.array(positions))
            if bool(ops.convert_to_numpy(ops.all(ops.isfinite(row)))):  # the step's one sync
                return run()
        flags = ops.stack([ops.all(ops.isfinite(grads[i])) for i in positions])
        if self._jax is not None:
            return self._stateless(flags, positions, run, step)
        if tracing:
            return self._traced(flags, positions, run, step)
        ok = ops.convert_to_numpy(flags).astype(bool)
        if ok.all():
            return run()
        self._tell(int(step) - self._start, [positions[k] for k in np.flatnonzero(~ok)])
        return None

    def _traced(self, flags: Any, positions: list[int], run: Callable[[], Any],
                step: Any) -> Any:
        import tensorflow as tf

        var, width = self._var, len(self._layer)

        def skip() -> None:
            old = var.read_value()
            count = old[0]
            slot = 1 + tf.cast(tf.math.floormod(count, RING), tf.int32)
            ring = tf.tensor_scatter_nd_update(old[:1 + RING], [[slot]],
                                               [tf.cast(step, tf.float32)])
            bad = tf.scatter_nd(np.array(positions, np.int32)[:, None],
                                1.0 - tf.cast(flags, tf.float32), (width,))
            var.assign(tf.concat([[count + 1.0], ring[1:], bad], 0))

        ops.cond(ops.all(flags), lambda: (run(), None)[1], skip)
        return None

    def _skip_record(self, old: Any, flags: Any, positions: list[int], step: Any) -> Any:
        """The guard variable's new value after skipping ``step``: the count, the step in the
        ring, the variables whose gradient was not finite (keras.ops: any backend)."""
        count = old[0]
        slot = 1 + ops.cast(ops.mod(count, RING), "int32")
        ring = ops.scatter_update(old[:1 + RING], [[slot]], ops.reshape(
            ops.cast(step, "float32"), (1,)))
        bad = ops.scatter(np.array(positions, np.int32)[:, None],
                          1.0 - ops.cast(flags, "float32"), (len(self._layer),))
        return ops.concatenate([ops.reshape(count + 1.0, (1,)), ring[1:], bad], 0)

    def _stateless(self, flags: Any, positions: list[int], run: Callable[[], Any],
                   step: Any) -> Any:
        """The JAX backend, inside the trainer's stateless scope: ``lax.cond`` whose branches
        return the new values of every variable the update may write (the update runs in a
        stateless scope of its own, as ``LossScaleOptimizer`` runs its inner optimizer), then
        those values are assigned in the trainer's scope."""
        import jax.numpy as jnp
        import keras

        from ._jaxgraph import cond

        inner = self._jax[1]
        variables = list(inner._trainable_variables) + list(inner.variables)
        values = [jnp.asarray(ops.convert_to_tensor(v)) for v in variables]
        k = next(i for i, v in enumerate(variables) if v is self._var)

        def update(values: list[Any]) -> list[Any]:
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                run()
            new = [scope.get_current_value(v) for v in variables]
            return [jnp.asarray(n, o.dtype) if n is not None else o for n, o in zip(new, values)]

        def skip(values: list[Any]) -> list[Any]:
            out = list(values)
            out[k] = jnp.asarray(self._skip_record(values[k], flags, positions, step))
            return out

        for v, value in zip(variables, cond(jnp.all(flags), update, skip, values)):
            v.assign(value)
        return None

    def poll(self) -> None:
        """At a batch end (traced; on JAX at a batch begin): tell the monitor of the steps
        skipped since the last poll."""
        if self._var is None:
            return
        if self._jax is not None:
            from ._jaxgraph import host_value

            host = host_value(self._jax[0], self._var)
        else:
            host = np.asarray(self._var.numpy(), dtype=float)
        count = int(host[0])
        if count <= self._seen:
            return
        ring, bad = host[1:1 + RING], np.flatnonzero(host[1 + RING:] > 0)
        for k in range(self._seen, count):
            if count - k > RING:  # older than the ring remembers: counted, step unknown
                self._monitor.step_skipped(-1, [])
                continue
            self._tell(int(ring[k % RING]) - self._start, bad.tolist())
        self._seen = count

    def _tell(self, step: int, variables: list[int]) -> None:
        layers = sorted({int(self._layer[i]) for i in variables})
        self._monitor.step_skipped(step, layers, batch_id=self.batch_of(step))
