"""Shared pieces of the benchmark workloads: shapes, variants, compile timing and peak memory.

The workload files (``bench/test_*.py``) stay small: a case dataclass labelled by `CaseLabels`,
a ``build`` of the callable per variant (`compile_variant` / `inference_variant` /
`training_variant` for the compiled ones), and tests that hand it to `bench_variant` with
their timed call (`inference_step`, `training_step`). `bench_variant` builds each variant once
per session (`build_once`) and calls `run_benchmark`, which warms it up (timing the compile),
measures peak memory over one extra call, fills ``benchmark.extra_info`` and times the rounds
with ``benchmark.pedantic``. Timing and statistics are pytest-benchmark's.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch

from aa_compile.report import collecting
from bench.roofline import Work

#: Variants every workload has; peers (named after what they are) are added per workload.
BASE_VARIANTS = ("eager", "inductor", "aa")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the command line chose (``--quick``, ``--device``, ``--rounds``)."""

    quick: bool
    device: str
    rounds: int | None = None

    def rounds_for(self, kind: str) -> int:
        """Timed rounds: ``kind`` is ``"task"`` (a whole job such as one explanation: many
        forwards, tens of seconds on a CPU), ``"model"`` (a whole model step, up to a second
        on a CPU) or ``"op"`` (one layer or op, milliseconds)."""
        if self.rounds is not None:
            return self.rounds
        cpu, cuda_quick, cuda_full = ROUNDS[kind]
        if self.device != "cuda":
            return cpu
        return cuda_quick if self.quick else cuda_full


