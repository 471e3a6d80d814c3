"""The list of `aa::` ops: one entry per op with where its kernels live and sample inputs.

Tests walk this list to run `torch.library.opcheck` on every op, so a new op is covered the
moment it is registered here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

Sample = tuple[tuple[Any, ...], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """One `aa::` op.

    Attributes:
        name: qualified name, e.g. ``"aa::rms_norm"``.
        op: the ``torch.ops.aa.<name>`` packet.
        kernels: device type -> module that implements it (for docs and error messages).
        samples: ``samples(device)`` yields ``(args, kwargs)`` for opcheck.
        decompositions: ``() -> {OpOverload: fn}`` handed to inductor so that it generates the
            op's code itself where that beats an opaque kernel call (each fn may decline with
            ``NotImplemented``, e.g. for devices that have a kernel of their own).
    """

    name: str
    op: Any
    kernels: dict[str, str]
    samples: Callable[[str], Iterator[Sample]]
    decompositions: Callable[[], dict] | None = None


def source_hash() -> bytes:
    """A hash of the source of every op module and every kernel module in `OPS`.

    Inductor's FX-graph cache key does not see the decompositions we install globally (nor
    the kernels they call), so the backend feeds this hash into the key (see
    ``aa_compile.backend``): changed op or kernel code never reuses stale compiled graphs.
    """
    import hashlib
    import importlib.util
    import sys

    h = hashlib.sha256()
    modules = {name for name in sys.modules if name.startswith("aa_compile.ops.")}
    for entry in OPS.values():
        modules.update(entry.kernels.values())
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)  # reads the file; imports nothing new
        h.update(name.encode() + b"\0")
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, "rb") as f:
                h.update(f.read())
    return h.digest()


def install_inductor_decompositions() -> None:
    """Add every op's decompositions to inductor's table, for every inductor compile.

    Passing them per compile (``compile_fx(decompositions=...)``) would put an unpicklable
    table into inductor's FX-graph cache key and turn that cache off, so they go into the
    global table, as inductor's own decompositions do.
    """
    from torch._inductor import decomposition

    for entry in OPS.values():
        if entry.decompositions is not None:
            decomposition.decompositions.update(entry.decompositions())
    decomposition.fast_random_decomps.cache_clear()  # a cached copy of the table


OPS: dict[str, OpEntry] = {}


def register(entry: OpEntry) -> OpEntry:
    if entry.name in OPS:
        raise ValueError(f"aa op {entry.name} is registered twice")
    OPS[entry.name] = entry
    return entry
