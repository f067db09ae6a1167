"""The numbers measured inside the jitted update, with ``jax.numpy``: each step's per-leaf
squared gradient norms into a ring buffer of ``check_every`` steps, what a check step adds, and
the payload that leaves the device once per check. All of it lives in the transformation's
state (:class:`WatchState`), so it is carried, jitted and donated like any optax state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_F32 = jnp.float32


#: The rows of ``WatchState.check``: what the last check step measured of its gradients and
#: weights before the update, per leaf; read at the next step, with the weights after it.
#: max |g| and non-zero gradient elements (NaN on check steps that are not detail steps); g . W
#: and ||W||^2, W before the update (NaN without params); whether the step was a detail step.
CHECK_ROWS = ("grad_max", "grad_nonzero", "grad_dot", "weight_sq_before", "detail")


class WatchState(NamedTuple):
    """The watched transformation's state: the inner transformation's, and gradwatch's, in as
    few arrays as it can be (each array of a state that is not donated is copied by every
    step on XLA:CPU, a few microseconds each)."""

    #: The state of the transformation being watched.
    inner: Any
    #: Optimizer steps completed (int32).
    count: jax.Array
    #: Per step slot (slot = (step - 1) % W) ``[W, T + 2]``: the squared gradient L2 norm of
    #: each leaf, then the loss given as ``value=`` (NaN where none) and whether one was (1/0).
    ring: jax.Array
    #: ``[len(CHECK_ROWS), T]``: what the last check step measured before its update.
    check: jax.Array
    #: The sampled weights of every leaf, end to end: before the last check step's update
    #: (update ratio), and at ``init`` (the change since the start); empty with
    #: ``update_ratio="off"`` or without params.
    before: jax.Array
    start: jax.Array
    #: The activation sites' values at the last activation step (dead or saturated fraction;
    #: NaN where the site was not given), then that step bit-cast (0: none yet) ``[S + 1]``.
    acts: jax.Array
    #: Checks handed to the host through the FFI sink (``_sink``; int32): the sink's result,
    #: kept so that XLA cannot drop the call.
    sent: jax.Array


class Plan(NamedTuple):
    """What is measured, fixed when the watcher is made (static under jit)."""

    #: Leaves per pytree (T) and the ring's length (W = check_every).
    num_leaves: int
    window: int
    #: Steps between detail measurements (max |g|, non-zero counts).
    detail_every: int
    #: Per leaf, the stride of the update-ratio sample; ``None``: no update ratios.
    strides: tuple[int, ...] | None
    #: Indices of the inner state's leaves that are learning rates (inject_hyperparams).
    lr_leaves: tuple[int, ...]
    #: The activation sites (name, kind) ``update(activations=...)`` is given, and the steps
    #: between their samples (None: no sites).
    sites: tuple[tuple[str, str], ...] = ()
    activation_every: int | None = None


def _sample(x: jax.Array, stride: int) -> jax.Array:
    flat = jnp.reshape(x, (-1,))
    return flat if stride == 1 else flat[::stride]


def _sq(x: jax.Array) -> jax.Array:
    x = x.astype(_F32)
    return jnp.sum(x * x)


def _per_leaf(fn: Callable[..., jax.Array], *leaf_lists: Sequence[jax.Array]) -> jax.Array:
    """``fn`` of each leaf (or leaf tuple) stacked into one ``[T]`` float32 vector."""
    return jnp.stack([jnp.asarray(fn(*xs), _F32) for xs in zip(*leaf_lists)])


def _samples(plan: Plan, params: list[jax.Array], dtype: Any) -> jax.Array:
    """Every leaf's strided sample, end to end (the leaves' sizes are static: ``_sizes``)."""
    return jnp.concatenate([_sample(p, s).astype(dtype) for p, s in zip(params, plan.strides)])


def _sizes(plan: Plan, params: list[jax.Array]) -> list[int]:
    return [len(range(0, int(np.prod(np.shape(p), dtype=np.int64)), s))
            for p, s in zip(params, plan.strides)]


def _split(x: jax.Array, sizes: list[int]) -> list[jax.Array]:
    out, at = [], 0
    for n in sizes:
        out.append(x[at:at + n])
        at += n
    return out


def sample_dtype(params: list[jax.Array]) -> Any:
    """float32, or float64 where a leaf is (bfloat16 samples are exact in float32)."""
    return jnp.result_type(_F32, *(jnp.asarray(p).dtype for p in params))


def init_state(plan: Plan, inner: Any, params: list[jax.Array] | None) -> WatchState:
    T, W = plan.num_leaves, plan.window
    start = before = jnp.zeros((0,), _F32)
    if plan.strides is not None and params is not None:
        # (a copy: a sample of a single stride-1 leaf is a reshape that may share the weights'
        # buffer, and a step that donates both params and state would donate it twice)
        start = jnp.copy(_samples(plan, params, sample_dtype(params)))
        before = jnp.zeros_like(start)
    ring = jnp.zeros((W, T + 2), _F32).at[:, T].set(jnp.nan)
    check = jnp.full((len(CHECK_ROWS), T), jnp.nan, _F32).at[-1].set(0.0)
    acts = jnp.full((len(plan.sites) + 1,), jnp.nan, _F32).at[-1].set(
        lax.bitcast_convert_type(jnp.int32(0), _F32))
    return WatchState(inner=inner, count=jnp.zeros((), jnp.int32), ring=ring, check=check,
                      before=before, start=start, acts=acts, sent=jnp.zeros((), jnp.int32))


def activation_value(kind: str, y: jax.Array, saturation: float) -> jax.Array:
    """Dead fraction of a ReLU's units (a unit is dead when its output is 0 for the whole batch;
    units are the last axis), or the saturated fraction of a sigmoid's or tanh's outputs."""
    y = jnp.asarray(y).astype(_F32)
    if kind == "relu":
        alive = jnp.sum(jnp.reshape(jnp.maximum(y, 0), (-1, y.shape[-1])), axis=0) > 0
        return 1 - jnp.mean(alive.astype(_F32))
    if kind == "sigmoid":
        return jnp.mean((y * (1 - y) < 0.25 * saturation).astype(_F32))
    return jnp.mean((1 - y * y < saturation).astype(_F32))


def sample_activations(plan: Plan, state: WatchState, activations: dict[str, Any],
                       count: jax.Array, saturation: float) -> WatchState:
    """On activation steps (``count`` = the step completing now), the sites' values."""
    if not plan.sites or plan.activation_every is None:
        return state

    def sample(_: Any) -> jax.Array:
        values = [activation_value(kind, activations[name], saturation) if name in activations
                  else jnp.float32(jnp.nan) for name, kind in plan.sites]
        step = lax.bitcast_convert_type(count.astype(jnp.int32), _F32)
        return jnp.stack([*values, step])

    acts = lax.cond(count % plan.activation_every == 0, sample, lambda _: state.acts, None)
    return state._replace(acts=acts)


