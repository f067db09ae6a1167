"""PyTorch Lightning entry point: ``from gradwatch.lightning import GradWatchCallback``.

Importing this module imports torch and Lightning (``lightning.pytorch`` and/or
``pytorch_lightning``, whichever are installed); ``import gradwatch`` imports neither. The
callback is built on the PyTorch adapter; see docs/integrations/lightning.md.
"""

from __future__ import annotations

from gradwatch_torch._lightning import GradWatchCallback

__all__ = ["GradWatchCallback"]
