"""Splitting embarrassingly parallel work over the ranks of a process group, and putting the
pieces back together with torch.distributed collectives.

Every function takes ``group``: a ``torch.distributed`` process group, or ``None`` for no
distribution at all (one process; the functions then do nothing but return their input), so a
task API can call them unconditionally. The split is deterministic (round robin over the item
order) and the gather restores the item order, so a distributed run returns what one process
returns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def check_group(group: Any) -> None:
    """Raise a clear error unless ``group`` is ``None`` or a process group of an initialised
    ``torch.distributed`` job."""
    if group is None:
        return
    if not dist.is_available() or not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError(
            "group was given but torch.distributed is not initialised: launch with torchrun "
            "and call torch.distributed.init_process_group() first (or pass group=None)"
        )


def rank_of(group: Any) -> int:
    """This process's rank in ``group`` (0 without a group)."""
    check_group(group)
    return 0 if group is None else dist.get_rank(group)


def world_of(group: Any) -> int:
    """The number of ranks in ``group`` (1 without a group)."""
    check_group(group)
    return 1 if group is None else dist.get_world_size(group)


def is_writer(group: Any) -> bool:
    """True on the rank that writes outputs (rank 0 of ``group``; always without a group)."""
    return rank_of(group) == 0


def owned(n_items: int, group: Any) -> list[int]:
    """Indices ``0..n_items-1`` this rank works on: every ``world``-th from its rank on."""
    if not isinstance(n_items, int) or n_items < 0:
        raise ValueError(f"n_items must be an int >= 0, got {n_items!r}")
    return list(range(rank_of(group), n_items, world_of(group)))


def gather_objects(local: T, group: Any) -> list[T]:
    """Every rank's ``local`` (picklable), in rank order, on every rank."""
    if group is None:
        return [local]
    out: list[Any] = [None] * world_of(group)
    dist.all_gather_object(out, local, group=group)
    return out


def merge_owned(local: dict[int, T], n_items: int, group: Any) -> list[T]:
    """Put the per-rank results ``{item index: result}`` of `owned` items back in item order on
    every rank; raises if an item is missing or computed twice."""
    merged: dict[int, T] = {}
    for part in gather_objects(local, group):
        for i, value in part.items():
            if i in merged:
                raise RuntimeError(f"item {i} was computed on two ranks: the ranks split the "
                                   "work differently (their inputs differ)")
            merged[i] = value
    missing = [i for i in range(n_items) if i not in merged]
    if missing:
        raise RuntimeError(f"items {missing[:5]} were computed on no rank")
    return [merged[i] for i in range(n_items)]


def fingerprint(value: Any) -> str:
    """A short hash of a JSON-able value or of tensors (their dtype, shape and bytes)."""
    h = hashlib.sha256()

    def add(v: Any) -> None:
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                add(x)
            h.update(b"]")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=str):
                add(str(k))
                add(v[k])
            h.update(b"}")
        else:
            h.update(json.dumps(v, default=repr).encode())

    add(value)
    return h.hexdigest()[:16]


def check_same(what: str, value: Any, group: Any) -> None:
    """Raise on every rank if ``value`` (settings, inputs) differs between the ranks of
    ``group``: a distributed run only equals a one-process run when every rank asks the same."""
    if group is None:
        return
    prints = gather_objects(fingerprint(value), group)
    if len(set(prints)) > 1:
        odd = [r for r, p in enumerate(prints) if p != prints[0]]
        raise ValueError(
            f"{what} differ across ranks (ranks {odd} disagree with rank 0): every rank must "
            f"call with the same {what} (same seed, same data, same arguments)"
        )


def check_close(what: str, tensor: Tensor, group: Any, rtol: float = 1e-3,
                atol: float = 1e-5) -> None:
    """Raise on every rank if the float ``tensor`` (e.g. a model's baseline loss) differs
    between the ranks of ``group`` beyond rounding: the ranks hold different models or inputs.
    Shapes must agree (check them with `check_same` first)."""
    if group is None:
        return
    parts = gather_objects(tensor.detach().cpu().double(), group)
    odd = [r for r, t in enumerate(parts)
           if t.shape != parts[0].shape or not torch.allclose(t, parts[0], rtol=rtol, atol=atol)]
    if odd:
        raise ValueError(
            f"{what} differ across ranks (ranks {odd} disagree with rank 0): every rank must "
            "load the same model weights and pass the same inputs"
        )


def broadcast_tensor(tensor: Tensor, group: Any, src: int = 0) -> Tensor:
    """``tensor`` as rank ``src`` of ``group`` holds it (shape and dtype must agree)."""
    if group is None:
        return tensor
    out = tensor.detach().clone().contiguous()
    dist.broadcast(out, group_src=src, group=group)
    return out


def shard_batch(batch: Tensor | Sequence[T], group: Any) -> Tensor | list[T]:
    """This rank's rows of a global ``batch`` (a tensor split along dim 0, or a list of
    sequences / texts, in ``world`` equal contiguous parts), so that averaged gradients equal
    the one-process gradients of the whole batch."""
    world = world_of(group)
    n = batch.shape[0] if isinstance(batch, Tensor) else len(batch)
    if n % world:
        raise ValueError(
            f"global batch of {n} rows does not divide over {world} ranks: use a multiple of "
            f"{world} rows (equal shards keep the mean loss and gradients equal to one process)"
        )
    size, rank = n // world, rank_of(group)
    return batch[rank * size:(rank + 1) * size] if world > 1 else batch


def sum_over_ranks(tensor: Tensor, group: Any) -> Tensor:
    """Elementwise sum of ``tensor`` over the ranks (a copy; in place is avoided)."""
    if group is None:
        return tensor
    out = tensor.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out

