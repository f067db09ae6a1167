"""The fixed strided sample of every variable that update ratios and weight change are read from."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch import kit

from ._ops import KerasOps


class WeightSamples:
    """Per variable, every ``stride``-th entry (``update_ratio="sampled"``: about
    ``sample_fraction`` of them, at least :data:`kit.MIN_SAMPLES`; ``"exact"``: all), and a copy
    of that sample taken when the fit starts.

    Args:
        ops: The backend's ops.
        variables: The watched variables.
        mode: ``"sampled"``, ``"exact"`` or ``"off"`` (nothing is sampled).
        fraction: ``sample_fraction``.
    """

    def __init__(self, ops: KerasOps, variables: list[Any], mode: str, fraction: float) -> None:
        self._ops = ops
        n = len(variables)
        #: Whether update ratios and weight change are measured.
        self.enabled = mode != "off" and n > 0
        #: Stride of each variable's sample ``[V]``.
        self.strides: list[int] = []
        #: Elements / elements sampled, per variable ``[V]`` (for :class:`kit.TensorLayout`).
        self.scale = np.ones(n)
        #: Entries per sample ``[V]``.
        self.sizes: list[int] = []
        #: The samples at the start of the fit: one device vector, and its pieces.
        self.start_flat: Any = None
        self.start: list[Any] = []
        #: Their squared norms ``[V]`` (host), the base of the weight change.
        self.start_sq: np.ndarray | None = None
        self._flats: list[Any] = []
        self._views: list[Any] = []
        if not self.enabled:
            return
        for i, w in enumerate(variables):
            size = int(np.prod(w.shape))
            stride = kit.sample_stride(size, fraction, mode == "exact")
            self.strides.append(stride)
            self.sizes.append(len(range(0, size, stride)))
            self.scale[i] = size / max(self.sizes[-1], 1)
        self.start_flat = self.snapshot(variables)
        self.start = ops.split(self.start_flat, self.sizes)
        self.start_sq = np.asarray(ops.to_host([ops.norms(self.start)]), dtype=float) ** 2

    def take(self, variables: list[Any]) -> list[Any]:
        """The current samples of ``variables``: on the PyTorch backend views of the live
        weights, made once (the backend updates variables in place)."""
        flats = [self._ops.flat(w) for w in variables]
        if len(flats) != len(self._flats) or any(a is not b for a, b in zip(flats, self._flats)):
            self._flats = flats
            self._views = [f if s == 1 else f[::s] for f, s in zip(flats, self.strides)]
        return self._views

    def snapshot(self, variables: list[Any]) -> Any:
        """The current samples, copied into one vector (concatenating copies)."""
        return self._ops.cat(self.take(variables))

    def nbytes(self) -> int:
        """Bytes held between steps (the start-of-fit copy)."""
        return 4 * sum(self.sizes) if self.enabled else 0
