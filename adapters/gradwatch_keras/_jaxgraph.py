"""The JAX backend: per-step numbers carried in the state the JAX trainer returns.

Keras' JAX trainer applies the optimizer statelessly (``optimizer.stateless_apply`` inside the
jitted ``train_step``): a variable written from the wrapped ``apply`` keeps its new value only
if it is one of the optimizer's variables, which the trainer hands in and takes back with every
step. So the :class:`~._graph.StateLayout` matrix is an optimizer variable for the duration of the
fit (:class:`JaxState`), written functionally: each step sets its ring-buffer row; check-step work
sits in a ``lax.cond`` whose branches return the new matrix. The batch loss and the activations
never leave ``jax.value_and_grad`` as values (``scale_loss`` and the activation wrappers see
tracers of it), so a wrapped ``train_step`` (:class:`StepWrap`) writes them after the step: the
loss from the change of Keras' own loss tracker (its total and count move by loss x batch size
and batch size), the activations from one more forward pass on activation steps. The host reads the matrix from the state the
trainer keeps between steps, once per check, before the next step donates it
(:meth:`JaxState.read`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from keras import ops

from ._graph import GraphRead, Pending, StateLayout
from ._ops import F32_MAX
from ._plan import StepPlan


def _jnp() -> Any:
    import jax.numpy as jnp

    return jnp


def cond(pred: Any, true_fn: Any, false_fn: Any, *operands: Any) -> Any:
    """``lax.cond``, except where ``pred`` is a concrete value (``run_eagerly=True``): there the
    branch is picked on the host and run op by op. An eager ``lax.cond`` traces and compiles
    both branches, and its branches are new closures every step, so it compiled anew every
    time (0.3 s, several a step: a 16-step eager epoch of a 10-layer MLP took 56 s against
    2.3 s unwatched)."""
    import jax
    from jax import lax

    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, true_fn, false_fn, *operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


def _scaled_norm(x: Any) -> Any:
    """The L2 norm of a float32 ``x`` without overflow: ``m * sqrt(sum((x / m)^2))``, m = max
    |x|; a finite norm beyond float32 as F32_MAX; NaN/Inf entries give NaN/Inf."""
    jnp = _jnp()
    m = jnp.max(jnp.abs(x)) if x.size else jnp.float32(0)
    ok = jnp.isfinite(m) & (m > 0)
    safe = jnp.where(ok, m, 1)
    root = jnp.sqrt(jnp.sum(jnp.square(x / safe)))
    return jnp.where(ok, jnp.where(m > F32_MAX / root, F32_MAX, m * root),
                     jnp.sqrt(jnp.sum(x * x)))


def _norms(tensors: list[Any]) -> Any:
    """The L2 norm of each tensor, one float32 vector, at float32 cost: JAX without x64 sums in
    float32, which overflows from a norm of ~1.8e19 on; only when a sum is not finite (it
    overflowed, or an entry is NaN/Inf) the scaled norm of each, in the untaken-by-default
    branch of one ``lax.cond``."""
    jnp = _jnp()
    xs = [jnp.asarray(t).astype(jnp.float32) for t in tensors]
    sq = jnp.stack([jnp.sum(x * x) for x in xs])
    return cond(jnp.all(jnp.isfinite(sq)), lambda: jnp.sqrt(sq),
                    lambda: jnp.stack([_scaled_norm(x) for x in xs]))


def host_value(model: Any, var: Any) -> np.ndarray:
    """The value of the optimizer variable ``var`` after the last step, on the host (one copy):
    from the trainer's state while the variables are purged (between steps; call it before the
    next step, which donates that state), from the variable once Keras synced it."""
    state = getattr(model, "_jax_state", None)
    if state and not getattr(model, "_jax_state_synced", True):
        index = [id(v) for v in model.optimizer.variables].index(id(var))
        value = state["optimizer_variables"][index]
    else:
        value = var.value
    return np.asarray(value, dtype=float)


def remove_variable(optimizer: Any, var: Any) -> None:
    """Takes ``var`` out of ``optimizer`` (``model.save`` afterwards saves the optimizer the
    user made). The trainer syncs the state before ``on_train_end``; gradwatch's variables were
    added last, so a later sync's ``zip`` only drops them."""
    if any(v is var for v in optimizer.variables):
        optimizer._untrack_variable(var)


class JaxState(StateLayout):
    """The state matrix as an optimizer variable while the fit runs.

    Args:
        model: The model being fit (its trainer keeps the state between steps).
        inner: The optimizer whose ``apply`` is wrapped (under a ``LossScaleOptimizer`` its
            inner optimizer, whose variables the outer one hands in and takes back).
        window, n_vars, n_sites: The :class:`StateLayout`.
    """

    def __init__(self, model: Any, inner: Any, window: int, n_vars: int, n_sites: int) -> None:
        super().__init__(window, n_vars, n_sites)
        self._model = model
        self._optimizer = inner
        self.var = inner.add_variable((self.rows, self.width), initializer="zeros",
                                      dtype="float32", name="gradwatch_state")

    def index(self) -> int:
        """The variable's place among the model optimizer's variables (the trainer's state is
        in that order)."""
        return [id(v) for v in self._model.optimizer.variables].index(id(self.var))

    def read(self) -> GraphRead:
        """The matrix of the last step, one device-to-host copy."""
        return self.split(host_value(self._model, self.var))

    def remove(self) -> None:
        remove_variable(self._optimizer, self.var)

    def nbytes(self) -> int:
        return 4 * self.rows * self.width


