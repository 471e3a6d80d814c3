"""How an `aa::` op registers its kernels, samples and decompositions, and the list `OPS`.

An op module defines its op with ``torch.library.custom_op`` (the body serves devices without a
kernel of their own), then calls `register_kernels` (per-device kernels through torch.library's
``register_kernel``), `register_samples` (inputs for opcheck) and, where inductor should
generate the code itself, `register_decompositions`; `register_onnx` records its ONNX
translation or why it has none (``aa_compile.export``). `collect` builds `OPS` from what was
registered for every op the dispatcher knows in the ``aa`` namespace; one without samples is
left out, and ``tests/test_ops.py`` fails for it, so opcheck covers every op.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch._library.custom_ops import OPDEFS, CustomOpDef

Sample = tuple[tuple[Any, ...], dict[str, Any]]
NAMESPACE = "aa"

_KERNELS: dict[str, dict[str, Callable]] = {}
_SAMPLES: dict[str, Callable[[str], Iterator[Sample]]] = {}
_DECOMPOSITIONS: dict[str, Callable[[], dict]] = {}
_INSTALLED: set[str] = set()


def _qualname(op: CustomOpDef | str) -> str:
    return op if isinstance(op, str) else f"{op._namespace}::{op._name}"


def kernel_name(fn: Callable) -> str:
    """``module:function`` of a kernel: what `aa-compile info` shows and the cache key hashes."""
    return f"{fn.__module__}:{fn.__qualname__}"


def register_kernels(op: CustomOpDef | str, *, check: Callable | None = None,
                     **kernels: Callable) -> None:
    """``torch.library.register_kernel(op, device, fn)`` for each ``device=fn``, and a record
    of it. ``op`` is a ``custom_op`` or the qualified name of an op defined with a schema.
    ``check``, called with the op's arguments before every kernel, holds the argument checks
    that all devices share (the op's body and fake impl call it too)."""
    record = _KERNELS.setdefault(_qualname(op), {})
    for device, fn in kernels.items():
        if device in record:
            raise ValueError(f"{_qualname(op)} has a {device} kernel already: {record[device]}")
        run = fn if check is None else _checked(check, fn)
        torch.library.register_kernel(op, device, run)
        record[device] = fn


def _checked(check: Callable, kernel: Callable) -> Callable:
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        check(*args, **kwargs)
        return kernel(*args, **kwargs)

    return run


def triton_kernel(module: str, name: str, fallback: Callable | None = None) -> Callable:
    """A kernel that imports the Triton module ``module`` on its first call, so that importing
    the op imports no Triton. Without Triton installed it runs ``fallback`` (or raises)."""

    @functools.cache
    def load() -> Callable | None:
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            return None

    def run(*args, **kwargs):
        fn = load()
        if fn is not None:
            return fn(*args, **kwargs)
        if fallback is None:
            raise RuntimeError(f"{module}.{name} needs Triton: pip install aa-compile[triton]")
        return fallback(*args, **kwargs)

    run.__module__, run.__qualname__ = module, name
    return run


def register_samples(op: CustomOpDef | str, samples: Callable[[str], Iterator[Sample]]) -> None:
    """``samples(device)`` yields ``(args, kwargs)`` on which opcheck runs the op."""
    _SAMPLES[_qualname(op)] = samples


def register_decompositions(op: CustomOpDef | str, decompositions: Callable[[], dict]) -> None:
    """``decompositions()`` returns ``{OpOverload: fn}`` for inductor's table: inductor then
    generates the op's code itself where that beats an opaque kernel call (each fn may decline
    with ``NotImplemented``, e.g. on devices with a kernel of their own)."""
    _DECOMPOSITIONS[_qualname(op)] = decompositions


@dataclasses.dataclass(frozen=True)
class OpEntry:
    """One `aa::` op as registered.

    Attributes:
        name: qualified name, e.g. ``"aa::rms_norm"``.
        op: the ``torch.ops.aa.<name>`` packet.
        kernels: device type -> ``module.function`` of its kernel; ``"default"`` is the op's
            own body (devices without a kernel).
        samples: ``samples(device)`` yields ``(args, kwargs)`` for opcheck.
        decompositions: see `register_decompositions`, or None.
    """

    name: str
    op: Any
    kernels: dict[str, str]
    samples: Callable[[str], Iterator[Sample]]
    decompositions: Callable[[], dict] | None = None


def defined_ops() -> list[str]:
    """Every op the dispatcher knows in the ``aa`` namespace, however it was defined."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted({n for n in names if n.startswith(NAMESPACE + "::")})


def collect() -> dict[str, OpEntry]:
    """Every op of `defined_ops` that registered samples, with its registered kernels."""
    ops = {}
    for name in defined_ops():
        if name not in _SAMPLES:
            continue  # tests/test_ops.py fails for it: every op needs opcheck samples
        opdef = OPDEFS.get(name)
        kernels = {"default": kernel_name(opdef._init_fn)} if opdef is not None else {}
        kernels.update({d: kernel_name(fn) for d, fn in _KERNELS.get(name, {}).items()})
        short = name.split("::", 1)[1]
        ops[name] = OpEntry(name=name, op=getattr(torch.ops.aa, short), kernels=kernels,
                            samples=_SAMPLES[name], decompositions=_DECOMPOSITIONS.get(name))
    return ops


def source_hash() -> bytes:
    """A hash of the source of every op module and every module their kernels live in.

    Inductor's FX-graph cache key does not see the decompositions we install globally (nor
    the kernels they call), so the backend feeds this hash into the key (see
    ``aa_compile.backend``): changed op or kernel code never reuses stale compiled graphs.
    """
    h = hashlib.sha256()
    modules = {name for name in sys.modules if name.startswith("aa_compile.ops.")}
    for entry in collect().values():
        modules.update(k.split(":")[0] for k in entry.kernels.values())
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)  # reads the file; imports nothing new
        h.update(name.encode() + b"\0")
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            with open(spec.origin, "rb") as f:
                h.update(f.read())
    return h.digest()


def install_inductor_decompositions() -> None:
    """Add every op's decompositions to inductor's table (once each), for every inductor
    compile; the ``aa`` backend calls this before it hands a graph to inductor.

    Passing them per compile (``compile_fx(decompositions=...)``) would put an unpicklable
    table into inductor's FX-graph cache key and turn that cache off, so they go into the
    global table, as inductor's own decompositions do.
    """
    from torch._inductor import decomposition  # lazy: importing inductor loads dynamo, Triton

    new = [name for name in _DECOMPOSITIONS if name not in _INSTALLED]
    for name in new:
        decomposition.decompositions.update(_DECOMPOSITIONS[name]())
        _INSTALLED.add(name)
    if new:
        decomposition.fast_random_decomps.cache_clear()  # a cached copy of the table


# ONNX export ---------------------------------------------------------------------------------

_ONNX: dict[str, "OnnxExport"] = {}


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """How `aa_compile.export.onnx` writes one op: ``translation`` is ``"module:function"`` of
    an onnxscript translation (imported only when exporting: onnx is an optional extra), or
    None with ``reason`` saying why the op has none and what to do instead."""

    translation: str | None
    reason: str | None

    def load(self) -> Callable:
        """The translation function (imports its module, and with it onnxscript)."""
        if self.translation is None:
            raise ValueError(f"no ONNX translation: {self.reason}")
        module, name = self.translation.split(":", 1)
        return getattr(importlib.import_module(module), name)


#: the reason every ``aa::*_backward`` op gives: an exported graph is an inference graph
TRAINING_ONLY = "training-only: backward ops never appear in an exported inference graph"


def register_onnx(op: CustomOpDef | str, translation: str | None = None, *,
                  reason: str | None = None) -> None:
    """Record how ``op`` exports to ONNX: ``translation`` is ``"module:function"`` of an
    onnxscript function taking the op's arguments (living beside the op's kernels, in
    ``kernels/<op>/onnx_translation.py``), or give ``reason`` (why none, and the way out).
    ``tests/test_onnx_ops.py`` fails for an op with neither."""
    name = _qualname(op)
    if (translation is None) == (reason is None):
        raise ValueError(f"register_onnx({name}): give exactly one of translation= "
                         f"(\"module:function\") or reason=")
    if translation is not None and translation.count(":") != 1:
        raise ValueError(f"register_onnx({name}): translation must be \"module:function\", "
                         f"got {translation!r}")
    if name in _ONNX:
        raise ValueError(f"{name} has an ONNX export registered already: {_ONNX[name]}")
    _ONNX[name] = OnnxExport(translation=translation, reason=reason)


def onnx_exports() -> dict[str, OnnxExport]:
    """Every op's registered ONNX export (translation or reason), by qualified name."""
    return dict(_ONNX)
