"""gradwatch's Keras 3 adapter. ``import gradwatch_keras`` does not import keras; the callback
class does, when first used."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "GradWatchCallback":
        from ._callback import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(name)


__all__ = ["GradWatchCallback"]
