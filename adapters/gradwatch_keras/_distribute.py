"""tf.distribute: which replica runs this step, sums over replicas, whose all-reduce to measure.

Under a strategy the wrapped ``apply`` sees one replica's gradient; gradwatch measures the
all-reduced one. Keras reduces after clipping, so gradwatch takes Keras' own reduction
(``"keras"``: free) only where nothing clips or accumulates between ``apply`` and the reduction;
otherwise it reduces the gradients once more itself (``"all_reduce"``: one more all-reduce).
"""

from __future__ import annotations

from typing import Any

import keras

from ._model import clips

#: What the wrapped ``apply`` gets back when the statistics are taken in Keras' all-reduce.
CAPTURED = object()


def replica() -> tuple[int, int]:
    """(replica id, replicas in sync) of the running step: (0, 1) outside tf.distribute."""
    if keras.backend.backend() != "tensorflow":
        return 0, 1
    import tensorflow as tf

    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return 0, 1
    rid = tf.get_static_value(ctx.replica_id_in_sync_group)
    return (int(rid) if rid is not None else 0), int(ctx.num_replicas_in_sync)


def all_reduce(op: str, values: Any) -> Any:
    """Sum or mean over the replicas of the running tf.distribute step (all must call it)."""
    import tensorflow as tf

    return tf.distribute.get_replica_context().all_reduce(getattr(tf.distribute.ReduceOp, op),
                                                          values)


def reduce_raw(raw: dict[int, Any]) -> dict[int, Any]:
    """Sum over the replicas of the raw gradients by variable position (every replica must call
    it). Sparse gradients are reduced as IndexedSlices, before their repeated rows are summed:
    the replicas' shards touch different rows."""
    keys = sorted(raw)
    return dict(zip(keys, all_reduce("SUM", [raw[k] for k in keys]))) if keys else {}


def replicas_of(model: Any) -> int:
    """Replicas in sync of the model's strategy (1 outside tf.distribute)."""
    strategy = getattr(model, "distribute_strategy", None)
    if keras.backend.backend() != "tensorflow" or strategy is None:
        return 1
    return int(strategy.num_replicas_in_sync)


def reduction(model: Any, optimizer: Any, replicas: int) -> str | None:
    """``"keras"``, ``"all_reduce"`` (see the module's docstring), or None on one replica."""
    if replicas <= 1:
        return None
    own = clips(optimizer) or getattr(optimizer, "gradient_accumulation_steps", None) or \
        getattr(model, "run_eagerly", False) or \
        not hasattr(optimizer, "_all_reduce_sum_gradients")
    return "all_reduce" if own else "keras"


class Capture:
    """Per-trace hand-over from the wrapped all-reduce back to the wrapped ``apply``."""

    def __init__(self, graph: Any) -> None:
        #: The graph being traced when ``apply`` was entered.
        self.graph = graph
        #: What the graph recorder returned for the reduced gradients.
        self.before: Any = None