#: kind -> timed rounds per repeat (``--repeats``, default 5) on a CPU (``--quick`` or not), on
#: CUDA with ``--quick`` and on CUDA in the full set; a CUDA call takes milliseconds, a CPU
#: transformer step up to a second.
ROUNDS = {"task": (1, 3, 3), "model": (3, 10, 20), "op": (12, 30, 60)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class CaseLabels:
    """Base of a workload's case dataclass: its ``shape`` (the report's label) and ``id`` (the
    test id) are the class's ``SHAPE`` and ``ID`` format strings, filled in with the case's
    attributes by name (``"{tokens}x{dim}"``; class constants too) and ``{dtype}`` as the
    dtype's short name (``float32``)."""

    SHAPE: ClassVar[str]
    ID: ClassVar[str]

    @property
    def shape(self) -> str:
        return self.SHAPE.format_map(_CaseFields(self))

    @property
    def id(self) -> str:
        return self.ID.format_map(_CaseFields(self))


class _CaseFields:
    """``str.format_map`` view of a case: ``{name}`` is ``case.name``, a dtype by its name."""

    def __init__(self, case: Any):
        self.case = case

    def __getitem__(self, name: str) -> Any:
        value = getattr(self.case, name)
        return dtype_name(value) if isinstance(value, torch.dtype) else value


@dataclasses.dataclass(frozen=True)
class TransformerCase(CaseLabels):
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    batch: int
    seq: int
    dtype: torch.dtype

    SHAPE = "B{batch}xS{seq} d{d_model} L{n_layers} H{n_heads}/{n_kv_heads} V{vocab_size}"
    ID = "d{d_model}-L{n_layers}-S{seq}-{dtype}"


def transformer_cases(quick: bool, device: str) -> list[TransformerCase]:
    """Quick: a small GQA model (its inductor compile dominates the quick run on a CPU).

    Full: d=512, 8 layers, seq 512; bfloat16 on CUDA, float32 on a CPU.
    """
    if quick:
        return [TransformerCase(256, 4, 4, 2, 4096, 2, 128, torch.float32)]
    if device == "cuda":
        return [TransformerCase(512, 8, 8, 4, 32000, 8, 512, torch.bfloat16)]
    return [TransformerCase(512, 8, 8, 4, 32000, 2, 512, torch.float32)]


@dataclasses.dataclass(frozen=True)
class RMSNormCase(CaseLabels):
    tokens: int
    dim: int
    dtype: torch.dtype

    SHAPE = "{tokens}x{dim}"
    ID = "{tokens}x{dim}-{dtype}"


def rms_norm_cases(quick: bool, device: str) -> list[RMSNormCase]:
    """Quick: ``[4096, 1024]`` float32. Full: two sizes in float32 and bfloat16."""
    if quick:
        return [RMSNormCase(4096, 1024, torch.float32)]
    sizes = [(4096, 1024), (16384, 4096)] if device == "cuda" else [(4096, 1024), (8192, 4096)]
    return [RMSNormCase(t, d, dt) for dt in (torch.float32, torch.bfloat16) for t, d in sizes]


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fresh_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy, so that no two variants share parameters, grads or compiled state."""
    return copy.deepcopy(module)


_BUILT: dict[tuple, Any] = {}


def build_once(key: tuple, build: Callable[[], Any]) -> tuple[Any, bool]:
    """``(build(), True)`` the first time ``key`` is asked for in this session, then
    ``(that same object, False)``: repeats of a benchmark reuse the compiled variant."""
    if key in _BUILT:
        return _BUILT[key], False
    _BUILT[key] = built = build()
    return built, True


def compile_variant(fn: Callable, variant: str) -> Callable:
    """``fn`` as run by ``variant``: ``eager`` as is, ``inductor`` / ``aa`` through torch.compile.

    ``aa`` uses the backend's defaults (inner compiler inductor).
    """
    if variant == "eager":
        return fn
    if variant == "inductor":
        return torch.compile(fn)
    if variant == "aa":
        import aa_compile  # noqa: F401  (registers the backend)

        return torch.compile(fn, backend="aa")
    raise ValueError(f"unknown compiled variant {variant!r}")


def inference_variant(model: torch.nn.Module, variant: str) -> Callable:
    """A fresh copy of ``model`` in eval mode, run by ``variant`` (`compile_variant`): the
    callable of a whole-model forward workload."""
    return compile_variant(fresh_copy(model).eval(), variant)


def training_variant(model: torch.nn.Module, variant: str) -> tuple[Callable, torch.nn.Module]:
    """``(loss_fn, copy)`` for a whole-model training step: a fresh copy of ``model`` in train
    mode and its ``loss`` method run by ``variant``; the copy holds the gradients to clear."""
    model = fresh_copy(model).train()
    return compile_variant(model.loss, variant), model


def skip_unless_aa_op(name: str) -> None:
    """Skip the test (the ``aa_op`` peer) where ``torch.ops.aa.<name>`` is not registered."""
    if not hasattr(torch.ops.aa, name):
        pytest.skip(f"torch.ops.aa.{name} is not registered")


def inference_step(fn: Callable, *args: Any) -> Callable[[], Any]:
    """The timed call of a forward (inference) workload: ``fn(*args)`` under
    ``torch.no_grad()``."""

    def step():
        with torch.no_grad():
            return fn(*args)

    return step


def training_step(
    fn: Callable, *args: Any, grad: Any = None, clear: tuple = ()
) -> Callable[[], Any]:
    """The timed call of a forward + backward workload: ``out = fn(*args)``, backward from
    ``out`` with ``grad`` (None for a scalar loss, a tuple for a tuple of outputs, or a function
    of ``out`` giving it, run inside the timed call), then the gradients of ``clear`` (tensors,
    or modules: all their parameters) are set to None, so no round accumulates into another."""

    def step():
        out = fn(*args)
        torch.autograd.backward(out, grad(out) if callable(grad) else grad)
        for item in clear:
            if isinstance(item, torch.nn.Module):
                item.zero_grad(set_to_none=True)
            else:
                item.grad = None
        return out

    return step


def peak_memory_mib(fn: Callable[[], Any], device: str) -> float | None:
    """Peak memory of one call of ``fn``, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, i.e. the
    caching allocator's peak of live tensor bytes during the call, *including* what was already
    allocated before it (parameters, inputs).

    CPU: there is no allocator peak counter, so the call runs once under
    ``torch.profiler.profile(activities=[CPU], profile_memory=True)``. Every allocation and free
    of the CPU allocator is then a ``[memory]`` event with a signed byte count; sorted by start
    time, the running sum of those counts is the net memory allocated since the call began, and
    its maximum is reported. Unlike the CUDA figure this *excludes* memory that was live before
    the call (parameters, inputs); frees of such memory can take the running sum below zero,
    which is why the peak starts at 0. Allocations outside PyTorch's allocator (e.g. scratch
    space inside oneDNN/BLAS) are not seen. Returns None if the profiler gives no events.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # pragma: no cover - profiler internals moved
        return None
    cpu = DeviceType.CPU
    allocations = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == cpu
    )
    if not allocations:
        return None
    return peak_of_running_sum(n for _, n in allocations) / 2**20


