"""gradwatch's PyTorch adapter. ``import gradwatch_torch`` does not import torch; the watcher
class does, when first used."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "TorchWatcher":
        from ._watcher import TorchWatcher

        return TorchWatcher
    raise AttributeError(name)


__all__ = ["TorchWatcher"]
