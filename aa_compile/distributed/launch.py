"""`run_local`: run a function on ``world_size`` local processes joined in a gloo process group;
`init_from_env`: join the job ``torchrun`` started, if any.

For tests, notebooks and the documentation's examples on one machine: the processes come from
``torch.multiprocessing`` (spawned, so CUDA and threads start clean), the group from a file
store in a temporary directory (no ports), and each rank's return value comes back to the
caller in rank order. Real jobs launch with ``torchrun`` instead (``docs/distributed.md``).
"""

from __future__ import annotations

import contextlib

import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., Any], world_size: int, store_path: str,
           out_dir: str, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        result = fn(*args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its connections down while another still uses them
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any,
              threads_per_rank: int = 1) -> list[Any]:
    """``[fn(*args) on rank 0, ..., on rank world_size-1]``, each inside an initialised gloo
    process group of ``world_size`` local processes.

    ``fn`` must be importable by name (a module-level function) and its arguments and result
    picklable with ``torch.save``. A failure on any rank raises here with that rank's traceback.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if dist.is_initialized():
        raise RuntimeError("run_local starts process groups of its own: call it from a process "
                           "that has none (not from inside a torchrun job)")
    with tempfile.TemporaryDirectory(prefix="aa_dist_") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(fn, world_size, store, tmp, threads_per_rank, args),
                 nprocs=world_size, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)]


def init_from_env(backend: str | None = None) -> dist.ProcessGroup | None:
    """The world group of the job ``torchrun`` started (its ``WORLD_SIZE`` environment variable
    above 1), initialising the default process group first if needed (``backend``: default
    gloo, or nccl where CUDA is available); None when the process runs alone. What a command
    line calls so that it splits its work under ``torchrun`` and runs as before without."""
    if dist.is_initialized():
        return dist.group.WORLD
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return None
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return dist.group.WORLD


@contextlib.contextmanager
def torchrun_group(backend: str | None = None) -> Iterator[dist.ProcessGroup | None]:
    """`init_from_env` for a command line: yields the world group under ``torchrun`` (None when
    run alone) and, if it initialised the process group, tears it down at the end after a
    barrier, so that no rank closes its connections while another still uses them."""
    owner = not dist.is_initialized()
    group = init_from_env(backend)
    try:
        yield group
    finally:
        if group is not None and owner and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
