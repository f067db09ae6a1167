"""Keras 3 entry point: ``from gradwatch.keras import GradWatchCallback``.

Keras is imported when ``GradWatchCallback`` is first accessed, not when gradwatch is imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time keras loads on first access
    from gradwatch_keras import GradWatchCallback


def __getattr__(name: str) -> Any:
    if name == "GradWatchCallback":
        from gradwatch_keras import GradWatchCallback

        return GradWatchCallback
    raise AttributeError(f"module 'gradwatch.keras' has no attribute {name!r}")


__all__ = ["GradWatchCallback"]