class JaxRecorder:
    """Writes the steps of the JAX train step into a :class:`JaxState`.

    Args:
        state: The state variable.
        plan: The fit's recording plan.
        iterations: The optimizer's counter of ``apply`` calls.
    """

    def __init__(self, state: JaxState, plan: StepPlan, iterations: Any) -> None:
        self.state = state
        self._plan = plan
        self._vars, self._samples = plan.variables, plan.samples
        self._iterations = iterations
        self._every = plan.monitor.check_every
        #: The run's monitor, and the optimizer's iterations when the fit began.
        self.monitor, self.start = plan.monitor, plan.start
        #: What the trace learnt: which variables get a gradient, whether a loss was seen.
        self.present = np.zeros(len(plan.variables), dtype=bool)
        self.has_loss = False

    def write(self, value: Any, name: str, values: Any) -> Any:
        """``value`` (the matrix) with block ``name`` set to ``values``."""
        jnp = _jnp()
        first, rows = self.state.block_rows(name, values, jnp.concatenate, jnp.zeros,
                                            jnp.reshape)
        return value.at[first:first + rows.shape[0]].set(rows)

    def before(self, grads: dict[int, Any], rows: dict[int, Any] | None = None) -> Pending | None:
        """Inside the wrapped ``apply`` (the trainer's stateless scope: variables read as this
        step's values, and assigned values are kept): this step's row, and on check steps max
        |g|, g . W, the weights' norms and the sample the update is compared against."""
        from jax import lax

        jnp = _jnp()
        if not grads:
            return None
        V = len(self._vars)
        state = self.state
        self.present = np.isin(np.arange(V), list(grads))
        it = jnp.asarray(ops.convert_to_tensor(self._iterations))
        step = it + 1
        nan = jnp.float32(np.nan)
        idx = [i for i in range(V) if i in grads]
        norms = jnp.full((V,), nan).at[np.array(idx)].set(_norms([grads[i] for i in idx]))
        row = jnp.concatenate([norms, jnp.stack([nan, step.astype(jnp.float32)])])
        value = jnp.asarray(state.var.value)
        value = lax.dynamic_update_slice(value, row[None, :],
                                         (jnp.mod(it, state.window).astype(jnp.int32), 0))
        sizes = self._samples.sizes if self._samples.enabled else []
        weights = [jnp.asarray(ops.convert_to_tensor(w)) for w in self._vars]

        def check_work(value: Any) -> tuple[Any, Any]:
            f32 = jnp.float32
            gmax = [jnp.max(jnp.abs(grads[i].astype(f32))) if i in grads else nan
                    for i in range(V)]
            dots = [jnp.vdot(grads[i].astype(f32), weights[i].astype(f32)) if i in grads
                    else nan for i in range(V)]
            wsq = _norms(weights)  # (not yet updated)
            value = self.write(value, "grads", jnp.concatenate([jnp.stack(gmax + dots), wsq]))
            snap = (jnp.concatenate([jnp.asarray(s) for s in self._samples.take(weights)])
                    if sizes else jnp.zeros((0,), f32))
            return value, snap

        def idle(value: Any) -> tuple[Any, Any]:
            return value, jnp.zeros((sum(sizes),), jnp.float32)

        is_check = jnp.equal(jnp.mod(step - self._plan.start, self._every), 0)
        value, snapshot = cond(is_check, check_work, idle, value)
        state.var.assign(value)
        return Pending(step, is_check, snapshot if sizes else None, sizes)

    def after(self, pending: Pending) -> None:
        """After the update, on check steps: weight norms, update and change sizes."""
        jnp = _jnp()

        def weight_work(value: Any) -> Any:
            ws = [jnp.asarray(ops.convert_to_tensor(w)) for w in self._vars]
            parts = [_norms(ws)]
            if pending.snapshot is not None:
                cuts = np.cumsum(pending.sizes)[:-1].tolist()
                before = jnp.split(pending.snapshot, cuts) if cuts else [pending.snapshot]
                now = [jnp.asarray(s) for s in self._samples.take(ws)]
                start = [jnp.asarray(s) for s in self._samples.start]
                parts += [_norms([a - b for a, b in zip(now, before)]), _norms(before),
                          _norms([a - b for a, b in zip(now, start)])]
            else:
                parts.append(jnp.full((3 * len(ws),), np.nan, jnp.float32))
            parts.append(jnp.reshape(pending.step.astype(jnp.float32), (1,)))
            return self.write(value, "weights", jnp.concatenate(parts))

        value = jnp.asarray(self.state.var.value)
        self.state.var.assign(cond(pending.is_check, weight_work, lambda v: v, value))


