"""gradwatch's optax adapter. ``import gradwatch_jax`` does not import jax; the watcher class
does, when first used."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "JaxWatcher":
        from ._watcher import JaxWatcher

        return JaxWatcher
    raise AttributeError(name)


__all__ = ["JaxWatcher"]
