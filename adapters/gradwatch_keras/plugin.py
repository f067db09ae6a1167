"""Registers the Keras adapter with gradwatch (entry point ``gradwatch: keras``)."""

from __future__ import annotations

import sys
from typing import Any

from gradwatch import hookimpl


@hookimpl(trylast=True)
def gradwatch_claim_model(model: Any, options: dict[str, Any]) -> Any | None:
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(model, keras.Model):
        return None  # keras was never imported: this cannot be a Keras model
    from ._callback import GradWatchCallback

    callback = GradWatchCallback(**options)
    callback.set_model(model)
    return callback