def record(plan: Plan, state: WatchState, grads: list[jax.Array],
           value: Any) -> WatchState:
    """This step's squared gradient norms and loss, into its ring slot (one row)."""
    slot = state.count % plan.window
    if value is None:
        tail = [jnp.float32(jnp.nan), jnp.float32(0.0)]
    else:
        tail = [jnp.reshape(jnp.asarray(value), ()).astype(_F32), jnp.float32(1.0)]
    # (behind an optimization barrier: else XLA merges g * g with the optimizer's own g ** 2
    # (adam's second moment), materializes it for both and breaks the optimizer's fusion)
    seen = lax.optimization_barrier(tuple(grads))
    row = jnp.stack([*(jnp.asarray(_sq(g), _F32) for g in seen), *tail])
    ring = lax.dynamic_update_slice(state.ring, row[None, :], (slot, jnp.zeros_like(slot)))
    return state._replace(ring=ring)


def _measure(plan: Plan, state: WatchState, grads: list[jax.Array],
             params: list[jax.Array] | None, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """What a check step's gradients and weights before its update show: the new
    ``(check, before)``."""
    T = plan.num_leaves
    nan = jnp.full((T,), jnp.nan, _F32)
    detail = count % plan.detail_every == 0
    sampled = plan.strides is not None and params is not None and state.start.shape[0] > 0

    def details(_: Any) -> tuple[jax.Array, jax.Array]:
        return (_per_leaf(lambda g: jnp.max(jnp.abs(g.astype(_F32))), grads),
                _per_leaf(jnp.count_nonzero, grads))

    gmax, nnz = lax.cond(detail, details, lambda _: (nan, nan), None)
    flag = jnp.broadcast_to(detail.astype(_F32), (T,))
    if params is None:
        return jnp.stack([gmax, nnz, nan, nan, flag]), state.before
    dot = _per_leaf(lambda g, p: jnp.vdot(g.astype(_F32), p.astype(_F32)), grads, params)
    before = _samples(plan, params, state.before.dtype) if sampled else state.before
    return jnp.stack([gmax, nnz, dot, _per_leaf(_sq, params), flag]), before


def checks(plan: Plan, committed: WatchState, state: WatchState, grads: list[jax.Array],
           params: list[jax.Array] | None, count: jax.Array,
           send: Callable[[dict[str, Any]], jax.Array | None] | None) -> WatchState:
    """The two things check steps add, in one ``lax.switch`` a step (each conditional costs
    every step on XLA:CPU, taken or not):

    - on a check step (``count``, the step completing now, a multiple of the window): what its
      gradients and its weights before the update show, into ``check`` and ``before``;
    - on the step after one, when ``send`` is given: the check's payload, from ``committed``
      (the state that step returned, before this step recorded anything) and the weights
      after its update (``params``, as this step receives them), to ``send``: the FFI sink
      (whose int32 result is kept in ``sent``, so that XLA keeps the call) or a
      ``jax.debug.callback`` (which returns None).

    Only committed state is sent: a wrapper that throws a step's state away
    (``optax.MultiSteps``, which runs the update on every micro-batch and keeps it on the last;
    ``optax.apply_if_finite``) throws its measurements away with it."""
    window = plan.window
    is_check = count % window == 0
    due = (committed.count > 0) & (committed.count % window == 0) if send else False

    def emit() -> jax.Array:
        got = send(payload(plan, committed, params))
        return committed.sent + got if got is not None else committed.sent

    def nothing(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        return state.check, state.before, state.sent

    def measure(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        return (*_measure(plan, state, grads, params, count), state.sent)

    if send is None:
        check, before, sent = lax.cond(is_check, measure, nothing, None)
    else:
        def emit_only(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
            return state.check, state.before, emit()

        def both(_: Any) -> tuple[jax.Array, jax.Array, jax.Array]:  # check_every=1
            sent = emit()
            return (*_measure(plan, state, grads, params, count), sent)

        index = due.astype(jnp.int32) + 2 * is_check.astype(jnp.int32)
        check, before, sent = lax.switch(index, (nothing, emit_only, measure, both), None)
    return state._replace(check=check, before=before, sent=sent)


def payload(plan: Plan, state: WatchState, params: list[jax.Array] | None) -> dict[str, Any]:
    """Everything one check hands the host, computed from the committed state of a check step
    and the weights after its update (``params``, as the next step receives them)."""
    T = plan.num_leaves
    out: dict[str, Any] = {"count": state.count, "grad_sq": state.ring[:, :T],
                           "loss": state.ring[:, T], "has_loss": state.ring[:, T + 1] > 0.5,
                           **{name: state.check[i] for i, name in enumerate(CHECK_ROWS)},
                           "acts": state.acts[:-1],
                           "acts_step": lax.bitcast_convert_type(state.acts[-1], jnp.int32)}
    out["detail"] = state.check[-1, 0] > 0.5
    if params is not None:
        out["weight_sq"] = _per_leaf(_sq, params)
        if plan.strides is not None and state.start.shape[0] > 0:
            sizes = _sizes(plan, params)
            now = [_sample(p, s) for p, s in zip(params, plan.strides)]
            before, start = _split(state.before, sizes), _split(state.start, sizes)
            diff = lambda a, b: _sq(a.astype(_F32) - b.astype(_F32))  # noqa: E731
            out["update_sq"] = _per_leaf(diff, now, before)
            out["update_base_sq"] = _per_leaf(_sq, before)
            out["change_sq"] = _per_leaf(diff, now, start)
            out["change_base_sq"] = _per_leaf(_sq, start)
    if plan.lr_leaves:
        leaves = jax.tree_util.tree_leaves(state.inner)
        out["lr"] = jnp.stack([jnp.reshape(leaves[i], ()).astype(_F32)
                               for i in plan.lr_leaves])
    return out


#: How a packed vector unpacks: (header length, ((key, shape, kind), ...)).
Layout = tuple[int, tuple[tuple[str, tuple[int, ...], str], ...]]


def pack(payload: dict[str, Any], header: Sequence[int]) -> tuple[jax.Array, Layout]:
    """The payload as one float32 vector (``header``'s ints first, then each entry flattened
    in key order; ints are bit-cast, so counts stay exact) and the layout that unpacks it."""
    parts = [lax.bitcast_convert_type(jnp.asarray(header, jnp.int32), _F32)]
    layout = []
    for key in sorted(payload):
        x = jnp.asarray(payload[key])
        kind = "i" if x.dtype.kind in "iu" else "b" if x.dtype.kind == "b" else "f"
        flat = jnp.reshape(x, (-1,))
        if kind == "i":
            flat = lax.bitcast_convert_type(flat.astype(jnp.int32), _F32)
        parts.append(flat.astype(_F32))
        layout.append((key, tuple(x.shape), kind))
    return jnp.concatenate(parts), (len(header), tuple(layout))


def unpack(vector: Any, layout: Layout) -> dict[str, Any]:
    """The host side of :func:`pack`: numpy arrays, ints and bools as they were."""
    at, entries = layout
    out: dict[str, Any] = {}
    for key, shape, kind in entries:
        n = int(np.prod(shape, dtype=np.int64))
        flat = vector[at:at + n]
        at += n
        if kind == "i":
            flat = flat.view(np.int32)
        elif kind == "b":
            flat = flat != 0
        out[key] = flat.reshape(shape)
    return out
