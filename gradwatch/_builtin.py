"""The built-in detectors, registered as a plugin exactly like a third-party one."""

from __future__ import annotations

from ._detectors import Detector, default_detectors
from ._hookspecs import hookimpl


@hookimpl
def gradwatch_default_detectors() -> list[Detector]:
    return default_detectors()
