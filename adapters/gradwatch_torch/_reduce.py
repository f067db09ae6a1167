"""Per-tensor reductions of many tensors in a few kernels: norms, max |x|, non-zero counts, dots.

torch's foreach kernels are fused on CUDA; on CPU they loop over the tensors, one ATen call
(about 2 µs) each, which is most of gradwatch's cost on a model of thousands of small tensors.
There, small tensors of one shape are stacked into one ``[k, n]`` block, and small 1-D tensors of
one dtype concatenated into another, and each block is reduced at once; everything else still
goes through foreach, exactly as on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

#: Dtypes that ``torch._foreach_norm(..., dtype=float32)`` refuses (it will not narrow them):
#: their norms are taken in their own precision and cast.
WIDE = (torch.float64, torch.complex64, torch.complex128)
#: CPU tensors up to this many elements go into blocks; a larger one costs more to copy than
#: its own kernel launch (and blocks are transient copies: they stay small).
BLOCK_MAX_NUMEL = 4096
#: A block costs a few fixed kernels: worth it from this many tensors on.
BLOCK_MIN_TENSORS = 8


#: The largest finite float32: where a finite norm beyond float32's range is stored.
F32_MAX = torch.finfo(torch.float32).max


def narrow(norms: torch.Tensor) -> torch.Tensor:
    """Norms summed in float64, as float32. A finite norm beyond float32's range (finite elements
    around 1e19 and up: their squares overflow float32) saturates at :data:`F32_MAX`, a huge
    number for the exploding-gradient detector; only NaN/Inf, which only non-finite elements
    give, stay non-finite."""
    if norms.dtype is torch.float32:
        return norms
    return torch.where(norms.isinf(), norms, norms.clamp(max=F32_MAX)).float()


#: On the CPU, norms are summed in float32 first and again in float64 only when one came out
#: non-finite; the check reads one CPU scalar per reduction (no device transfer: the tensors are
#: on the host already). Elsewhere the float64 sum is taken at once, without a read.
FLOAT32_FIRST_ON_CPU = True


def foreach_norm64(tensors: Sequence[torch.Tensor], ord: float = 2,
                   wide: bool = False) -> list[torch.Tensor]:
    """Per-tensor norms that never read as Inf for a finite tensor: summed in float64
    (``torch._foreach_norm(..., dtype=float32)`` squares and sums in float32: 100 elements of
    1e20 give Inf), or on the CPU in float32 when every float32 norm came out finite. ``wide``
    when some tensor is float64/complex (they are taken in their own precision:
    ``_foreach_norm`` will not narrow complex128). Pass them through :func:`narrow` once
    stacked."""
    tensors = list(tensors)
    if wide or ord == 0 or math.isinf(ord):  # counts and max |x| cannot overflow
        return list(torch._foreach_norm(tensors, ord))
    if (FLOAT32_FIRST_ON_CPU and tensors and tensors[0].device.type == "cpu"
            and tensors[-1].device.type == "cpu"):
        # On the CPU float64 sums cost 4x float32's (196 vs 46 us a step on the 4x256 MLP) and
        # reading a flag costs no device sync: float32 first, float64 only if a sum overflowed
        # (or an element is NaN/Inf, which float64 leaves as it is). The sum is finite only if
        # every norm is (8 us; isfinite().all() takes 16).
        norms = list(torch._foreach_norm(tensors, ord))
        if math.isfinite(float(torch.stack(norms).sum())):
            return norms
    return list(torch._foreach_norm(tensors, ord, dtype=torch.float64))


class Block(NamedTuple):
    """Tensors reduced together: one shape stacked (``lengths`` is None) or 1-D concatenated."""

    #: Positions of the members in the plan's tensor list, ascending.
    members: list[int]
    #: Elements per member (a CPU tensor) for a concatenated block; None for a stacked one.
    lengths: torch.Tensor | None


def sum_float(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the precision its sums of squares and products are taken in: float64, so that
    finite elements never overflow (a block is a transient copy of small tensors: cheap)."""
    return x.double()


def _blockable(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.layout == torch.strided and t.dtype.is_floating_point
            and 0 < t.numel() <= BLOCK_MAX_NUMEL)


