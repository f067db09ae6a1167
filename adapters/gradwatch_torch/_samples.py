"""Update-ratio samples: a fixed strided sample of every parameter, kept from the start of the run
and copied once more before the optimizer step of each check, so that update ratios and the weight
change since the start are measured without a copy of the model.

The sample of a tensor of ``n`` elements is ``w.reshape(-1)[::stride]`` (a prime stride, see
``gradwatch.kit.sample_stride``). Sampled, every tensor's sample goes into one flat vector: the
small tensors of a :class:`ReducePlan` block from the block's copy (one slice or one gather for
all of them), the others through views made once and renewed when a parameter's storage is
replaced (``p.data = ...``); per-tensor norms are then segment sums, a handful of kernels whatever
the number of tensors. ``exact`` keeps whole tensors and goes one tensor at a time, so that the
transient is the largest tensor, not one more copy of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gradwatch import kit

from ._reduce import ReducePlan, foreach_norm64, narrow, sum_float

Sample = torch.Tensor | list[torch.Tensor]
"""Every tensor's sample: one flat vector, in the plan's block order (sampled), or one tensor
each (exact)."""


class UpdateSamples:
    """The samples and the norms made of them at a check.

    Args:
        weights: The parameters (a sharded one's local shard).
        plan: How they are reduced (its blocks are sampled together).
        sample_fraction: Fraction of elements kept per tensor.
        exact: Keep every element (``update_ratio="exact"``).
    """

    def __init__(self, weights: Sequence[torch.Tensor], plan: ReducePlan, sample_fraction: float,
                 exact: bool) -> None:
        self._plan = plan
        numel = [w.numel() for w in weights]
        self._strides = [kit.sample_stride(n, sample_fraction, exact) for n in numel]
        kept = [len(range(0, n, s)) for n, s in zip(numel, self._strides)]
        #: Elements per sampled element, per tensor ``[T]`` (1 where the whole tensor is kept).
        self.scale = np.array([n / max(k, 1) for n, k in zip(numel, kept)], dtype=float)
        # One flat vector needs one float type and device; otherwise (and exact) tensor by tensor.
        self._flat = (not exact and len({(w.dtype, w.device) for w in weights}) == 1
                      and all(w.layout == torch.strided and w.dtype.is_floating_point
                              for w in weights))
        order = [i for b in plan.blocks for i in b.members] + plan.rest
        self._lengths = torch.tensor([kept[i] for i in order], dtype=torch.long,
                                     device=weights[0].device if weights else None)
        self._gather: list[torch.Tensor | None] = []  # per block: None (stacked: one stride)
        for block in plan.blocks:
            index, start = [], 0
            for i in block.members:
                index.extend(range(start, start + numel[i], self._strides[i]))
                start += numel[i]
            self._gather.append(None if block.lengths is None else torch.tensor(index))
        self._views: list[torch.Tensor] = []
        self._storage: list[int] = []
        with torch.no_grad():
            self._w0 = self._copy(self.take(weights))
            #: Norm of each tensor's start-of-run sample ``[T]`` (device).
            self.w0_norm = self._norms(self._w0)
        self._snapshot: Sample | None = None

    def _rest_views(self, weights: Sequence[torch.Tensor], rest: list[int]) -> list[torch.Tensor]:
        tensors = [weights[i] for i in rest]
        storage = [w.data_ptr() if w.is_contiguous() else -1 for w in tensors]
        if storage != self._storage or -1 in storage:
            # A parameter's storage was replaced (``p.data = ...``), or a view cannot be kept
            # (a non-contiguous tensor's reshape is a copy): sample it afresh.
            self._views = [w.detach().reshape(-1)[::self._strides[i]]
                           for i, w in zip(rest, tensors)]
            self._storage = storage
        return self._views

    def take(self, weights: Sequence[torch.Tensor],
             copies: list[torch.Tensor] | None = None) -> Sample:
        """The weights' samples now: a flat copy (from the plan's ``copies`` of the weights when
        given), or (exact) views of the parameters."""
        if not self._flat:
            return list(self._rest_views(weights, list(range(len(weights)))))
        parts = []
        copies = self._plan.copies(weights) if copies is None else copies
        for block, gather, data in zip(self._plan.blocks, self._gather, copies):
            if gather is None:
                parts.append(data[:, ::self._strides[block.members[0]]].reshape(-1))
            else:
                parts.append(data[gather])
        parts.extend(self._rest_views(weights, self._plan.rest))
        return torch.cat(parts)

    @staticmethod
    def _copy(sample: Sample) -> Sample:
        return sample if isinstance(sample, torch.Tensor) else [v.clone() for v in sample]

    def _stacked(self, norms: list[torch.Tensor]) -> torch.Tensor:
        if not norms:
            return torch.zeros(0, device=self._plan.device)
        return torch.stack([n.to(self._plan.device) for n in norms])

    def _norms(self, sample: Sample) -> torch.Tensor:
        if isinstance(sample, torch.Tensor):
            # unsafe: the lengths are right by construction (no check, no sync)
            # float64: a sample is ~2% of the weights, and finite weights must not read as Inf
            sums = torch.segment_reduce(sum_float(sample).square(), "sum",
                                        lengths=self._lengths, unsafe=True)
            return self._plan.reorder(narrow(sums.sqrt()))
        return narrow(self._stacked(foreach_norm64(sample, 2, self._plan.wide)))

    def _diff_norms(self, a: Sample, b: Sample, in_place: bool = False) -> torch.Tensor:
        """||a - b|| per tensor; ``in_place`` overwrites ``a`` (no third copy)."""
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return self._norms(a.sub_(b) if in_place else a - b)
        assert isinstance(a, list) and isinstance(b, list)
        if in_place:
            torch._foreach_sub_(a, b)
            return self._norms(a)
        # One tensor at a time: the transient is the largest tensor, not a copy of the model.
        return narrow(self._stacked([torch.linalg.vector_norm(x - y, dtype=torch.float64)
                                     if x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                     else torch.linalg.vector_norm(x - y) for x, y in zip(a, b)]))

    def snapshot(self, weights: Sequence[torch.Tensor]) -> None:
        """Just before the optimizer step of a check: the weights the update starts from."""
        with torch.no_grad():
            self._snapshot = self._copy(self.take(weights))

    def measure(self, weights: Sequence[torch.Tensor], copies: list[torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """After the step, per tensor: ||W - W_start||, and when a snapshot was taken
        ||W - W_before|| and ||W_before|| (sampled); the snapshot is used up."""
        with torch.no_grad():
            now = self.take(weights, copies)
            change = self._diff_norms(now, self._w0)
            snap, self._snapshot = self._snapshot, None
            if snap is None:
                return change, None, None
            before = self._norms(snap)
            return change, self._diff_norms(snap, now, in_place=True), before

    def held_bytes(self) -> int:
        """Bytes held between steps: the start-of-run sample."""
        w0 = [self._w0] if isinstance(self._w0, torch.Tensor) else self._w0
        return sum(t.numel() * t.element_size() for t in w0)

    def clear(self) -> None:
        self._w0 = []
        self._snapshot = None
        self._views, self._storage = [], []
