"""One watched ``fit``: what it watches, where each step's numbers go, and its checks.

Set up in ``on_train_begin`` and closed at the end of ``fit``. The optimizer wrappers hand it the
loss and the gradients; it routes them by how the step runs (traced: :class:`GraphRecorder`,
eager: :class:`EagerRecorder`) and by replica, and turns a read into :class:`kit.StepStats`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import kit

from ._activations import ActivationSampler
from ._distribute import CAPTURED, Capture, all_reduce, reduce_raw, reduction, replica, replicas_of
from ._eager import EagerRecorder
from ._graph import GraphRecorder, GraphState, current_graph
from ._guard import StepGuard
from ._jaxgraph import JaxRecorder, JaxState, StepWrap
from ._model import ModelFacts, WatchedVariables, model_facts
from ._ops import dense, is_tracing, ops_for
from ._optimizer import OptimizerPatch
from ._plan import StepPlan
from ._readout import Cursor, RecordSettings, eager_record, graph_record
from ._samples import WeightSamples

logger = logging.getLogger("gradwatch")


class FitWatch:
    """Everything one watched ``fit`` holds; :meth:`close` leaves the model as it was.

    Args:
        model: The compiled model being fit.
        monitor: The run's monitor (its context is set here).
        update_ratio: ``"sampled"``, ``"exact"`` or ``"off"``.
        sample_fraction: ``sample_fraction``.
    """

    def __init__(self, model: Any, monitor: kit.Monitor, *, update_ratio: str,
                 sample_fraction: float, guard: str = "off") -> None:
        optimizer = model.optimizer
        self._monitor = monitor
        self._backend = backend = keras.backend.backend()
        self._inner = inner = getattr(optimizer, "inner_optimizer", optimizer)
        #: Whether the user was told that no loss reaches gradwatch (said once per fit).
        self._told_no_loss = False
        #: ``gradient_accumulation_steps`` (0: every apply updates the weights).
        self._accumulate = int(getattr(inner, "gradient_accumulation_steps", None) or 0)
        #: Serialises checks (Keras may run batch ends on a thread pool).
        self.lock = threading.Lock()
        #: Whether the wrappers are installed.
        self.active = False
        #: Whether a traced train step called ``apply`` (then batch ends read the state).
        self.traced = False
        #: The JAX backend: the state is read at batch begins (before the next step donates it).
        self.jax = backend == "jax"
        self._patch = OptimizerPatch(monitor)
        #: The watched variables and their layers.
        self.variables = variables = WatchedVariables(model)
        #: What the model's layers and graph say.
        self.facts: ModelFacts = model_facts(model, inner)
        monitor.set_context(kit.RunContext(model=self.facts.info,
                                           layers=tuple(variables.layer_infos())))
        monitor.reset()
        monitor.start()
        # Room for two checks' steps and an execution's: the steps after a check step wait
        # for the next read.
        window = 2 * monitor.check_every + 4 + int(getattr(model, "steps_per_execution", 1) or 1)
        self._ops = ops_for(backend, variables.float64)
        self._samples = WeightSamples(self._ops, variables.variables, update_ratio,
                                      sample_fraction)
        self._layout = variables.layout(self._samples.scale)
        self.activations = ActivationSampler(monitor, eager_gating=backend == "torch")
        self._model = model
        self._step_wrap: StepWrap | None = None
        try:
            self.activations.wrap(model)
            self._replicas = replicas_of(model)
            self._reduction = reduction(model, inner, self._replicas)
            # A static loss_scale_factor is divided out inside apply; gradients taken before
            # that are divided on the host. Keras' reduction sees them already divided.
            scale = getattr(inner, "loss_scale_factor", None)
            scale = None if (scale is None or self._reduction == "keras") else float(scale)
            self._settings = RecordSettings(self.activations.sites, scale,
                                            self._samples.start_sq)
            # The raw counter of apply calls: with gradient_accumulation_steps, ``iterations``
            # is a tensor computed from it (updates so far), read once here it would stay fixed.
            counter = getattr(inner, "_iterations", None)
            counter = inner.iterations if counter is None else counter
            start = int(ops.convert_to_numpy(counter))
            self._cursor = Cursor(start)
            plan = StepPlan(self._ops, variables.variables, self._samples, self.activations,
                            monitor, start, window)
            self._graph: GraphRecorder | JaxRecorder | None = None
            if backend == "tensorflow":
                state = GraphState(model.distribute_strategy, self._replicas, window,
                                   len(variables), len(self.activations.sites))
                self._graph = GraphRecorder(state, plan, counter)
            elif backend == "jax":
                state = JaxState(model, inner, window, len(variables),
                                 len(self.activations.sites))
                self._graph = JaxRecorder(state, plan, counter)
                self._step_wrap = StepWrap(model, self._graph, counter, self.activations)
            self._eager = EagerRecorder(plan)
            self._counter = counter
            #: The step count when each epoch began (steps since the fit's start).
            self.epoch_starts: list[int] = []
            #: ``guard="skip"``: the updates of non-finite steps are not applied.
            self.guard: StepGuard | None = None
            if guard == "skip":
                if self._replicas > 1:
                    logger.warning("gradwatch: guard='skip' is not supported under a "
                                   "tf.distribute strategy with %d replicas yet; this fit is "
                                   "watched without the guard.", self._replicas)
                else:
                    self.guard = StepGuard(monitor, self._layout.tensor_layer, start,
                                           traced=backend == "tensorflow",
                                           jax_fit=(model, inner) if self.jax else None)
                    self.guard.batch_of = lambda step: (self.batch_numbers([step])[0]
                                                        if self.epoch_starts else None)
            #: Per-thread trace state (tf.distribute traces each replica in its own thread).
            self._tls = threading.local()
            self._patch.install(optimizer, inner, on_loss=self._loss, before=self._before,
                                after=self._after,
                                on_reduced=self._reduced if self._reduction == "keras" else None,
                                skip=self._skip if self.guard is not None else None)
            if self._step_wrap is not None:
                # The JAX trainer jits the train_step it finds when its train function is made
                # (before on_train_begin): wrap it, and make the train function again.
                self._step_wrap.install()
                model.make_train_function(force=True)
        except BaseException:
            self.close()
            raise
        self.active = True

    def close(self) -> None:
        """Removes every wrapper."""
        self._patch.uninstall()
        self.activations.unwrap()
        if self._step_wrap is not None:
            self._step_wrap.uninstall()
            self._graph.state.remove()
        if self.guard is not None:
            self.guard.remove()
        self.active = False

    def nbytes(self) -> int:
        """Bytes held between steps: start-of-run weight samples and the state variable."""
        graph = self._graph.state.nbytes() if self._graph is not None else 0
        return self._samples.nbytes() + graph

    # -- the check ---------------------------------------------------------------------------

    def check(self) -> bool:
        """Reads the steps since the last check (one transfer) and hands them to the monitor;
        False when there were none. The caller holds :attr:`lock`."""
        if self.traced:
            graph = self._graph
            record = graph_record(graph.state.read(), self._cursor, self._settings,
                                  present=graph.present, has_loss=graph.has_loss,
                                  sampled=self._samples.enabled, replicas=self._replicas)
        else:
            rows, check = self._eager.take(self._cursor.step)
            eager = self._eager
            record = eager_record(self._ops, eager.norms, eager.window, rows, check,
                                  self.activations.take_eager(), self._cursor, self._settings,
                                  len(self.variables))
        if record is None:
            return False
        if self.epoch_starts:
            record = dataclasses.replace(record, batch_ids=self.batch_numbers(record.steps))
        stats = kit.step_stats(record, self._layout)
        if not self._told_no_loss and stats.has_loss is not None and not stats.has_loss.any():
            self._told_no_loss = True
            if self.jax:
                why = ("does not update Keras' loss tracker (a custom train_step?), where "
                       "gradwatch reads the batch loss on the JAX backend, so loss plateaus and "
                       "divergence are not checked. Update it as Keras' own train_step does: "
                       "`self._loss_tracker.update_state(loss, sample_weight=batch_size)` in a "
                       "StatelessScope over the metrics variables.")
            else:
                why = ("does not pass its loss through optimizer.scale_loss (a custom "
                       "train_step?), so loss plateaus and divergence are not checked. Add "
                       "`loss = self.optimizer.scale_loss(loss)` before taking the gradients, "
                       "as Keras' own train_step does.")
            logger.warning("gradwatch sees gradients but no loss (steps %d-%d): the model's "
                           "train_step %s", int(stats.steps[0]), int(stats.steps[-1]), why)
        every = self._accumulate
        if every and stats.update_ratio is not None and (self._cursor.start + stats.step) % every:
            # gradient_accumulation_steps: this apply only added to the accumulators and the
            # weights did not move; a zero there is not a stalled update, so none is reported.
            stats = dataclasses.replace(stats, update_ratio=None)
        self._monitor.check(stats)
        return True

    def check_all(self) -> None:
        """The end of the fit: every step not handed on yet (a read stops at a check step, and
        on JAX the last read may hold one check step and the steps after it)."""
        for _ in range(3):
            if not self.check():
                return

    def epoch_begins(self) -> None:
        """An epoch begins: its steps are numbered from here (one read of the step counter
        a epoch; the steps a guard skipped are not steps, so they are not counted)."""
        self.epoch_starts.append(int(ops.convert_to_numpy(self._counter)) - self._cursor.start)

    def steps_before(self, batch: int | None) -> int:
        """Steps of this fit done before batch ``batch`` of this epoch (None: the epoch is
        over; then the counter is read, which Keras has synced)."""
        if batch is None or not self.epoch_starts:
            return int(ops.convert_to_numpy(self._counter)) - self._cursor.start
        return self.epoch_starts[-1] + batch

    def batch_numbers(self, steps: Any) -> list[int | None]:
        """Each step's batch number in its epoch (0-based, as Keras numbers ``batch``)."""
        starts = np.asarray(self.epoch_starts)
        out: list[int | None] = []
        for step in np.asarray(steps, dtype=np.int64):
            k = int(np.searchsorted(starts, step, side="left")) - 1
            out.append(int(step - starts[k] - 1) if k >= 0 else None)
        return out

    # -- what the optimizer wrappers see -----------------------------------------------------

    def _loss(self, loss: Any) -> None:
        if self._backend == "jax":
            return  # (a tracer of jax.value_and_grad here: StepWrap writes the loss)
        if self._backend == "torch" and not len(loss.shape):
            self._eager.loss = loss.detach()  # keeps no autograd graph alive between checks
            return
        if is_tracing():
            self._graph.losses[replica()[0]] = loss
            return
        rid, replicas = replica()
        t = ops.convert_to_tensor(loss)
        if self._backend == "torch":
            t = t.detach()
        if len(t.shape):
            t = ops.mean(t)
        if replicas > 1:  # eager tf.distribute: Keras divided each replica's loss by their number
            import tensorflow as tf

            t = all_reduce("SUM", tf.stop_gradient(t))
        if not rid:
            self._eager.loss = t

    def _by_position(self, grads: list[Any], tv: list[Any]) -> dict[int, Any]:
        """Raw gradients of the watched variables (IndexedSlices kept), by position."""
        position = self.variables.position
        return {position[id(w)]: g for g, w in zip(grads, tv)
                if g is not None and id(w) in position}

    @staticmethod
    def _densified(raw: dict[int, Any]) -> tuple[dict[int, Any], dict[int, Any]]:
        """(gradient entries by position, variable rows of the sparse ones)."""
        grads, rows = {}, {}
        for i, g in raw.items():
            grads[i], r = dense(g)
            if r is not None:
                rows[i] = r
        return grads, rows

    def _before(self, grads: list[Any], tv: list[Any]) -> Any:
        if self._backend == "torch":  # eager, one replica, dense gradients
            return self._eager.before(self._by_position(grads, tv), {})
        if self._backend == "jax":  # traced or not, in the trainer's stateless scope
            self.traced = True
            return self._graph.before(self._by_position(grads, tv))
        rid, replicas = replica()
        if not is_tracing():
            raw = self._by_position(grads, tv)
            if replicas > 1 and raw:  # eager tf.distribute: every replica joins in
                raw = reduce_raw(raw)
            return None if rid else self._eager.before(*self._densified(raw))
        self.traced = True
        graph = self._graph
        if replicas > 1 and self._reduction == "keras":
            if rid:
                return graph.before(None, rid=rid)
            # The statistics are taken in the wrapped all-reduce, inside the original apply.
            self._tls.capture = Capture(current_graph())
            return CAPTURED
        if replicas > 1:
            reduced = reduce_raw(self._by_position(grads, tv))
            if rid:
                return graph.before(None, rid=rid)
            return graph.before(*self._densified(reduced))
        return graph.before(*self._densified(self._by_position(grads, tv)))

    def _skip(self, grads: list[Any], tv: list[Any], update: Any) -> Any:
        """The guard's decision around the real update (gradwatch's own failure in it: the
        update runs unguarded, and the failure is reported once)."""
        try:
            dense_grads = self._densified(self._by_position(grads, tv))[0]
            tracing = self._backend != "torch" and is_tracing()
            step = (ops.convert_to_tensor(self._counter) + 1 if tracing
                    else self._eager.step + 1)
        except Exception as exc:
            self._monitor.internal_error("keras adapter (guard)", exc)
            return update()
        norms = None if tracing else self._eager.norms.row(step % self._eager.window)
        return self.guard.apply(dense_grads, update, step, tracing, norms)

    def _reduced(self, reduced: list[tuple[Any, Any]]) -> None:
        """The all-reduced gradients, inside the first replica's original apply."""
        capture = getattr(self._tls, "capture", None)
        if capture is None or capture.graph is not current_graph() or capture.before is not None:
            return
        g, w = zip(*reduced) if reduced else ((), ())
        capture.before = self._graph.before(*self._densified(self._by_position(list(g),
                                                                                list(w))))

    def _after(self, before: Any) -> None:
        if before is CAPTURED:
            capture, self._tls.capture = self._tls.capture, None
            before = capture.before if capture is not None else None
            if before is None:
                return
        if self._backend != "torch" and is_tracing():  # (JAX: always)
            self._graph.after(before)
        elif self._eager.after(before):
            # Eager mode checks here, in the training thread: Keras may run batch-end callbacks
            # on a thread pool far behind training, and a strict-mode error belongs to this step.
            with self.lock:
                try:
                    self.check()
                except BaseException:
                    self.close()
                    raise

