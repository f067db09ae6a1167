"""Graph mode (tf.function, with or without XLA): per-step numbers written into one state variable.

A step writes one row of a ring buffer (one scatter op); check-step work sits under a
``tf.cond`` on the optimizer's iteration counter, one before the update (max |g|, g . W, the
weights' norms, the weight sample the update is measured against, activations) and one after it
(weight norms, update and change sizes). The host reads the whole variable once per check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from keras import ops

from ._activations import Probe, activation_value
from ._ops import cond, f32, norm32, norms32, tf_dot
from ._plan import StepPlan


def current_graph() -> Any:
    import tensorflow as tf

    return tf.compat.v1.get_default_graph()


def reachable(t: Any) -> bool:
    """A tensor recorded earlier in this trace (the loss, an activation) can be used here: it
    belongs to the graph being built or to one it is nested in (a cond branch, a loop body)."""
    graph = getattr(t, "graph", None)
    g = current_graph()
    while g is not None:
        if graph is g:
            return True
        g = getattr(g, "outer_graph", None)
    return False


class GraphRead(NamedTuple):
    """One read of the state variable, in host memory, by block."""

    #: The ring buffer ``[window, V + 2]``: gradient L2 norms, loss, step id.
    rows: np.ndarray
    #: Max |g|, g . W and ||W|| (before the update) per variable ``[3 V]``.
    grads: np.ndarray
    #: L2 norms: weights, sampled update, sampled update base, sampled change; then the
    #: step id ``[4 V + 1]``.
    weights: np.ndarray
    #: One value per activation site, then the step id ``[sites + 1]``.
    acts: np.ndarray


class StateLayout:
    """Where each number sits in the one state matrix a traced step writes: ``K = V + 2`` wide
    (V watched variables), the ring buffer's ``window`` rows, then the blocks of
    :class:`GraphRead` laid out row by row. One matrix, so that a check's read is one op and
    one device-to-host copy."""

    def __init__(self, window: int, n_vars: int, n_sites: int) -> None:
        self.window, self.width = window, n_vars + 2
        self.blocks: dict[str, tuple[int, int]] = {}  # name -> (first row, length)
        rows = window
        for name, size in (("grads", 3 * n_vars), ("weights", 4 * n_vars + 1),
                           ("acts", n_sites + 1)):
            self.blocks[name] = (rows, size)
            rows += -(-size // self.width)
        #: Rows of the matrix.
        self.rows = rows

    def block_rows(self, name: str, values: Any, concat: Callable[[list[Any]], Any],
                   zeros: Callable[[int], Any], reshape: Callable[[Any, tuple], Any]
                   ) -> tuple[int, Any]:
        """``values`` of block ``name`` as whole rows: (first row, ``[rows, K]`` values)."""
        first, size = self.blocks[name]
        rows = -(-size // self.width)
        pad = rows * self.width - size
        if pad:
            values = concat([values, zeros(pad)])
        return first, reshape(values, (rows, self.width))

    def split(self, host: np.ndarray) -> GraphRead:
        """One host copy of the matrix, by block."""

        def block(name: str) -> np.ndarray:
            first, size = self.blocks[name]
            return host[first:].reshape(-1)[:size]

        return GraphRead(host[:self.window], block("grads"), block("weights"), block("acts"))


class GraphState(StateLayout):
    """The one TensorFlow variable graph mode writes (a :class:`StateLayout` matrix), read
    whole once per check.

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

        super().__init__(window, n_vars, n_sites)
        kwargs: dict[str, Any] = {}
        if replicas > 1:
            kwargs = {"synchronization": tf.VariableSynchronization.ON_READ,
                      "aggregation": tf.VariableAggregation.SUM}
        with strategy.scope():
            self.var = tf.Variable(tf.zeros((self.rows, self.width), tf.float32),
                                   trainable=False, name="gradwatch_state", **kwargs)
        self.local = (tuple(strategy.experimental_local_results(self.var)) if replicas > 1
                      else (self.var,))

    def write_row(self, rid: int, slot: Any, row: Any) -> None:
        import tensorflow as tf

        tf.raw_ops.ResourceScatterUpdate(resource=self.local[rid].handle, indices=slot,
                                         updates=row)

    def write(self, name: str, rid: int, values: Any) -> None:
        import tensorflow as tf

        first, rows = self.block_rows(name, values, lambda p: tf.concat(p, 0),
                                      lambda n: tf.zeros((n,)), tf.reshape)
        tf.raw_ops.ResourceScatterUpdate(
            resource=self.local[rid].handle, indices=np.arange(first, first + rows.shape[0]),
            updates=rows)

    def read(self) -> GraphRead:
        """Everything, summed over replicas: one read, one device-to-host copy."""
        return self.split(np.asarray(self.var.value(), dtype=float))

    def nbytes(self) -> int:
        return 4 * int(np.prod(self.var.shape))


