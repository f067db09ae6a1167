"""The optax watcher: an optax ``GradientTransformationExtraArgs`` wrapping the user's, which
measures the gradients it is given inside the jitted update and reports once per check.

Where gradients are read: the ``grads`` handed to ``update`` — after ``optax.MultiSteps``
accumulation when the watcher is inside it (its steps are optimizer steps), before every
transformation the watcher wraps (``clip_by_global_norm`` in the wrapped chain: measured before
clipping). Per step the cost is one squared norm per leaf into a ring buffer in the state
(``_device``); a check step adds max |g|, non-zero counts, g . W, weight norms and sampled
update ratios; the step after it hands the check's numbers to the host (from the committed
state): on XLA:CPU through an FFI handler (``_sink``), elsewhere in a ``jax.debug.callback``.
On the host (``_readout``) the core makes per-layer statistics of them.
Layer names come from the pytree paths (``_tree``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import jax
import numpy as np
import optax

from gradwatch import kit

from . import _device, _readout, _sink, _tree
from .plugin import tensorboard_opener

logger = logging.getLogger("gradwatch")

JAX_OPTIONS = ("update_ratio", "sample_fraction", "tensorboard", "transfer", "activations")
#: How a check's numbers reach the host (docs/jax.md, "The host transfer").
TRANSFERS = ("callback", "debug_callback", "state")
_said: set[str] = set()  # (the fallback to jax.debug.callback is said once a process)

#: Options of ``gradwatch.torch.watch`` that cannot work on an optax transformation, and why.
REFUSED = {
    "optimizer": "the optax transformation is what is watched: "
                 "gradwatch.jax.watch(optax.adamw(1e-3))",
    "scaler": "JAX has no GradScaler; gradwatch measures the gradients given to update() (unscale "
              "them before, e.g. with jmp's loss scale)",
    "ranks": "multi-process JAX (jax.distributed) is not supported by the optax adapter yet",
    "guard": "wrap the transformation gradwatch watches: "
             "gradwatch.jax.watch(optax.apply_if_finite(opt, max_consecutive_errors=...)) "
             "skips non-finite steps, and gradwatch still reports them",
    "activation_every": "an optax transformation sees gradients and parameters, never the "
                        "model's activations: name the sites with activations={'act0': "
                        "'relu', ...} and pass their outputs to update(activations=...)",
}


def _refuse(options: dict[str, Any], sites: bool) -> None:
    for name, why in REFUSED.items():
        if name not in options:
            continue
        if name == "activation_every" and (sites or options[name] is None):
            continue  # (with activation sites named it is the core's option)
        raise ValueError(f"gradwatch.jax.watch: option {name!r} cannot work with optax: {why}")


def _sites(activations: Any) -> tuple[tuple[str, str], ...]:
    """``activations={'act0': 'relu', ...}`` checked: site names and their kinds."""
    if activations is None:
        return ()
    if not isinstance(activations, dict) or not activations:
        raise TypeError("gradwatch.jax.watch: activations must be a dict of site name -> kind "
                        "('relu', 'sigmoid' or 'tanh'), e.g. {'act0': 'relu'}")
    out = []
    for name, kind in activations.items():
        if kit.SAMPLED_ACTIVATIONS.get(kind) is None:
            raise ValueError(f"gradwatch.jax.watch: activations[{name!r}] = {kind!r}: the kind "
                             f"must be one of {sorted(kit.SAMPLED_ACTIVATIONS)}")
        out.append((str(name), kit.SAMPLED_ACTIVATIONS[kind]))
    return tuple(out)


class _Watch:
    """The watcher's workings; :class:`JaxWatcher` is the transformation users hold."""

    def __init__(self, inner: Any, update_ratio: str = "sampled", sample_fraction: float = 0.02,
                 tensorboard: Any = None, transfer: str = "callback", activations: Any = None,
                 **options: Any) -> None:
        if not callable(getattr(inner, "init", None)) or not callable(
                getattr(inner, "update", None)):
            raise TypeError(f"gradwatch.jax.watch needs an optax GradientTransformation, got "
                            f"{type(inner).__name__}")
        #: The activation sites (name, kind) update() is given the outputs of.
        self.sites = _sites(activations)
        _refuse(options, bool(self.sites))
        if not self.sites:
            options.pop("activation_every", None)
        #: Units of each site, learnt when update() is traced.
        self._units: dict[str, int] = {}
        kit.check_options("gradwatch.jax.watch", options, JAX_OPTIONS)
        self.inner = optax.with_extra_args_support(inner)
        self.update_ratio = kit.choice("update_ratio", update_ratio, kit.UPDATE_RATIO_MODES)
        self.sample_fraction = kit.fraction("sample_fraction", sample_fraction)
        self.transfer = kit.choice("transfer", transfer, TRANSFERS)
        self._read: Any = None  # transfer="state": the jitted payload of a state
        #: The FFI sink's id (transfer="callback" on XLA:CPU) and the layouts of the vectors
        #: it is sent, by layout id (one per traced variant of update()).
        self._sink_id: int | None = None
        self._packings: list[_device.Layout] = []
        self._calls = 0  # transfer="state": read() calls since init()
        self._board = kit.tensorboard_sink(tensorboard, tensorboard_opener)
        # Without activation sites the detail schedule is every 5th check, as without activation
        # sampling.
        self._options = options if self.sites else dict(options, activation_every=None)
        self.monitor = kit.Monitor(
            kit.RunContext(model=_tree.model_info(()), layers=()),
            tensorboard=self._board, **self._options)
        self._lock = threading.Lock()
        self._leaves: _tree.Leaves | None = None
        self._plan: _device.Plan | None = None
        self._layout: kit.TensorLayout | None = None
        self._last = 0  # the last check step reported
        self._removed = False
        self._final: kit.Report | None = None
        #: Host transfers so far (one per check).
        self.transfers = 0
        #: Strict mode's error, once raised (``on_finding="raise"``).
        self.error: kit.GradientHealthError | None = None

    # -- optax ---------------------------------------------------------------------------------

    def init(self, params: Any) -> _device.WatchState:
        leaves = _tree.leaves_of(params)
        inner = self.inner.init(params)
        infos = _tree.layer_infos(leaves, params)
        if self._leaves is None or self._leaves.names != leaves.names:
            self._leaves = leaves
            fraction = self.sample_fraction
            strides = None if self.update_ratio == "off" else tuple(
                kit.sample_stride(n, fraction, exact=self.update_ratio == "exact")
                for n in leaves.numel)
            numel = leaves.numel
            scale = (None if strides is None
                     else [n / len(range(0, n, s)) if n else 1.0 for n, s in zip(numel, strides)])
            self._layout = kit.TensorLayout(leaves.layers, leaves.tensor_layer, numel, scale)
            self._plan = _device.Plan(
                num_leaves=len(leaves.names), window=self.monitor.check_every,
                detail_every=5 * self.monitor.check_every, strides=strides,
                lr_leaves=tuple(_tree.learning_rate_leaves(inner)), sites=self.sites,
                activation_every=self.monitor.activation_every if self.sites else None)
            lrs = _concrete_lrs(inner, self._plan.lr_leaves)
            kinds = frozenset(kind for _, kind in self.sites)
            self.monitor.set_context(kit.RunContext(model=_tree.model_info(infos, lrs, kinds),
                                                    layers=infos))
        self._last = 0
        self._calls = 0
        self._read = None
        self.monitor.start()
        plist = jax.tree_util.tree_leaves(params)
        return _device.init_state(self._plan, inner, plist if plist else None)

    def update(self, grads: Any, state: _device.WatchState, params: Any = None,
               **extra: Any) -> tuple[Any, _device.WatchState]:
        plan = self._plan
        if plan is None or not isinstance(state, _device.WatchState):
            raise ValueError("gradwatch.jax.watch: update() needs the state this watcher's "
                             "init() returned")
        glist = jax.tree_util.tree_leaves(grads)
        if len(glist) != plan.num_leaves:
            raise ValueError(f"gradwatch.jax.watch: the gradients have {len(glist)} leaves, the "
                             f"params given to init() had {plan.num_leaves}")
        plist = jax.tree_util.tree_leaves(params) if params is not None else None
        if plist is not None and len(plist) != plan.num_leaves:
            plist = None  # not the watched pytree: weights are not measured
        acts = self._activations(extra.pop("activations", None))
        committed = state
        state = _device.record(plan, state, glist, extra.get("value"))
        updates, inner = self.inner.update(grads, state.inner, params, **extra)
        count = state.count + 1
        state = _device.checks(plan, committed, state, glist, plist, count, self._sender())
        state = _device.sample_activations(plan, state, acts, count, kit.SATURATION_DERIVATIVE)
        return updates, state._replace(inner=inner, count=count)

    def _sender(self) -> Any:
        """What sends a check's payload to the host (traced): the FFI sink, or a
        ``jax.debug.callback`` of ``_receive``; None with transfer="state"."""
        if self.transfer == "state":
            return None
        sink = self._sink() if self.transfer == "callback" else None
        if sink is not None:
            return sink

        def callback(payload: dict[str, Any]) -> None:
            jax.debug.callback(self._receive, payload)

        return callback

    def _activations(self, given: Any) -> dict[str, Any]:
        """``update(activations={site: output})`` checked against the sites named at
        ``watch()``; their widths are learnt here (trace time)."""
        if given is None:
            return {}
        if not self.sites:
            raise ValueError("gradwatch.jax.watch: update() was given activations, but no sites "
                             "were named: watch(tx, activations={'act0': 'relu', ...})")
        if not isinstance(given, dict):
            raise TypeError("update(activations=...) must be a dict of site name -> output")
        unknown = sorted(set(given) - {name for name, _ in self.sites})
        if unknown:
            raise ValueError(f"update(activations=...): {unknown} are not among the sites named "
                             f"at watch(): {[name for name, _ in self.sites]}")
        for name, y in given.items():
            self._units[name] = int(np.shape(y)[-1]) if np.ndim(y) else 1
        return given

    def _sink(self) -> Any:
        """For transfer="callback" on XLA:CPU, what sends a payload through the FFI sink
        (traced); None where jax.debug.callback carries it."""
        if jax.default_backend() != "cpu":
            return None
        ok = _sink.register()
        if ok is not True:
            if "sink" not in _said:
                _said.add("sink")
                logger.info("gradwatch: checks reach the host by jax.debug.callback (the FFI "
                            "check sink could not be registered: %s), which takes every "
                            "step off JAX's C++ dispatch path (docs/jax.md, 'The host "
                            "transfer')", ok)
            return None
        if self._sink_id is None:
            ref = weakref.ref(self)

            def deliver(vector: np.ndarray) -> None:
                core = ref()
                if core is not None:
                    core._deliver(vector)

            self._sink_id = _sink.open_sink(deliver)
            weakref.finalize(self, _sink.close_sink, self._sink_id)
        sid = self._sink_id

        def send(payload: dict[str, Any]) -> jax.Array:
            index = len(self._packings)
            vector, layout = _device.pack(payload, (sid, index))
            self._packings.append(layout)
            return _sink.send(vector)

        return send

    def _deliver(self, vector: np.ndarray) -> None:
        """The FFI sink's end (on XLA's thread): one packed check."""
        layout = self._packings[int(vector[1:2].view(np.int32)[0])]
        self._receive(_device.unpack(vector, layout))

    # -- the host side -------------------------------------------------------------------------

    def _receive(self, payload: dict[str, Any]) -> None:
        """The host callback: one check's numbers, once (wrappers that call update() several
        times per step, like MultiSteps, send the same committed check each time)."""
        with self._lock:
            if self._removed:
                return
            host = {k: np.asarray(v) for k, v in payload.items()}
            step = int(host["count"])
            if step == self._last:
                return
            self._last = step
            self.transfers += 1
            try:
                self.monitor.guard("jax adapter (_check)", self._check, host, step)
            except kit.GradientHealthError as exc:
                # Strict mode: raising here fails the jitted step (a JaxRuntimeError at the
                # next read of its results, carrying this message), which stops training; the
                # error itself is kept for the user and raised again by findings/report().
                self.error = exc
                raise

    def _check(self, host: dict[str, np.ndarray], step: int) -> None:
        self.monitor.note_steps(step)
        lrs = _readout.learning_rates(host)
        if lrs:
            self.monitor.update_model(learning_rates=lrs)
        sites = tuple(kit.ActivationSite(name, kind, self._units.get(name, 0))
                      for name, kind in self.sites)
        record = _readout.to_record(host, sites)
        self.monitor.check(kit.step_stats(record, self._layout, step=step))

    def flush(self, state: Any, params: Any = None) -> None:
        """Report the last check now, from the state (and the weights after it) the training
        loop holds: a check is otherwise sent at the start of the step after it."""
        if self.transfer != "state":
            settle()
        found = [x for x in jax.tree_util.tree_leaves(
            state, is_leaf=lambda x: isinstance(x, _device.WatchState))
            if isinstance(x, _device.WatchState)]
        if not found or self._plan is None:
            return
        plist = jax.tree_util.tree_leaves(params) if params is not None else None
        if plist is not None and len(plist) != self._plan.num_leaves:
            plist = None
        host = jax.device_get(self._payload(found[0], plist))  # one transfer
        count = int(host["count"])
        if count and count % self._plan.window == 0:
            self._receive(host)

    def _payload(self, state: _device.WatchState, plist: list[Any] | None) -> dict[str, Any]:
        if self._read is None:
            self._read = jax.jit(lambda st, pl: _device.payload(self._plan, st, pl))
        return self._read(state, plist)

    def read(self, state: Any, params: Any = None) -> None:
        """``transfer="state"``: call once per optimizer step, after it, with the state it
        returned (and the updated params). Steps are counted on the host; on check steps the
        check's numbers are read from the state in one transfer, with no host callback in the
        jitted step."""
        if self.transfer != "state":
            raise ValueError(f'read() is for transfer="state"; with transfer='
                             f'{self.transfer!r} checks reach the host by themselves')
        self._calls += 1
        if self._plan is None or self._calls % self._plan.window:
            return
        self.flush(state, params)


