"""Loss scaling: the ``torch.amp.GradScaler`` that drives the optimizer, and what undoes its scale.

Gradients read at the end of backward are multiplied by the scaler's scale; each step's
statistics are divided by it (a device tensor: no sync). A step the scaler skips (overflow) is
not a step: the optimizer does not run, so its hooks do not fire.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch

#: Frames looked at, from the optimizer's pre-step hook up, for ``GradScaler.step``.
_FRAMES = 12
#: Without a scaler found, the stack is looked at in every step at first, then in one step in
#: this many (making a frame object of each is most of a step's Python cost for a small model).
_LOOK_EVERY = 64
#: ... after this many steps without one.
_LOOK_ALWAYS = 16


class LossScale:
    """The GradScaler of a run: given (``scaler=``), or found on the stack when
    ``scaler.step(optimizer)`` calls ``optimizer.step()`` (from ``_maybe_opt_step``).

    Args:
        scaler: The scaler passed to ``watch()``, or ``None``.
    """

    def __init__(self, scaler: Any = None) -> None:
        if scaler is not None and not hasattr(scaler, "get_scale"):
            raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(scaler).__name__}")
        self._ref = weakref.ref(scaler) if scaler is not None else None
        self._looked = 0

    def find(self) -> Any:
        """The scaler (``None`` without loss scaling). Call it from the optimizer's pre-step
        hook: the frames above are looked at for ``GradScaler.step`` (cheap: a frame's locals
        are read only when its code is the scaler's)."""
        if self._ref is not None:
            return self._ref()
        self._looked += 1
        if self._looked > _LOOK_ALWAYS and self._looked % _LOOK_EVERY:
            return None
        scaler_type = getattr(getattr(torch, "amp", None), "GradScaler", None)
        if scaler_type is None:
            return None
        step_code = getattr(scaler_type.step, "__code__", None)
        frame = sys._getframe(1)
        for _ in range(_FRAMES):
            if frame is None:
                break
            code = frame.f_code
            if code is step_code or code.co_name == "_maybe_opt_step":
                obj = frame.f_locals.get("self")
                if isinstance(obj, scaler_type):
                    self._ref = weakref.ref(obj)
                    return obj
            frame = frame.f_back
        return None

    def known(self) -> Any:
        """The scaler given or found so far, without looking for one."""
        return self._ref() if self._ref is not None else None

    def updates(self) -> tuple[int, int] | None:
        """Where the known scaler's scale stands: (its scale tensor's id, the tensor's in-place
        version, which each ``scaler.update()`` bumps once), read without a sync; ``None``
        without a scaler."""
        scale = getattr(self.known(), "_scale", None)
        return (id(scale), scale._version) if isinstance(scale, torch.Tensor) else None

    @staticmethod
    def inverse(scaler: Any) -> torch.Tensor | None:
        """1 / the scaler's current scale (a new tensor: the scaler updates its own in place
        after the step), or ``None`` without loss scaling."""
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        if scaler is None or not isinstance(scale, torch.Tensor) or not scaler.is_enabled():
            return None
        return scale.detach().float().reciprocal()

    @staticmethod
    def unscaled(scaler: Any, optimizer: Any) -> bool:
        """Whether the scaler has already unscaled ``optimizer``'s gradients this step
        (``scaler.unscale_(opt)``, or ``scaler.step(opt)`` on its way to ``opt.step()``)."""
        states = getattr(scaler, "_per_optimizer_states", None)
        stage = states.get(id(optimizer), {}).get("stage") if isinstance(states, dict) else None
        return getattr(stage, "name", None) == "UNSCALED"

    def clear(self) -> None:
        self._ref = None


class ScalerSteps:
    """Tells which ``scaler.step(optimizer)`` calls did not step the optimizer: the scaler
    found inf/NaN in its scaled gradients and skipped it (normal under AMP, while it finds its
    scale). Wraps the known scaler's ``step`` as an instance attribute, in front of the class's
    own; ``remove()`` lets the class's show through again.

    Args:
        mark: Returns a count of the optimizer steps that ended (applied or guard-skipped).
        returned: Called with the optimizer and ``mark()``'s count from before the call, after
            each ``scaler.step`` returns.
    """

    def __init__(self, mark: Callable[[], int], returned: Callable[[Any, int], None]) -> None:
        self._mark, self._returned = mark, returned
        self._scaler: weakref.ref | None = None
        self._fn: Callable[..., Any] | None = None

    def install(self, scaler: Any) -> None:
        if scaler is None or (self._scaler is not None and self._scaler() is scaler):
            return
        self.remove()
        original, mark, returned = scaler.step, self._mark, self._returned

        def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
            before = mark()
            out = original(optimizer, *args, **kwargs)
            returned(optimizer, before)
            return out

        scaler.step = step
        self._scaler, self._fn = weakref.ref(scaler), step

    def remove(self) -> None:
        scaler = self._scaler() if self._scaler is not None else None
        if scaler is not None and vars(scaler).get("step") is self._fn:
            del scaler.step
        self._scaler = self._fn = None