class Pending(NamedTuple):
    """What the first replica's wrapped ``apply`` hands from before the update to after it."""

    #: The step being taken (a tensor: iterations + 1).
    step: Any
    #: Whether it is a check step (a boolean tensor); None when every step is.
    is_check: Any
    #: The weight samples before the update, concatenated (None: update ratios are off), and
    #: the length of each (split after the update, inside its cond).
    snapshot: Any
    sizes: list[int]


class GraphRecorder:
    """Writes the steps of a traced train function into a :class:`GraphState`.

    Args:
        state: The state variable.
        plan: The fit's recording plan.
        iterations: The optimizer's counter of ``apply`` calls (a variable; read as
            ``iterations + 1``).
    """

    def __init__(self, state: GraphState, plan: StepPlan, iterations: Any) -> None:
        self.state = state
        self._plan = plan
        self._vars, self._samples, self._activations = (plan.variables, plan.samples,
                                                        plan.activations)
        self._iterations = iterations
        self._every = plan.monitor.check_every
        self._act_every = plan.monitor.activation_every
        #: What the trace learnt: which variables get a gradient, whether a loss was seen.
        self.present = np.zeros(len(plan.variables), dtype=bool)
        self.has_loss = False
        #: Losses of the step being traced, by replica (under a LossScaleOptimizer,
        #: tf.distribute calls apply from other threads than the forward pass's).
        self.losses: dict[int, Any] = {}

    def before(self, grads: dict[int, Any] | None, rows: dict[int, Any] | None = None,
               rid: int = 0) -> Pending | None:
        """Writes this step's row; on check steps also max |g|, g . W (the weights not yet
        updated) and the activations, and takes the weight samples the update ratio compares
        against after the update. ``grads`` (by variable position) is None on replicas other
        than the first: they write only their loss and activations. ``rows``: the variable rows
        of sparse gradients."""
        import tensorflow as tf

        with tf.name_scope("gradwatch"):  # named in TensorBoard graphs and profiles
            return self._before(grads, rows or {}, rid)

    def _before(self, grads: dict[int, Any] | None, rows: dict[int, Any],
                rid: int) -> Pending | None:
        import tensorflow as tf

        if grads is not None and not grads:
            return None
        state, V = self.state, len(self._vars)
        it = ops.convert_to_tensor(self._iterations)
        step = it + 1
        zero = tf.constant(0.0)
        nan = tf.constant(np.nan, tf.float32)
        if grads is not None:
            self.present = np.isin(np.arange(V), list(grads))
            idx = [i for i in range(V) if i in grads]
            norms = norms32([grads[i] for i in idx])
            if len(idx) < V:  # NaN for a variable without a gradient this step
                norms = tf.tensor_scatter_nd_update(tf.fill((V,), nan),
                                                    np.array(idx, np.int32)[:, None], norms)
        else:
            norms = tf.zeros((V,), tf.float32)
        loss = self.losses.pop(rid, None)
        if loss is not None and reachable(loss):
            self.has_loss = True
            tail = [f32(loss) if not len(loss.shape) else tf.reduce_mean(f32(loss))]
        else:
            tail = [nan]
        tail.append(tf.cast(step, tf.float32) if grads is not None else zero)
        state.write_row(rid, tf.math.floormod(it, state.window),
                        tf.concat([norms, tf.stack(tail)], 0))

        acts = {i: yp for i, yp in self._activations.take_traced(rid).items()
                if reachable(yp[0])}
        snapshot = grads is not None and self._samples.enabled
        sizes = self._samples.sizes if snapshot else []

        def check_work() -> Any:
            if grads is not None:
                gmax = [tf.reduce_max(tf.abs(f32(grads[i]))) if i in grads else nan
                        for i in range(V)]
                dots = [tf_dot(grads[i], self._vars[i], rows.get(i)) if i in grads else nan
                        for i in range(V)]
                wsq = [norm32(w) for w in self._vars]  # (not yet updated)
                state.write("grads", rid, tf.stack(gmax + dots + wsq))
            if acts:
                self._gated(step, self._act_every, lambda: self._write_acts(acts, step, rid))
            if snapshot:
                return tf.concat(self._samples.take(self._vars), 0)
            return zero

        def idle() -> Any:
            return tf.zeros((sum(sizes),)) if snapshot else zero

        if grads is None and not acts:
            return None
        is_check = self._is_due(step, self._every)
        out = check_work() if is_check is None else cond(is_check, check_work, idle)
        if grads is None:
            return None
        return Pending(step, is_check, out if snapshot else None, sizes)

    def after(self, pending: Pending) -> None:
        """After the update, on check steps: weight norms, update and change sizes."""
        import tensorflow as tf

        def weight_work() -> Any:
            before = (tf.split(pending.snapshot, pending.sizes)
                      if pending.snapshot is not None else None)
            self.state.write("weights", 0, self._weight_stats(before, pending.step))
            return tf.constant(0.0)

        with tf.name_scope("gradwatch"):
            if pending.is_check is None:
                weight_work()
            else:
                cond(pending.is_check, weight_work, lambda: tf.constant(0.0))

    def _is_due(self, step: Any, every: int) -> Any:
        """Whether ``step`` (a tensor) is due for work done every ``every`` steps of this fit;
        None when every step is."""
        import tensorflow as tf

        if every == 1:
            return None
        return tf.equal(tf.math.floormod(step - self._plan.start, every), 0)

    def _gated(self, step: Any, every: int | None, fn: Callable[[], None]) -> None:
        import tensorflow as tf

        if every is None:
            return
        due = self._is_due(step, every)
        if due is None or every == self._every:
            fn()  # (called inside the check step's cond already)
            return

        def work() -> Any:
            fn()
            return tf.constant(0.0)

        cond(due, work, lambda: tf.constant(0.0))

    def _write_acts(self, acts: dict[int, tuple[Any, Probe]], step: Any, rid: int) -> None:
        import tensorflow as tf

        nan = tf.constant(np.nan, tf.float32)
        values = [activation_value(*acts[i]) if i in acts else nan
                  for i in range(len(self._activations.sites))]
        stamp = tf.cast(step, tf.float32) if rid == 0 else tf.constant(0.0)
        self.state.write("acts", rid, tf.stack(values + [stamp]))

    def _weight_stats(self, before: list[Any] | None, step: Any) -> Any:
        """L2 norms per variable: weights, sampled update, sampled change since the
        start; then the step id."""
        import tensorflow as tf

        ws = [ops.convert_to_tensor(w) for w in self._vars]
        parts = [tf.stack([norm32(w) for w in ws])]
        if before is not None:
            now = self._samples.take(ws)
            parts += [tf.stack([norm32(a - b) for a, b in zip(now, before)]),
                      tf.stack([norm32(b) for b in before]),
                      tf.stack([norm32(a - b) for a, b in zip(now, self._samples.start)])]
        else:
            parts.append(tf.fill((3 * len(ws),), np.float32(np.nan)))
        return tf.concat(parts + [tf.reshape(tf.cast(step, tf.float32), (1,))], 0)