def settle() -> None:
    """Wait for the steps already dispatched, and so for the checks they hand the host. The
    FFI sink is no JAX effect, so ``jax.effects_barrier`` does not wait for it: every live
    array is waited for instead (the outputs of a step in flight are among them). Raises
    nothing: a failed step's error belongs to whoever reads its results (strict mode's own is
    kept in ``error``), and the failed arrays of another run, still alive in a traceback, must
    not break this one."""
    try:
        jax.effects_barrier()
    except Exception:  # (a debug callback that raised: strict mode keeps its error)
        pass
    arrays = jax.live_arrays()
    try:
        jax.block_until_ready(arrays)
    except Exception:  # some array failed: wait for each of the others
        for array in arrays:
            try:
                array.block_until_ready()
            except Exception:
                pass


def _concrete_lrs(inner: Any, indices: tuple[int, ...]) -> tuple[float, ...]:
    leaves = jax.tree_util.tree_leaves(inner)
    out = []
    for i in indices:
        try:
            out.append(float(np.asarray(leaves[i])))
        except Exception:  # a tracer: init ran under jit; the first check reads it
            pass
    return tuple(out)


class JaxWatcher(optax.GradientTransformationExtraArgs):
    """An optax transformation that watches the gradients it is given; see
    :func:`gradwatch.jax.watch`.

    Args:
        inner: The optax ``GradientTransformation`` to watch (``optax.adamw(1e-3)``, a chain).
        update_ratio: ``"sampled"`` keeps a fixed strided sample of every parameter (about
            ``sample_fraction`` of the elements, at least 32 per leaf) in the state to estimate
            update and weight-change ratios; ``"exact"`` keeps whole copies (memory: two copies
            of the parameters in the state); ``"off"`` measures neither. Defaults to
            ``"sampled"``.
        sample_fraction: Fraction of elements sampled per leaf. Defaults to ``0.02``.
        transfer: How each check's numbers reach the host: ``"callback"`` (a
            ``jax.debug.callback`` in the jitted step, on the step after each check step:
            nothing to call) or ``"state"`` (no callback in the step; the loop calls
            ``w.read(state, params)`` after each optimizer step and the check is read from the
            state in one transfer: cheaper on XLA:CPU, see docs/jax.md). Defaults to
            ``"callback"``.
        tensorboard: A writer object (``add_scalar``/``add_text``/``flush``) or a log directory
            (needs the ``tensorboardX`` package). Defaults to ``None``.
        **options: The core options (``check_every``, ``on_finding``, ``events``,
            ``detectors``, ``repeat_after``, ``name``, ``plugins``); see
            :class:`gradwatch.Monitor`.
    """

    def __new__(cls, inner: Any, **options: Any) -> JaxWatcher:
        core = _Watch(inner, **options)
        self = super().__new__(cls, core.init, core.update)
        self._core = core
        return self

    @property
    def monitor(self) -> kit.Monitor:
        return self._core.monitor

    def _wait(self) -> None:
        """Wait for the checks already computed; strict mode's error is raised again here."""
        settle()
        if self._core.error is not None:
            raise self._core.error

    @property
    def findings(self) -> list[kit.Finding]:
        """Findings so far, in order of occurrence (waits for the checks already computed)."""
        self._wait()
        return self._core.monitor.findings

    @property
    def error(self) -> kit.GradientHealthError | None:
        """Strict mode's error (``on_finding="raise"``), once a finding raised it."""
        return self._core.error

    @property
    def step(self) -> int:
        """The last optimizer step a check reported."""
        settle()
        return self._core._last

    @property
    def transfers(self) -> int:
        """Host transfers so far: one per check."""
        settle()
        return self._core.transfers

    def flush(self, state: Any, params: Any = None) -> None:
        self._core.flush(state, params)

    flush.__doc__ = _Watch.flush.__doc__

    def read(self, state: Any, params: Any = None) -> None:
        self._core.read(state, params)

    read.__doc__ = _Watch.read.__doc__

    def report(self) -> kit.Report:
        """Per-layer table and findings; ``str()`` renders it."""
        self._wait()
        return self._core.monitor.report()

    def remove(self) -> kit.Report:
        """Stop reporting (later checks are ignored) and end the run; returns the final report.
        The transformation keeps working as the one it wraps, plus the measurements."""
        core = self._core
        if not core._removed:
            settle()
            with core._lock:
                core._removed = True
                core._final = core.monitor.end()
            if core._sink_id is not None:  # later checks are dropped by the handler itself
                _sink.close_sink(core._sink_id)
        return core._final

    @property
    def removed(self) -> bool:
        return self._core._removed

    def __enter__(self) -> JaxWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        core = self._core
        layers = len(core._leaves.layers) if core._leaves is not None else 0
        return (f"JaxWatcher({layers} layers, step {core._last}, "
                f"{len(core.monitor.findings)} findings"
                f"{', removed' if core._removed else ''})")

    def layers(self) -> tuple[str, ...]:
        """Names of the watched layers in depth order (known after ``init``)."""
        return self._core._leaves.layers if self._core._leaves is not None else ()
