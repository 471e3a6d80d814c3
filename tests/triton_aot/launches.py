"""Record the Triton launches a library call makes for an assumed GPU, without a GPU.

Inside `recording(cc)` the library plans every launch for compute capability ``cc``
(``kernels/triton_target.assume``), Triton sees a stand-in driver whose current target is that
GPU, and Triton's JIT cache hook (``knobs.runtime.jit_cache_hook``, called before a launch
compiles) stores the launch's specialization (signature, constexprs, alignment attributes,
options: what Triton itself would compile) and tells Triton to skip it: nothing compiles and
nothing runs, so outputs stay uninitialised. The calls go through each op's registered CUDA
kernel (``torch.library.get_kernel(op, "CUDA")``): the same argument checks, dtype routing and
wrappers a CUDA tensor would meet, on CPU tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver

from aa_compile.kernels import triton_target

#: What an op says when it refuses an architecture (e.g. FP8 below sm_89): such a call is
#: recorded as refused, any other exception is an error of the case.
REFUSAL = re.compile(r"compute capability|\bsm_?\d{2,3}\b", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: ``kernel`` is ``module:function`` of the ``@triton.jit``
    function, ``spec`` Triton's specialization data (JSON) for compute capability ``cc``."""

    case: str
    cc: int
    kernel: str
    spec: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Recorded:
    """The launches of one case on one architecture, or why the op refused it."""

    case: str
    cc: int
    launches: tuple[Launch, ...] = ()
    refused: str | None = None


class _AssumedGPU(DriverBase):
    """A Triton driver for a GPU that is not there: enough for ``JITFunction.run`` to bind its
    arguments and reach the cache hook (which then stops the launch). The device index is the
    compute capability, so Triton keeps one binder (and target) per architecture."""

    def __init__(self, cc: int):
        super().__init__()
        self.cc = cc

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("no host launcher is built for an assumed GPU")

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.cc, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_current_device(self) -> int:
        return self.cc

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_benchmarker(self) -> Callable[..., Any]:
        """An autotuner's benchmark: the launch is recorded (every config it keeps), the time is
        the same for all."""

        def bench(kernel_call: Callable[[], Any], quantiles: Any = None, **_: Any) -> Any:
            kernel_call()
            return [1.0] * len(quantiles) if quantiles else 1.0

        return bench


def kernel_name(jit_fn: triton.JITFunction) -> str:
    """``module:function`` of a ``@triton.jit`` function."""
    return f"{jit_fn.fn.__module__}:{jit_fn.fn.__qualname__}"


@contextlib.contextmanager
def recording(cc: int) -> Iterator[list[tuple[triton.JITFunction, str]]]:
    """Inside: Triton launches are planned for compute capability ``cc`` (e.g. 90) and
    appended to the yielded list as ``(jit function, specialization JSON)`` instead of
    running."""
    if knobs.runtime.interpret or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("recording needs compiled Triton: unset TRITON_INTERPRET (the "
                           "interpreter never reaches the JIT cache hook)")
    seen: list[tuple[triton.JITFunction, str]] = []

    def hook(*, fn: Any, compile: dict[str, Any], **_: Any) -> bool:
        seen.append((fn.jit_function, compile["specialization_data"]))
        return True  # skip the compile, and so the launch

    previous_hook = knobs.runtime.jit_cache_hook
    driver.set_active(_AssumedGPU(cc))
    knobs.runtime.jit_cache_hook = hook
    try:
        with triton_target.assume((cc // 10, cc % 10)):
            yield seen
    finally:
        knobs.runtime.jit_cache_hook = previous_hook
        driver.set_active(None)  # back to lazy: the machine's own driver on first use


def cuda_kernel(op: str) -> Callable[..., Any]:
    """The kernel the dispatcher runs for ``op`` (``"aa::rms_norm"``) on a CUDA tensor,
    argument checks included, callable with the op's arguments on any tensors."""
    kernel = torch.library.get_kernel(op, "CUDA")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args: kernel.call_boxed(keys, *args)


def record(case: str, cc: int, call: Callable[[], Any]) -> Recorded:
    """Run ``call`` (a library call on CPU tensors) inside `recording` and return its
    launches; a refusal of the architecture (`REFUSAL`) is returned, any other error raised."""
    with recording(cc) as seen:
        try:
            call()
        except (ValueError, RuntimeError, NotImplementedError) as e:
            if not REFUSAL.search(str(e)):
                raise
            return Recorded(case, cc, refused=f"{type(e).__name__}: {e}")
    launches = tuple(Launch(case, cc, kernel_name(fn), spec) for fn, spec in seen)
    return Recorded(case, cc, launches)


def spec_summary(spec: str) -> dict[str, Any]:
    """The readable part of a specialization: constexpr values by name, warps and stages."""
    data = json.loads(spec)
    names = list(data["signature"])
    constexprs = {}
    for key, value in zip(data["constant_keys"], data["constant_vals"]):
        if len(key) == 1 and key[0] < len(names):
            constexprs[names[key[0]]] = value.get("constexpr", value) if isinstance(
                value, dict) else value
    options = data["options"]
    return {"constexprs": constexprs, "num_warps": options.get("num_warps"),
            "num_stages": options.get("num_stages")}
