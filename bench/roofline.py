"""How far a GPU workload is from its device's limit: the roofline column of the report.

Each kernel workload declares the `Work` of one timed call per case (a small function beside
its case: DRAM bytes an ideal kernel must move, and floating-point operations with the
precision of the units that run them). The report divides by the median time and holds the
result against the device's peak, looked up by ``torch.cuda.get_device_name()`` in `PEAKS`:
the larger of the two shares is the one the roofline model says binds, and the column shows it.
Off the GPU, for an unknown GPU, or without declared work the column is "—".

Peaks are the vendor's data-sheet figures (``docs/gpu.md`` names the sources): HBM bandwidth,
and dense tensor-core FLOP/s (the data sheets print the 2:4-sparse figure, twice the dense
one); ``fp32`` is the non-tensor-core FP32 rate (Triton's ``input_precision="ieee"`` float32
dot runs there).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

PRECISIONS = ("fp8", "bf16", "fp16", "tf32", "fp32")
TERA = 1e12


@dataclasses.dataclass(frozen=True)
class Work:
    """What one timed call must do at least: ``bytes`` read and written in device memory
    (each input element read once, each output written once), ``flops`` (a multiply-add is
    2) on units of ``precision`` (one of `PRECISIONS`; needed when ``flops`` is given)."""

    bytes: int = 0
    flops: int = 0
    precision: str | None = None

    def __post_init__(self) -> None:
        if self.bytes < 0 or self.flops < 0:
            raise ValueError(f"Work: bytes and flops must be >= 0, got {self.bytes}, {self.flops}")
        if self.flops and self.precision not in PRECISIONS:
            raise ValueError(f"Work: flops need a precision, one of {PRECISIONS}; got "
                             f"{self.precision!r}")

    def __add__(self, other: Work) -> Work:
        if self.flops and other.flops and self.precision != other.precision:
            raise ValueError(f"Work: cannot add {self.precision} and {other.precision} flops")
        return Work(self.bytes + other.bytes, self.flops + other.flops,
                    self.precision or other.precision)


@dataclasses.dataclass(frozen=True)
class Peak:
    """A GPU's peak HBM bandwidth (bytes/s) and dense FLOP/s per precision."""

    bandwidth: float
    flops: Mapping[str, float]
    source: str


def _dense(sparse_tflops: float) -> float:
    return sparse_tflops / 2 * TERA


#: ``torch.cuda.get_device_name()`` -> peaks (data sheets: see docs/gpu.md)
PEAKS: dict[str, Peak] = {
    "NVIDIA H100 80GB HBM3": Peak(  # H100 SXM5
        3.35 * TERA,
        {"fp8": _dense(3958), "bf16": _dense(1979), "fp16": _dense(1979), "tf32": _dense(989),
         "fp32": 67 * TERA},
        "NVIDIA H100 Tensor Core GPU data sheet, H100 SXM column"),
    "NVIDIA H100 NVL": Peak(
        3.9 * TERA,
        {"fp8": _dense(3341), "bf16": _dense(1671), "fp16": _dense(1671), "tf32": _dense(835),
         "fp32": 60 * TERA},
        "NVIDIA H100 Tensor Core GPU data sheet, H100 NVL column"),
    "NVIDIA H100 PCIe": Peak(
        2.0 * TERA,
        {"fp8": _dense(3026), "bf16": _dense(1513), "fp16": _dense(1513), "tf32": _dense(756),
         "fp32": 51 * TERA},
        "NVIDIA H100 Tensor Core GPU data sheet, H100 PCIe column"),
    "NVIDIA H200": Peak(  # H200 SXM
        4.8 * TERA,
        {"fp8": _dense(3958), "bf16": _dense(1979), "fp16": _dense(1979), "tf32": _dense(989),
         "fp32": 67 * TERA},
        "NVIDIA H200 Tensor Core GPU data sheet, H200 SXM column"),
    "NVIDIA H200 NVL": Peak(
        4.8 * TERA,
        {"fp8": _dense(3341), "bf16": _dense(1671), "fp16": _dense(1671), "tf32": _dense(835),
         "fp32": 60 * TERA},
        "NVIDIA H200 Tensor Core GPU data sheet, H200 NVL column"),
}


def peak_for(device_name: str | None) -> Peak | None:
    """The peaks of a GPU by its ``torch.cuda.get_device_name()``, None if not in `PEAKS`."""
    return PEAKS.get((device_name or "").strip())


def precision_of(dtype: str) -> str:
    """The tensor-core precision a matmul in ``dtype`` (``"bfloat16"``...) runs at."""
    names = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32",
             "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}
    if dtype not in names:
        raise ValueError(f"precision_of: no peak precision for dtype {dtype!r}; "
                         f"known: {sorted(names)}")
    return names[dtype]


@dataclasses.dataclass(frozen=True)
class Attained:
    """Achieved rate and its share of the peak, for the limit that binds."""

    rate: float  # bytes/s or FLOP/s
    share: float  # of the peak, 0..1 (can exceed 1 where caches serve repeated reads)
    unit: str  # "B/s" or "FLOP/s"
    limit: str  # "HBM" or the precision

    def __str__(self) -> str:
        share = f"{self.share:.0%}" if self.share >= 0.01 else f"{self.share:.1%}"
        return f"{three_digits(self.rate, self.unit)} {share} {self.limit}"


def three_digits(value: float, unit: str) -> str:
    """``value`` with an SI prefix and three significant digits: ``"1.68 TB/s"``."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if value >= scale or scale == 1.0:
            v = value / scale
            decimals = 0 if v >= 100 else 1 if v >= 10 else 2
            return f"{v:.{decimals}f} {prefix}{unit}"
    raise AssertionError("unreachable")


def attained(work: Work, seconds: float, peak: Peak) -> Attained | None:
    """The binding share of ``work`` done in ``seconds`` on ``peak``: bandwidth or FLOP/s,
    whichever is the larger share; None when nothing was declared or timed."""
    if seconds <= 0 or not (work.bytes or work.flops):
        return None
    options = []
    if work.bytes:
        rate = work.bytes / seconds
        options.append(Attained(rate, rate / peak.bandwidth, "B/s", "HBM"))
    if work.flops and work.precision in peak.flops:
        rate = work.flops / seconds
        options.append(Attained(rate, rate / peak.flops[work.precision], "FLOP/s",
                                work.precision or ""))
    return max(options, key=lambda a: a.share) if options else None


def roofline_cell(work: Work | None, seconds: float | None, device: str,
                  device_name: str | None) -> str:
    """The report's cell: e.g. ``"2.91 TB/s 87% HBM"``; "—" off CUDA, for a GPU without known
    peaks, or without declared work."""
    if device != "cuda" or work is None or not seconds:
        return "—"
    peak = peak_for(device_name)
    result = attained(work, seconds, peak) if peak is not None else None
    return "—" if result is None else str(result)


# -- byte counts shared by the workloads ------------------------------------------------------

INDEX_BYTES = 8  # int64 indices and offsets


def itemsize(dtype: str) -> int:
    """Bytes per element of a float dtype named as the report names it (``"bfloat16"``)."""
    sizes = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1,
             "float8_e5m2": 1}
    if dtype not in sizes:
        raise ValueError(f"itemsize: unknown dtype {dtype!r}; known: {sorted(sizes)}")
    return sizes[dtype]
