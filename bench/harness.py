"""Shared pieces of the benchmark workloads: shapes, variants, compile timing and peak memory.

The workload files (``bench/test_*.py``) stay small: each builds a callable per variant (with
`compile_variant` for the compiled ones) and hands it to `run_benchmark`, which warms it up
(timing the compile), measures peak memory over one extra call, fills ``benchmark.extra_info``
and times the rounds with ``benchmark.pedantic``. Timing and statistics are pytest-benchmark's.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

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
        cuda = self.device == "cuda"
        table = {
            # (kind, quick, cuda) -> rounds per repeat (``--repeats``, default 5); a CUDA call
            # takes milliseconds, a CPU transformer step up to a second.
            ("task", True, False): 1,
            ("task", False, False): 1,
            ("task", True, True): 3,
            ("task", False, True): 3,
            ("model", True, False): 3,
            ("model", False, False): 3,
            ("model", True, True): 10,
            ("model", False, True): 20,
            ("op", True, False): 12,
            ("op", False, False): 12,
            ("op", True, True): 30,
            ("op", False, True): 60,
        }
        return table[(kind, self.quick, cuda)]


@dataclasses.dataclass(frozen=True)
class TransformerCase:
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    batch: int
    seq: int
    dtype: torch.dtype

    @property
    def shape(self) -> str:
        return (
            f"B{self.batch}xS{self.seq} d{self.d_model} L{self.n_layers} "
            f"H{self.n_heads}/{self.n_kv_heads} V{self.vocab_size}"
        )

    @property
    def id(self) -> str:
        return f"d{self.d_model}-L{self.n_layers}-S{self.seq}-{dtype_name(self.dtype)}"


@dataclasses.dataclass(frozen=True)
class RMSNormCase:
    tokens: int
    dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.dim}"

    @property
    def id(self) -> str:
        return f"{self.shape}-{dtype_name(self.dtype)}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def transformer_cases(quick: bool, device: str) -> list[TransformerCase]:
    """Quick: a small GQA model (its inductor compile dominates the quick run on a CPU).

    Full: d=512, 8 layers, seq 512; bfloat16 on CUDA, float32 on a CPU.
    """
    if quick:
        return [TransformerCase(256, 4, 4, 2, 4096, 2, 128, torch.float32)]
    if device == "cuda":
        return [TransformerCase(512, 8, 8, 4, 32000, 8, 512, torch.bfloat16)]
    return [TransformerCase(512, 8, 8, 4, 32000, 2, 512, torch.float32)]


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


def variant(key: tuple, build: Callable[[], Any]) -> tuple[Any, bool]:
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


def aa_graph_count() -> int:
    import aa_compile

    return len(aa_compile.last_report().graphs)


def aa_rewrites_since(start: int) -> dict[str, int]:
    """Rewrites per pass in the graphs the ``aa`` backend compiled since ``start`` graphs."""
    import aa_compile

    return aa_compile.CompileReport(aa_compile.last_report().graphs[start:]).rewrites


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
) -> None:
    """Warm up (compile) ``fn``, record its metadata and memory, then time it.

    On CUDA ``fn`` is wrapped to synchronize after each call (see `timed`). The first call is
    timed alone and stored as ``extra_info["compile_s"]``: it triggers torch.compile's
    compilation (for eager variants it is just a first call). Then one more call is measured for
    peak memory, and ``benchmark.pedantic`` times the rounds (one more warm-up round first).
    ``first=False`` (a later repeat of an already built variant) skips compile time and memory.
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
    benchmark.group = f"{workload} {shape} {dtype_name(dtype)}"

    if first:
        graphs_before = aa_graph_count() if variant == "aa" else 0
        sync(device)
        start = time.perf_counter()
        fn()
        info["compile_s"] = round(time.perf_counter() - start, 4)
        if variant == "aa":
            info["aa_rewrites"] = aa_rewrites_since(graphs_before)
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
