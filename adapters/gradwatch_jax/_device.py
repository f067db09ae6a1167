"""The numbers measured inside the jitted update, with ``jax.numpy``: each step's per-leaf
squared gradient norms into a ring buffer of ``check_every`` steps, what a check step adds, and
the payload that leaves the device once per check. All of it lives in the transformation's
state (:class:`WatchState`), so it is carried, jitted and donated like any optax state."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


class CheckStash(NamedTuple):
    """What the last check step measured of its gradients and weights before the update, per
    leaf ``[T]``; read at the next step, with the weights after the update."""

    #: max |g| and non-zero gradient elements (NaN on check steps that are not detail steps).
    grad_max: jax.Array
    grad_nonzero: jax.Array
    #: g . W and ||W||^2, W before the update (NaN without params).
    grad_dot: jax.Array
    weight_sq_before: jax.Array
    #: Whether ``grad_max`` / ``grad_nonzero`` were measured at that step (a detail step).
    detail: jax.Array


class WatchState(NamedTuple):
    """The watched transformation's state: the inner transformation's, and gradwatch's."""

    #: The state of the transformation being watched.
    inner: Any
    #: Optimizer steps completed (int32).
    count: jax.Array
    #: Squared gradient L2 norm per step slot and leaf ``[W, T]`` (slot = (step - 1) % W).
    grad_sq: jax.Array
    #: The loss given as ``value=`` per slot ``[W]`` (NaN where none), and whether one was.
    loss: jax.Array
    has_loss: jax.Array
    #: What the last check step measured before its update.
    check: CheckStash
    #: Per leaf: the sampled weights before the last check step's update (update ratio), and
    #: at ``init`` (weight change since the start); ``()`` with ``update_ratio="off"``.
    before: tuple[jax.Array, ...]
    start: tuple[jax.Array, ...]
    #: The activation sites' values at the last activation step ``[S]`` (dead or saturated
    #: fraction; NaN where the site was not given), and that step (0: none yet).
    acts: jax.Array
    acts_step: jax.Array


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


def init_state(plan: Plan, inner: Any, params: list[jax.Array] | None) -> WatchState:
    T, W = plan.num_leaves, plan.window
    start: tuple[jax.Array, ...] = ()
    before: tuple[jax.Array, ...] = ()
    if plan.strides is not None and params is not None:
        # (copies: a stride-1 sample is a reshape, which may share the weights' buffer, and a
        # step that donates both params and state would then donate one buffer twice)
        start = tuple(jnp.copy(_sample(p, s)) for p, s in zip(params, plan.strides))
        before = tuple(jnp.zeros_like(x) for x in start)
    return WatchState(
        inner=inner, count=jnp.zeros((), jnp.int32), grad_sq=jnp.zeros((W, T), _F32),
        loss=jnp.full((W,), jnp.nan, _F32), has_loss=jnp.zeros((W,), bool),
        # (four arrays, not one four times: a step that donates its state donates each leaf)
        check=CheckStash(*(jnp.full((T,), jnp.nan, _F32) for _ in range(4)),
                         jnp.zeros((), bool)), before=before, start=start,
        acts=jnp.full((len(plan.sites),), jnp.nan, _F32), acts_step=jnp.zeros((), jnp.int32))


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

    def sample(_: Any) -> tuple[jax.Array, jax.Array]:
        values = [activation_value(kind, activations[name], saturation) if name in activations
                  else jnp.float32(jnp.nan) for name, kind in plan.sites]
        return jnp.stack(values), count.astype(jnp.int32)

    acts, step = lax.cond(count % plan.activation_every == 0, sample,
                          lambda _: (state.acts, state.acts_step), None)
    return state._replace(acts=acts, acts_step=step)


