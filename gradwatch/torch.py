"""PyTorch entry point: ``gradwatch.torch.watch(model, optimizer=opt)``.

This module imports torch only when :func:`watch` is called, so ``import gradwatch`` stays
framework-free.
"""

from __future__ import annotations

from typing import Any


def watch(model: Any, optimizer: Any = None, **options: Any) -> Any:
    """Attach gradwatch to a ``torch.nn.Module`` with hooks; returns a ``TorchWatcher``.

    Steps are optimizer steps when ``optimizer`` is given (gradient accumulation counts once),
    else completed backward passes. Use it as a context manager, or call ``remove()``, to
    detach every hook. See docs/torch.md for the options.
    """
    from gradwatch_torch import TorchWatcher

    return TorchWatcher(model, optimizer=optimizer, **options)


__all__ = ["watch"]