class ReducePlan:
    """How one list of tensors is reduced, fixed while the tensors keep their dtype, shape,
    device and layout. Every reduction returns a float32 vector ``[T]`` on ``device``, in the
    list's order.

    Args:
        tensors: The tensors (or tensors like them: only their metadata is read).
        device: Where the results go (the watcher's device).
    """

    def __init__(self, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
        by_shape: dict[tuple, list[int]] = {}
        rest: list[int] = []
        for i, t in enumerate(tensors):
            if _blockable(t):
                by_shape.setdefault((t.dtype, tuple(t.shape)), []).append(i)
            else:
                rest.append(i)
        blocks: list[Block] = []
        joinable: dict[torch.dtype, list[int]] = {}
        for (dtype, shape), members in by_shape.items():
            if len(members) >= BLOCK_MIN_TENSORS:
                blocks.append(Block(members, None))
            elif len(shape) == 1:
                joinable.setdefault(dtype, []).extend(members)
            else:
                rest.extend(members)
        for members in joinable.values():
            if len(members) >= BLOCK_MIN_TENSORS:
                members.sort()
                blocks.append(Block(members, torch.tensor([tensors[i].numel() for i in members])))
            else:
                rest.extend(members)
        rest.sort()
        #: The blocks, then ``rest``: the tensors reduced one by one (foreach).
        self.blocks = blocks
        self.rest = rest
        self.device = device
        self.size = len(tensors)
        self.wide = any(tensors[i].dtype in WIDE for i in rest)
        self.one_device = all(t.device == device for t in tensors)
        # Where each part's results go in the list's order (None: the part is the whole list).
        parts = [b.members for b in blocks] + ([rest] if rest else [])
        self._places: list[torch.Tensor] | None = None
        self._order: torch.Tensor | None = None
        if len(parts) > 1 or (parts and parts[0] != list(range(len(tensors)))):
            self._places = [torch.tensor(members, dtype=torch.long, device=device)
                            for members in parts]
            self._order = torch.cat(self._places)

    # -- the pieces -----------------------------------------------------------------------------

    @staticmethod
    def data(block: Block, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block's copy of its members: ``[k, n]`` stacked, or ``[N]`` concatenated."""
        members = [tensors[i] for i in block.members]
        if block.lengths is None:
            return torch.stack(members).reshape(len(members), -1)
        return torch.cat(members)

    @staticmethod
    def member_sum(block: Block, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Per member: the sum (or ``"max"``) of ``x``, laid out like the block's data."""
        if block.lengths is None:
            return x.sum(dim=1) if reduce == "sum" else x.amax(dim=1)
        # unsafe: the lengths are right by construction (no check, no sync)
        return torch.segment_reduce(x, reduce, lengths=block.lengths, unsafe=True)

    def combine(self, parts: list[torch.Tensor],
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-block results and then the rest's, back in the list's order (into ``out``)."""
        parts = [p if p.dtype is torch.float32 else p.float() for p in parts]
        if not self.one_device:
            parts = [p.to(self.device) for p in parts]
        if self._places is None:
            whole = parts[0] if parts else torch.zeros(0, device=self.device)
            return whole if out is None else out.copy_(whole)
        if out is None:
            out = torch.empty(self.size, device=self.device)
        for places, part in zip(self._places, parts):
            out.index_copy_(0, places, part)
        return out

    def reorder(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor results in block order (every block's members, then the rest), back in
        the list's order."""
        values = values.float().to(self.device)
        if self._order is None:
            return values
        return torch.empty(self.size, device=self.device).index_copy_(0, self._order, values)

    def _stack(self, values: list[torch.Tensor]) -> torch.Tensor:
        if not self.one_device:
            values = [v.to(self.device) for v in values]
        return torch.stack(values)

    def copies(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every block's copy of its members. A list of tensors reduced several ways (norms and
        dots, say) is copied once: pass the copies to each reduction."""
        return [self.data(b, tensors) for b in self.blocks]

    # -- reductions -----------------------------------------------------------------------------

    def norms(self, tensors: Sequence[torch.Tensor], ord: float = 2,
              out: torch.Tensor | None = None,
              copies: list[torch.Tensor] | None = None) -> torch.Tensor:
        """L2 norms (or ``ord=0``: non-zero counts) of ``tensors`` ``[T]``, into ``out`` when
        given."""
        if not self.blocks:  # no block: one foreach call, as on CUDA
            norms = foreach_norm64(tensors, ord, self.wide)
            result = (narrow(self._stack(norms)) if norms
                      else torch.zeros(0, device=self.device))
            return result if out is None else out.copy_(result)
        parts = []
        for b, x in zip(self.blocks, self.copies(tensors) if copies is None else copies):
            if ord == 0:
                parts.append(torch.count_nonzero(x, dim=1) if b.lengths is None
                             else self.member_sum(b, (x != 0).float()))
            elif b.lengths is None:  # one kernel for the whole block
                parts.append(narrow(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)))
            else:
                parts.append(narrow(self.member_sum(b, sum_float(x).square()).sqrt()))
        if self.rest:
            rest = [tensors[i] for i in self.rest]
            parts.append(narrow(self._stack(foreach_norm64(rest, ord, self.wide))))
        return self.combine(parts, out)

    def max_abs(self, tensors: Sequence[torch.Tensor],
                copies: list[torch.Tensor] | None = None) -> torch.Tensor:
        """max |x| per tensor ``[T]`` (0 for an empty tensor)."""
        parts = [self.member_sum(b, x.abs(), reduce="max")
                 for b, x in zip(self.blocks, self.copies(tensors) if copies is None else copies)]
        if self.rest:
            out = torch.zeros(len(self.rest), device=self.device)
            rest = [(k, tensors[i]) for k, i in enumerate(self.rest) if tensors[i].numel()]
            if rest:
                values = [t for _, t in rest]
                if self.device.type == "cpu":
                    # On CPU the inf-norm kernel is ~10x slower than aminmax and abs() would
                    # copy every tensor; aminmax reads each once, allocation-free.
                    lo_hi = [torch.aminmax(t) for t in values]
                    gmax = torch.maximum(self._stack([a for a, _ in lo_hi]).float().abs(),
                                         self._stack([b for _, b in lo_hi]).float().abs())
                else:
                    gmax = self._stack(foreach_norm64(values, math.inf, self.wide)).float()
                out.index_copy_(0, torch.tensor([k for k, _ in rest], device=self.device),
                                gmax)
            parts.append(out)
        return self.combine(parts)

    def dots(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor],
             copies_a: list[torch.Tensor] | None = None,
             copies_b: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``a_t . b_t`` per tensor ``[T]``; NaN where the two cannot be multiplied (a sparse
        tensor, another shape or dtype)."""
        copies_a = self.copies(a) if copies_a is None else copies_a
        copies_b = self.copies(b) if copies_b is None else copies_b
        # Summed in float64, then narrowed by ``combine``: a dot beyond float32's range reads
        # Inf, "unknown" to the core (a saturated dot would skew ||g||'s component along W).
        parts = [self.member_sum(blk, sum_float(x) * sum_float(y))
                 for blk, x, y in zip(self.blocks, copies_a, copies_b)]
        if self.rest:
            keep, dots = [], []
            for k, i in enumerate(self.rest):
                x, y = a[i], b[i]
                if x.is_sparse or y.is_sparse or x.shape != y.shape or x.dtype != y.dtype:
                    continue
                # In the tensor's own precision: a float64 copy of every tensor at each check
                # costs more than it buys. A dot that overflows there (a finite gradient of
                # 1e20 against weights of 1e19) reads Inf, which the core takes as "unknown"
                # (the norm is kept whole), never as a non-finite gradient.
                dots.append(torch.dot(x.reshape(-1), y.reshape(-1)))
                keep.append(k)
            values = self._stack(dots).float() if dots else None
            if len(keep) == len(self.rest):
                parts.append(values)
            else:
                out = torch.full((len(self.rest),), math.nan, device=self.device)
                if values is not None:
                    out.index_copy_(0, torch.tensor(keep, device=self.device), values)
                parts.append(out)
        return self.combine(parts)