class StepWrap:
    """The wrapped ``train_step`` of the JAX trainer. After each step it writes into the state
    matrix what the optimizer cannot see:

    * the batch loss, into the loss column of the step's row, from the change of Keras' loss
      tracker (a custom ``train_step`` that leaves the tracker alone: no loss, said once);
    * on activation steps, the activation sites' values, from the outputs of one more
      training-mode forward pass at the step's weights and batch (``lax.cond``: other steps
      pay nothing; its randomness is the step's own, from the same seed state), because the
      step's own forward pass runs inside ``jax.value_and_grad``.

    Args:
        model: The model being fit.
        recorder: The fit's recorder (its state, and ``has_loss``).
        counter: The optimizer's counter of ``apply`` calls (a variable).
        activations: The fit's activation sampler.
    """

    def __init__(self, model: Any, recorder: JaxRecorder, counter: Any,
                 activations: Any) -> None:
        self._model = model
        self._recorder = recorder
        self._counter = counter
        self._activations = activations
        tracker = getattr(model, "_loss_tracker", None)
        self._tracker = list(tracker.variables) if tracker is not None else []
        #: The unscaled loss of the step being traced, as Keras' train_step hands it on.
        self._loss: Any = None

    def _positions(self) -> tuple[int, int, list[int]] | None:
        model = self._model
        opt = [id(v) for v in model.optimizer.variables]
        metrics = [id(v) for v in model.metrics_variables]
        try:
            return (opt.index(id(self._counter)), self._recorder.state.index(),
                    [metrics.index(id(v)) for v in self._tracker])
        except ValueError:
            return None

    def install(self) -> None:
        """Wraps the model's ``train_step`` and, where Keras' JAX trainer has it,
        ``_update_metrics_variables`` (which Keras' own train_step calls, after the update,
        with the batch's unscaled loss as a value of the step's trace)."""
        model = self._model
        train_step = model.train_step
        update_metrics = getattr(model, "_update_metrics_variables", None)

        def wrapped(state: Any, data: Any) -> Any:
            self._loss = None
            logs, new = train_step(state, data)
            return logs, self.write(state, new, data)

        def metrics(metrics_variables: Any, unscaled_loss: Any, *args: Any, **kwargs: Any
                    ) -> Any:
            self._loss = unscaled_loss
            return update_metrics(metrics_variables, unscaled_loss, *args, **kwargs)

        model.train_step = wrapped
        if callable(update_metrics):
            model._update_metrics_variables = metrics

    def uninstall(self) -> None:
        for name in ("train_step", "_update_metrics_variables"):
            vars(self._model).pop(name, None)  # the class's own shows through again

    def write(self, old: Any, new: Any, data: Any) -> Any:
        jnp = _jnp()
        where = self._positions()
        if where is None or len(new) != 4 or len(old) != 4:
            return new
        k_it, k_state, tracker = where
        tv, ntv, opt, metrics = new
        opt = list(opt)
        value = opt[k_state]
        step = jnp.asarray(opt[k_it])
        loss, self._loss = self._loss, None
        if loss is None and len(tracker) == 2 and metrics[tracker[1]] is not old[3][tracker[1]]:
            # (a train_step of its own that updates the loss tracker: the change over the step;
            # a NaN loss poisons the tracker's total for the rest of the epoch)
            k_total, k_count = tracker
            total = metrics[k_total] - old[3][k_total]
            count = metrics[k_count] - old[3][k_count]
            loss = jnp.where(count > 0, total / jnp.where(count > 0, count, 1), jnp.nan)
        if loss is not None:
            loss = jnp.mean(jnp.asarray(loss))
            slot = jnp.mod(step - 1, self._recorder.state.window)
            # A step the optimizer did not take (the guard's, a loss scaler's) has no row.
            taken = step > jnp.asarray(old[2][k_it])
            column = self._recorder.state.width - 2  # (the loss column)
            value = value.at[slot, column].set(
                jnp.where(taken, loss.astype(jnp.float32), value[slot, column]))
            self._recorder.has_loss = True
        opt[k_state] = self._sample(old, data, step, value)
        return tv, ntv, opt, metrics

    def _sample(self, old: Any, data: Any, step: Any, value: Any) -> Any:
        import keras

        from ._activations import activation_value

        jnp = _jnp()
        sampler = self._activations
        every = self._recorder.monitor.activation_every
        S = len(sampler.sites)
        if every is None or not S:
            return value

        def sample(value: Any) -> Any:
            x = keras.utils.unpack_x_y_sample_weight(data)[0]
            sampler.traced.clear()
            self._model.stateless_call(old[0], old[1], x, training=True)
            acts = sampler.take_traced(0)
            nan = jnp.float32(np.nan)
            values = [jnp.asarray(activation_value(*acts[i]), jnp.float32) if i in acts else nan
                      for i in range(S)]
            return self._recorder.write(value, "acts",
                                        jnp.stack(values + [step.astype(jnp.float32)]))

        due = jnp.equal(jnp.mod(step - self._recorder.start, every), 0)
        return cond(due, sample, lambda v: v, value)
