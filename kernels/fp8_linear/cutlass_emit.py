"""Emit an sm90a CUTLASS FP8 GEMM for `aa::fp8_linear` as a standalone ``.cu`` (optional: the
``cutlass`` extra, i.e. the ``nvidia-cutlass`` package).

The file holds an E4M3 x E4M3 -> float32-accumulate Hopper GEMM with the epilogue
``D = alpha * acc + beta * C`` behind a plain C entry point (no PyTorch headers)::

    extern "C" int aa_fp8_gemm_sm90(int M, int N, int K, const void* A, const void* B,
                                     const void* C, void* D, float alpha, float beta,
                                     void* stream);

The op does not dispatch to it yet; ``tests/test_fp8_cutlass.py`` compiles it with ``nvcc``.
Layouts, the static-scaling ``alpha`` and planning without a GPU: ``docs/fp8.md``.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

_log = logging.getLogger(__name__)

_ENTRY = r"""
// ---- aa-compile entry point (written by aa_compile.kernels.fp8_linear.cutlass_emit) ----
#include <cuda_runtime.h>

extern "C" int aa_fp8_gemm_sm90(int M, int N, int K, const void* A, const void* B,
                                const void* C, void* D, float alpha, float beta,
                                void* stream) {
  using GemmKernel = typename DeviceKernel::GemmKernel;
  using ElementA = typename DeviceKernel::ElementA;
  using ElementB = typename DeviceKernel::ElementB;
  using ElementC = typename DeviceKernel::ElementC;
  using ElementD = typename DeviceKernel::ElementD;
  using Compute = typename DeviceKernel::EpilogueOutputOp::ElementCompute;
  auto sa = cutlass::make_cute_packed_stride(typename GemmKernel::StrideA{},
                                             cute::make_shape(M, K, 1));
  auto sb = cutlass::make_cute_packed_stride(typename GemmKernel::StrideB{},
                                             cute::make_shape(N, K, 1));
  auto sc = cutlass::make_cute_packed_stride(typename GemmKernel::StrideC{},
                                             cute::make_shape(M, N, 1));
  auto sd = cutlass::make_cute_packed_stride(typename GemmKernel::StrideD{},
                                             cute::make_shape(M, N, 1));
  cutlass::KernelHardwareInfo hw;
  cudaGetDevice(&hw.device_id);
  hw.sm_count = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(hw.device_id);
  typename DeviceKernel::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const ElementA*>(A), sa, static_cast<const ElementB*>(B), sb},
      {{Compute(alpha), Compute(beta)},
       static_cast<const ElementC*>(C), sc, static_cast<ElementD*>(D), sd},
      hw};
  DeviceKernel gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
  size_t workspace_bytes = DeviceKernel::get_workspace_size(args);
  void* workspace = nullptr;
  if (workspace_bytes && cudaMalloc(&workspace, workspace_bytes) != cudaSuccess) return 2;
  cutlass::Status status = gemm.run(args, workspace, static_cast<cudaStream_t>(stream));
  if (workspace) cudaFree(workspace);
  return status == cutlass::Status::kSuccess ? 0 : 3;
}
"""

_INCLUDES = """\
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cute/tensor.hpp"

using namespace cute;
"""


def interface() -> ModuleType | None:
    """The CUTLASS Python interface module, or None when the extra is not installed."""
    for name in ("cutlass_cppgen", "cutlass"):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - absent, or a broken CUDA binding
            _log.debug("CUTLASS interface %s not importable: %s", name, e)
            continue
        if hasattr(mod, "op") and hasattr(mod.op, "Gemm"):
            return mod
    return None


def include_dirs() -> list[Path]:
    """CUTLASS C++ header folders shipped with the Python package (``include``,
    ``tools/util/include``)."""
    import cutlass_library

    root = Path(cutlass_library.__file__).parent / "source"
    return [root / "include", root / "tools" / "util" / "include"]


def _no_gpu_setup(mod: ModuleType, cc: int) -> None:
    """Let the interface plan for ``cc`` without a visible GPU (it probes the device to pick
    the kernel options it offers, and nvcc's version for the generator)."""
    if getattr(mod, "_option_registry", None) is not None:
        return
    try:
        mod.device_cc()
        return
    except Exception as e:  # noqa: BLE001 - no driver / no device: plan for cc instead
        _log.debug("no CUDA device for CUTLASS (%s); planning for sm_%d", e, cc)
    mod._nvcc_version = mod.nvcc_version()
    mod._option_registry = mod.OptionRegistry(cc)


def emit_fp8_gemm(out_dir: str | os.PathLike, out_dtype: str = "bf16", cc: int = 90) -> Path:
    """Write ``aa_fp8_gemm_sm90_<out_dtype>.cu`` into ``out_dir`` and return its path.

    ``out_dtype``: ``"bf16"``, ``"f16"`` or ``"f32"`` (C and D element type). Raises
    RuntimeError when the CUTLASS Python interface is not installed.
    """
    mod = interface()
    if mod is None:
        raise RuntimeError("the CUTLASS Python interface is not installed: "
                           "pip install aa-compile[cutlass] (nvidia-cutlass)")
    from cutlass_library import DataType, LayoutType

    out_types = {"bf16": DataType.bf16, "f16": DataType.f16, "f32": DataType.f32}
    if out_dtype not in out_types:
        raise ValueError(f"out_dtype must be one of {sorted(out_types)}, got {out_dtype!r}")
    _no_gpu_setup(mod, cc)
    plan = mod.op.Gemm(
        element_A=DataType.e4m3, element_B=DataType.e4m3,
        element_C=out_types[out_dtype], element_D=out_types[out_dtype],
        element_accumulator=DataType.f32,
        layout_A=LayoutType.RowMajor, layout_B=LayoutType.ColumnMajor,
        layout_C=LayoutType.RowMajor, cc=cc, kernel_cc=cc,
    )
    # 16-byte (TMA) alignment of every operand: 16 FP8 values, 8 bf16/f16, 4 f32 outputs. A
    # tile is chosen here: without one the planner resets C's alignment to that of a
    # profiler kernel (1), which the sm90 TMA epilogue rejects.
    tiles = plan.tile_descriptions()
    if not tiles:
        raise RuntimeError(f"CUTLASS offers no FP8 GEMM tile for sm_{cc}")
    op = plan.construct(tile_description=tiles[0], alignment_A=16, alignment_B=16,
                        alignment_C=4 if out_dtype == "f32" else 8)
    source = (
        f"// CUTLASS {op.procedural_name()}\n"
        "// FP8 E4M3 x E4M3, float32 accumulation, epilogue D = alpha * acc + beta * C\n"
        + _INCLUDES + "\n" + op.rt_module.emit() + "\n"
        + "using DeviceKernel = cutlass::gemm::device::GemmUniversalAdapter<"
        + f"{op.procedural_name()}_type>;\n" + _ENTRY
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"aa_fp8_gemm_sm{cc}_{out_dtype}.cu"
    path.write_text(source)
    return path


def nvcc_command(cu: Path, obj: Path, cc: int = 90) -> list[str]:
    """The ``nvcc`` line that compiles an emitted file to an object for ``sm_<cc>a``."""
    flags = ["-std=c++17", "-O2", f"-gencode=arch=compute_{cc}a,code=sm_{cc}a",
             "--expt-relaxed-constexpr", "-DNDEBUG"]
    incs = [f"-I{p}" for p in include_dirs()]
    return ["nvcc", *flags, *incs, "-c", str(cu), "-o", str(obj)]