def peak_of_running_sum(sizes) -> int:
    """``max(0, max prefix sum)`` of signed allocation sizes (bytes)."""
    total = peak = 0
    for n in sizes:
        total += n
        peak = max(peak, total)
    return peak


def run_benchmark(
    benchmark,
    fn: Callable[[], Any],
    *,
    settings: Settings,
    workload: str,
    variant: str,
    shape: str,
    dtype: torch.dtype,
    kind: str,
    first: bool = True,
    work: Work | None = None,
) -> None:
    """Warm up (compile) ``fn``, record its metadata and memory, then time it.

    On CUDA ``fn`` is wrapped to synchronize after each call (see `timed`). The first call is
    timed alone and stored as ``extra_info["compile_s"]``: it triggers torch.compile's
    compilation (for eager variants it is just a first call). Then one more call is measured for
    peak memory, and ``benchmark.pedantic`` times the rounds (one more warm-up round first).
    ``first=False`` (a later repeat of an already built variant) skips compile time and memory.
    ``work`` (what one call must move and compute, `bench.roofline.Work`) goes to
    ``extra_info`` as ``bytes`` / ``flops`` / ``flop_precision``: the report's roofline column.
    """
    device = settings.device
    fn = timed(fn, device)
    info = benchmark.extra_info
    info.update(
        workload=workload,
        variant=variant,
        shape=shape,
        dtype=dtype_name(dtype),
        device=device,
    )
    if device == "cuda":
        info["device_name"] = torch.cuda.get_device_name()
    if work is not None:
        info.update(bytes=work.bytes, flops=work.flops, flop_precision=work.precision)
    benchmark.group = f"{workload} {shape} {dtype_name(dtype)}"

    if first:
        sync(device)
        start = time.perf_counter()
        with collecting() as compiled:  # the graphs the aa backend compiles in this first call
            fn()
        info["compile_s"] = round(time.perf_counter() - start, 4)
        if variant == "aa" or compiled.graphs:
            info["aa_rewrites"] = compiled.rewrites
        peak = peak_memory_mib(fn, device)
        info["peak_mib"] = None if peak is None else round(peak, 3)

    rounds = settings.rounds_for(kind)
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)


def timed(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronize on CUDA, so the timer sees the work finish."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


def bench_variant(
    benchmark,
    settings: Settings,
    case: Any,
    variant: str,
    workload: str,
    *,
    build: Callable[[], Any],
    step: Callable[[Any], Callable[[], Any]] | None = None,
    kind: str,
    shape: str | None = None,
    dtype: torch.dtype | None = None,
    warm_up: Callable[[Callable[[], Any]], None] | None = None,
    work: Work | None = None,
) -> bool:
    """The body of a workload test: ``build()`` the variant once per session (`build_once`,
    key ``(workload, case.id, variant)``), make its timed call ``step(built)`` (no ``step``:
    ``built`` is the call) and benchmark it (`run_benchmark`) under ``shape`` / ``dtype``
    (default: the case's). ``warm_up(call)``, if given, runs right after the build, before the
    benchmark. ``work``: see `run_benchmark`. Returns whether this test built the variant (its
    first repeat)."""
    built, first = build_once((workload, case.id, variant), build)
    call = built if step is None else step(built)
    if first and warm_up is not None:
        warm_up(call)
    run_benchmark(benchmark, call, settings=settings, workload=workload, variant=variant,
                  shape=case.shape if shape is None else shape,
                  dtype=case.dtype if dtype is None else dtype, kind=kind, first=first,
                  work=work)
    return first
