"""JAX entry point: ``gradwatch.jax.watch(optax.adamw(1e-3))``, an optax transformation.

This module imports jax and optax only when :func:`watch` is called, so ``import gradwatch``
stays framework-free.
"""

from __future__ import annotations

from typing import Any


def watch(transformation: Any, **options: Any) -> Any:
    """Watch an optax ``GradientTransformation``; returns a ``JaxWatcher``, itself a drop-in
    optax transformation (``init``, ``update(grads, state, params, value=loss)``).

    Steps are the watcher's ``update`` calls that reach the optimizer (inside
    ``optax.MultiSteps``: optimizer steps, not micro-batches). See docs/jax.md for the options.
    """
    from gradwatch_jax import JaxWatcher

    return JaxWatcher(transformation, **options)


__all__ = ["watch"]
