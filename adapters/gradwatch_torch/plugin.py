"""Registers the PyTorch adapter with gradwatch (entry point ``gradwatch: torch``)."""

from __future__ import annotations

import sys
from typing import Any

from gradwatch import hookimpl


@hookimpl(trylast=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        return None  # no torch imported: this cannot be a torch model
    keras = sys.modules.get("keras")
    if keras is not None and isinstance(model, keras.Model):
        return None  # a Keras model on the torch backend is the Keras adapter's
    from ._watcher import TorchWatcher

    return TorchWatcher(model, **options)
