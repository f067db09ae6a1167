"""What the torch watcher needs to know about wrappers, ranks and sharded (DTensor) parameters.

Nothing here runs a collective except :func:`sum_over_ranks` (one :func:`all_reduce_sum`), which
the watcher calls once per check and only when a watched parameter is sharded (FSDP2 / DTensor).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ._readout import Measured

RANKS = ("zero", "all")


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # older torch: no public DTensor
        return None
    return DTensor


#: ``torch.distributed.tensor.DTensor``, or None where torch has no distributed support.
DTensor = _dtensor_type()


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose layers are the user's: under ``torch.compile``'s ``OptimizedModule``,
    ``DistributedDataParallel`` and ``DataParallel`` (their names would otherwise gain a
    ``_orig_mod.`` or ``module.`` prefix and differ from a plain run's)."""
    wrappers: list[type] = [nn.DataParallel]
    if torch.distributed.is_available():
        from torch.nn.parallel import DistributedDataParallel

        wrappers.append(DistributedDataParallel)
    for _ in range(8):  # compile(DDP(model)), DDP(compile(model)), ...
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif isinstance(model, tuple(wrappers)) and isinstance(model.module, nn.Module):
            model = model.module
        else:
            break
    return model


def compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile``'s ``OptimizedModule`` is among the wrappers of ``model``."""
    for _ in range(8):
        if type(model).__name__ == "OptimizedModule":
            return True
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner
    return False


def module_type(module: nn.Module) -> type:
    """The user's class of a module: FSDP2's ``fully_shard`` swaps it for a subclass named
    ``FSDP<Class>`` in place; its own class is the next one in the MRO."""
    cls = type(module)
    if torch.distributed.is_available() and cls.__name__.startswith("FSDP"):
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:
            return cls
        for base in cls.__mro__[1:]:
            if not issubclass(base, FSDPModule):
                return base
    return cls


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from the default process group when it is
    initialised, else from torchrun's ``RANK``/``WORLD_SIZE`` variables, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


def rank_path(path: str | os.PathLike, rank: int) -> str:
    """``run.jsonl`` -> ``run.rank1.jsonl`` (``run`` -> ``run.rank1``): one file per rank."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    stem, ext = os.path.splitext(tail)
    return os.path.join(head, f"{stem}.rank{rank}{ext}")


def emitting(rank: int, ranks: str, options: dict[str, Any]) -> bool:
    """Whether this rank emits findings (``ranks="zero"``: rank 0 only). A rank N > 0 that
    emits writes its events to a file of its own (``run.rankN.jsonl``), one that does not writes
    none: ``options["events"]`` is changed to say so."""
    emits = rank == 0 or ranks == "all"
    events = options.get("events")
    if rank != 0 and isinstance(events, (str, os.PathLike)):
        options["events"] = rank_path(events, rank) if emits else None
    return emits


def is_sharded(tensor: Any) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Any) -> Any:
    """A DTensor's local shard (a plain tensor); anything else as it is."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor.to_local()
    return tensor


def replication(tensor: Any, world: int) -> float:
    """How many ranks of the default group hold each element of ``tensor``: summing a
    per-rank sum of squares over all ranks counts every element this many times.

    A plain tensor is replicated on every rank (DDP, or a parameter FSDP left alone); a DTensor
    on a mesh of ``m`` ranks is repeated ``world / m`` times, times the size of every mesh
    dimension it is replicated over (HSDP's replicate dimension)."""
    if not is_sharded(tensor):
        return float(world)
    from torch.distributed.tensor import Replicate

    mesh = tensor.device_mesh
    times = world / max(mesh.size(), 1)
    for dim, placement in enumerate(tensor.placements):
        if isinstance(placement, Replicate):
            times *= mesh.size(dim)
    return float(times)


def all_reduce_sum(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over every rank of the default process group, in place."""
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


def sum_over_ranks(measured: Measured, rep: torch.Tensor, sample_rep: torch.Tensor | None,
                   world: int, rank: int, detail: bool) -> Measured:
    """Sharded parameters: the ranks' per-tensor statistics of their shards become the whole
    tensors' in ONE all-reduce (sums of squares, ``rep``/``sample_rep`` making every element
    count once; max |g| by a per-rank row, maxed after).

    The buffer's layout depends only on the step and the watcher's settings, never on what this
    rank happened to see, so every rank contributes a buffer of the same size.
    """
    hist = measured.hist
    n = hist.shape[1]
    missing = torch.full((n,), math.nan, device=hist.device)

    def sq(t: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
        return t * t * scale if t is not None else missing

    blocks = {"hist": (hist * hist * rep).flatten(), "pre": sq(measured.pre, rep),
              "nonzero": (measured.grad_nonzero * rep if measured.grad_nonzero is not None
                          else missing)}
    if measured.weight is not None:
        blocks["weight"] = sq(measured.weight, rep)
    if measured.change is not None and sample_rep is not None:
        for name in ("change", "update", "before", "start"):
            blocks[name] = sq(getattr(measured, name), sample_rep)
    if detail:
        rows = torch.zeros((world, n), device=hist.device)
        rows[rank] = measured.grad_max if measured.grad_max is not None else missing
        blocks["max"] = rows.flatten()
    buf = torch.cat(list(blocks.values()))
    all_reduce_sum(buf)
    out = dict(zip(blocks, torch.split(buf, [b.numel() for b in blocks.values()])))
    has_extra = measured.grad_nonzero is not None

    def norm(name: str, kept: torch.Tensor | None) -> torch.Tensor | None:
        return out[name].sqrt() if kept is not None and name in out else None

    return Measured(
        hist=out["hist"].sqrt().reshape(hist.shape),
        grad_max=(out["max"].reshape(world, n).amax(0) if detail else measured.grad_max)
        if has_extra else None,
        grad_nonzero=out["nonzero"] if has_extra else None,
        pre=norm("pre", measured.pre), weight=norm("weight", measured.weight),
        change=norm("change", measured.change), update=norm("update", measured.update),
        before=norm("before", measured.before), start=norm("start", measured.start))
