"""The optimizer methods gradwatch wraps for the duration of ``fit``, and putting them back.

* ``scale_loss(loss)``: every backend's train step passes the batch loss through it, so the loss
  is the batch's (not the running mean ``logs`` shows);
* ``apply(grads, variables)``: gradients arrive after the backward pass and before the
  optimizer's own clipping;
* under tf.distribute, where Keras' own reduction is measured, ``_all_reduce_sum_gradients``.

The wrappers are instance attributes: removing them lets the class's methods show through again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradwatch import kit


class OptimizerPatch:
    """Wraps one fit's optimizer methods; every call into gradwatch runs under ``monitor.guard``.

    Args:
        monitor: The run's monitor.
    """

    def __init__(self, monitor: kit.Monitor) -> None:
        self._monitor = monitor
        self._installed: list[tuple[Any, str]] = []

    def install(self, optimizer: Any, inner: Any, *, on_loss: Callable[[Any], None],
                before: Callable[[list[Any], list[Any]], Any], after: Callable[[Any], None],
                on_reduced: Callable[[list[tuple[Any, Any]]], None] | None = None,
                skip: Callable[[list[Any], list[Any], Callable[[], Any]], Any] | None = None,
                ) -> None:
        """``on_loss(loss)`` sees every batch loss; ``before(grads, variables)`` runs before the
        update and what it returns (unless None) goes to ``after`` once the update is applied;
        ``on_reduced(grads_and_vars)`` sees Keras' all-reduced gradients; ``skip(grads,
        variables, update)`` (the guard) decides whether ``update()`` (the real update, then
        ``after``) runs."""
        guard = self._monitor.guard
        original_apply = inner.apply
        original_scale = optimizer.scale_loss

        def scale_loss(loss: Any) -> Any:
            guard("keras adapter (loss)", on_loss, loss)
            return original_scale(loss)

        def apply(grads: Any, trainable_variables: Any = None) -> Any:
            tv = (list(trainable_variables) if trainable_variables is not None
                  else list(inner._trainable_variables))
            grads = list(grads)
            token = guard("keras adapter (before apply)", before, grads, tv)

            def update() -> Any:
                result = original_apply(grads, trainable_variables)
                if token is not None:
                    guard("keras adapter (after apply)", after, token)
                return result

            if skip is None:
                return update()
            return skip(grads, tv, update)  # (the guard runs update() itself unless it skips)

        self._set(optimizer, "scale_loss", scale_loss)
        self._set(inner, "apply", apply)
        if on_reduced is not None:
            original_reduce = inner._all_reduce_sum_gradients

            def all_reduce_sum_gradients(grads_and_vars: Any) -> Any:
                reduced = original_reduce(grads_and_vars)
                guard("keras adapter (all-reduce)", on_reduced, reduced)
                return reduced

            self._set(inner, "_all_reduce_sum_gradients", all_reduce_sum_gradients)

    def _set(self, obj: Any, attr: str, fn: Any) -> None:
        setattr(obj, attr, fn)
        self._installed.append((obj, attr))

    def uninstall(self) -> None:
        for obj, attr in self._installed:
            vars(obj).pop(attr, None)  # the class's own method shows through again
        self._installed = []
