"""Hugging Face Transformers entry point: ``from gradwatch.transformers import GradWatchCallback``.

Importing this module imports torch and transformers; ``import gradwatch`` imports neither. The
callback is built on the PyTorch adapter; see docs/integrations/transformers.md.
"""

from __future__ import annotations

from gradwatch_torch._hf import GradWatchCallback

__all__ = ["GradWatchCallback"]
