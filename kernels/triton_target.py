"""The GPU a Triton launch is built for: compute capability and per-block shared memory.

Launch configurations (tile sizes, stages) depend on the target GPU: an Ada card (sm_89) gives a
block 99 KB of shared memory where Hopper (sm_90) gives 227 KB. The wrappers ask
:func:`capability` for the device of their inputs and pick tiles that fit
:func:`shared_memory_limit`. :func:`assume` makes every wrapper plan for a given GPU while the
inputs live elsewhere: the ahead-of-time compile test records the launches of each
architecture on CPU tensors this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

# opt-in shared memory per block (bytes), from the CUDA programming guide's table of
# technical specifications per compute capability
_SHARED_MEMORY = {
    (7, 0): 98304, (7, 5): 65536,
    (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376,
    (9, 0): 232448, (10, 0): 232448, (12, 0): 101376,
}
_ASSUMED: ContextVar[tuple[int, int] | None] = ContextVar("aa_triton_target", default=None)


def capability(device: torch.device) -> tuple[int, int] | None:
    """``(major, minor)`` of the GPU the launch targets: the assumed one inside
    :func:`assume`, else the CUDA ``device``'s; None for any other device (the interpreter)."""
    assumed = _ASSUMED.get()
    if assumed is not None:
        return assumed
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return None


def is_gpu_launch(device: torch.device) -> bool:
    """Whether the launch is compiled for a GPU (a CUDA device, or one assumed), rather than run
    by the Triton interpreter."""
    return capability(device) is not None


def shared_memory_limit(cc: tuple[int, int]) -> int:
    """Bytes of shared memory one block may use on compute capability ``cc`` (opt-in maximum);
    unknown capabilities get the smallest limit of their major version's known ones."""
    if cc in _SHARED_MEMORY:
        return _SHARED_MEMORY[cc]
    same_major = [v for (major, _), v in _SHARED_MEMORY.items() if major == cc[0]]
    return min(same_major) if same_major else min(_SHARED_MEMORY.values())


@contextlib.contextmanager
def assume(cc: tuple[int, int]) -> Iterator[None]:
    """Plan every launch inside the block for compute capability ``cc``, whatever the device
    of the inputs (for ahead-of-time compilation without that GPU)."""
    if (not isinstance(cc, (tuple, list)) or len(cc) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in cc)):
        raise ValueError(f"cc must be (major, minor) ints, e.g. (9, 0), got {cc!r}")
    token = _ASSUMED.set(tuple(cc))
    try:
        yield
    finally:
        _ASSUMED.reset(token)