def record(plan: Plan, state: WatchState, grads: list[jax.Array],
           value: Any) -> WatchState:
    """This step's squared gradient norms and loss, into its ring slot."""
    slot = state.count % plan.window
    sq = _per_leaf(_sq, grads)
    grad_sq = lax.dynamic_update_slice(state.grad_sq, sq[None, :], (slot, jnp.zeros_like(slot)))
    if value is None:
        loss, has = state.loss.at[slot].set(jnp.nan), state.has_loss.at[slot].set(False)
    else:
        v = jnp.reshape(jnp.asarray(value), ()).astype(_F32)
        loss, has = state.loss.at[slot].set(v), state.has_loss.at[slot].set(True)
    return state._replace(grad_sq=grad_sq, loss=loss, has_loss=has)


def measure_check(plan: Plan, state: WatchState, grads: list[jax.Array],
                  params: list[jax.Array] | None, count: jax.Array) -> WatchState:
    """On a check step (``count`` = the step completing now): what the gradients and the
    weights before the update show; a plain copy of the state otherwise."""
    T = plan.num_leaves
    nan = jnp.full((T,), jnp.nan, _F32)
    detail = count % plan.detail_every == 0

    def details(_: Any) -> tuple[jax.Array, jax.Array]:
        return (_per_leaf(lambda g: jnp.max(jnp.abs(g.astype(_F32))), grads),
                _per_leaf(jnp.count_nonzero, grads))

    def measure(_: Any) -> tuple[CheckStash, tuple[jax.Array, ...]]:
        gmax, nnz = lax.cond(detail, details, lambda _: (nan, nan), None)
        if params is None:
            return CheckStash(gmax, nnz, nan, nan, detail), state.before
        dot = _per_leaf(lambda g, p: jnp.vdot(g.astype(_F32), p.astype(_F32)), grads, params)
        wsq = _per_leaf(_sq, params)
        before = state.before
        if plan.strides is not None and state.start:
            before = tuple(_sample(p, s).astype(b.dtype)
                           for p, s, b in zip(params, plan.strides, state.before))
        return CheckStash(gmax, nnz, dot, wsq, detail), before

    def keep(_: Any) -> tuple[CheckStash, tuple[jax.Array, ...]]:
        return state.check, state.before

    check, before = lax.cond(count % plan.window == 0, measure, keep, None)
    return state._replace(check=check, before=before)


def payload(plan: Plan, state: WatchState, params: list[jax.Array] | None) -> dict[str, Any]:
    """Everything one check hands the host, computed from the committed state of a check step
    and the weights after its update (``params``, as the next step receives them)."""
    out: dict[str, Any] = {"count": state.count, "grad_sq": state.grad_sq, "loss": state.loss,
                           "has_loss": state.has_loss, **state.check._asdict(),
                           "acts": state.acts, "acts_step": state.acts_step}
    if params is not None:
        out["weight_sq"] = _per_leaf(_sq, params)
        if plan.strides is not None and state.start:
            now = [_sample(p, s) for p, s in zip(params, plan.strides)]
            out["update_sq"] = _per_leaf(lambda a, b: _sq(a.astype(_F32) - b.astype(_F32)),
                                         now, state.before)
            out["update_base_sq"] = _per_leaf(_sq, state.before)
            out["change_sq"] = _per_leaf(lambda a, b: _sq(a.astype(_F32) - b.astype(_F32)),
                                         now, state.start)
            out["change_base_sq"] = _per_leaf(_sq, state.start)
    if plan.lr_leaves:
        leaves = jax.tree_util.tree_leaves(state.inner)
        out["lr"] = jnp.stack([jnp.reshape(leaves[i], ()).astype(_F32)
                               for i in plan.lr_leaves])
    return out


def emit_if_due(plan: Plan, state: WatchState, params: list[jax.Array] | None,
                receive: Callable[[dict[str, Any]], None]) -> None:
    """At the start of the step after a check step: one host callback with the check's
    payload. Only committed state is reported: a wrapper that throws a step's state away
    (``optax.MultiSteps`` between micro-batches, ``optax.apply_if_finite``) throws its
    measurements away with it."""
    due = (state.count > 0) & (state.count % plan.window == 0)

    def send(_: Any) -> None:
        jax.debug.callback(receive, payload(plan, state, params))

    lax.cond(due, send, lambda _: None, None)
