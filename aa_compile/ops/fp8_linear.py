"""`aa::fp8_linear`: FP8 linear layer (E4M3 operands, E5M2 gradients) with static (unit) or
dynamic scaling, forward and backward.

    aa::fp8_linear(Tensor x, Tensor w, Tensor? bias=None, str scaling="static",
                   float x_scale=1.0, float w_scale=1.0, float out_scale=1.0,
                   float grad_scale=1.0, float? grad_x_mult=None, float? grad_w_mult=None)
        -> Tensor
    aa::fp8_linear_backward(Tensor grad, Tensor x, Tensor w, str scaling, float x_scale,
                            float w_scale, float grad_scale, float grad_x_mult,
                            float grad_w_mult, bool need_x, bool need_w, bool need_bias)
        -> (Tensor, Tensor, Tensor)

``y = out_scale * dq(e4m3(x * sx)) @ dq(e4m3(w * sw))^T + bias`` in ``x.dtype``, ``K`` and ``N``
multiples of 16; the backward is the straight-through gradient with ``grad`` in E5M2 (an empty
tensor for each gradient not needed). Numerics: ``kernels/fp8_linear/reference.py``. Kernels:
CPU ``kernels/fp8_linear/cpu.py``, CUDA sm_89+ ``kernels/fp8_linear/triton_kernel.py``; other
devices are refused. Scalings, non-finite input (`CHECK_FINITE`), `saturation_stats` and the
kernels' design: ``docs/fp8.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os

import torch
from torch import Tensor

from aa_compile.kernels.fp8_linear import compose, cpu, reference

from .registry import (TRAINING_ONLY, register_kernels, register_onnx, register_samples,
                       triton_kernel)

OP = "aa::fp8_linear"
BACKWARD_OP = "aa::fp8_linear_backward"
_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_TRITON = "aa_compile.kernels.fp8_linear.triton_kernel"

#: Raise ValueError on NaN/Inf in x, w or grad (a reduction and a device sync per call).
CHECK_FINITE: bool = os.environ.get("AA_FP8_CHECK_FINITE", "0").strip().lower() not in (
    "", "0", "false", "no", "off")


@dataclasses.dataclass
class SaturationStats:
    """Saturated-element counts per operand, summed over the calls inside the context."""

    counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"x": 0, "w": 0, "grad": 0})
    calls: int = 0


_STATS: list[SaturationStats] = []


@contextlib.contextmanager
def saturation_stats():
    """Count FP8 saturation of every `aa::fp8_linear` call (forward and backward) inside."""
    stats = SaturationStats()
    _STATS.append(stats)
    try:
        yield stats
    finally:
        _STATS.remove(stats)


def _count(name: str, t: Tensor, fmt, scaling: str, static_scale: float) -> None:
    if not _STATS or t.numel() == 0:
        return
    s = reference.quant_scale(t.reshape(-1, t.shape[-1]), fmt, scaling, static_scale)
    n = int(reference.saturated(t.reshape(-1, t.shape[-1]), fmt, s))
    for stats in _STATS:
        stats.counts[name] += n


def _check_finite(op: str, **tensors: Tensor | None) -> None:
    if not CHECK_FINITE:
        return
    for name, t in tensors.items():
        if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: {name} contains NaN or Inf (CHECK_FINITE is on); FP8 "
                             "would turn it into NaN outputs")


def _check_scale(op: str, name: str, value: float, scaling: str, quant: bool) -> None:
    if not math.isfinite(value) or (quant and value <= 0):
        kind = "a finite number > 0" if quant else "finite"
        raise ValueError(f"{op}: {name} must be {kind}, got {value}")
    if quant and scaling != "static" and value != 1.0:
        raise ValueError(f"{op}: {name}={value} is only used with scaling='static'; "
                         f"scaling={scaling!r} computes it from the amax (leave it 1.0)")


def _check_operands(op: str, x: Tensor, w: Tensor, bias: Tensor | None, scaling: str) -> None:
    if scaling not in reference.SCALINGS:
        raise ValueError(f"{op}: scaling must be one of {reference.SCALINGS}, got {scaling!r}")
    for name, t in (("x", x), ("w", w)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype not in _FLOAT:
            raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16, got "
                             f"{t.dtype}; cast it (float64 has no FP8 path)")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but x is on {x.device}")
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    if x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: x must have shape [..., K] with K = w.shape[1] = "
                         f"{w.shape[1]}, got {tuple(x.shape)}")
    n, k = w.shape
    for dim, size, what in (("K", k, "in_features (x.shape[-1], w.shape[1])"),
                            ("N", n, "out_features (w.shape[0])")):
        if size == 0 or size % 16:
            pad = max(16, -(-size // 16) * 16)
            raise ValueError(f"{op}: {dim} = {size}: FP8 GEMMs need {what} to be a positive "
                             f"multiple of 16; pad it to {pad} with zeros")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{op}: bias must have shape ({n},), got {tuple(bias.shape)}")


def check_device(op: str, device: torch.device) -> None:
    """ValueError unless ``device`` has an FP8 kernel: cpu, or cuda with compute capability
    >= 8.9."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"{op}: no FP8 kernel for device {device}; use cpu or cuda (sm_89+)")
    problem = compose.cuda_capability_problem(device)
    if problem is not None:
        raise ValueError(f"{op}: {problem}")


def check(x, w, bias=None, scaling="static", x_scale=1.0, w_scale=1.0, out_scale=1.0,
          grad_scale=1.0, grad_x_mult=None, grad_w_mult=None) -> None:
    """The forward's argument checks (every device, the fake impl too)."""
    _check_operands(OP, x, w, bias, scaling)
    _check_scale(OP, "x_scale", x_scale, scaling, True)
    _check_scale(OP, "w_scale", w_scale, scaling, True)
    _check_scale(OP, "grad_scale", grad_scale, scaling, True)
    _check_scale(OP, "out_scale", out_scale, scaling, False)


def check_backward(grad, x, w, scaling, x_scale, w_scale, grad_scale, *_) -> None:
    """The backward op's argument checks (every device, the fake impl too)."""
    _check_operands(BACKWARD_OP, x, w, None, scaling)
    for name, v in (("x_scale", x_scale), ("w_scale", w_scale), ("grad_scale", grad_scale)):
        _check_scale(BACKWARD_OP, name, v, scaling, True)
    want = (*x.shape[:-1], w.shape[0])
    if tuple(grad.shape) != want:
        raise ValueError(f"{BACKWARD_OP}: grad must have shape {want}, got {tuple(grad.shape)}")
    if grad.dtype not in _FLOAT or grad.device != x.device:
        raise ValueError(f"{BACKWARD_OP}: grad must be a float32/bfloat16/float16 tensor on "
                         f"{x.device}, got {grad.dtype} on {grad.device}")


def _before_forward(x, w, bias=None, scaling="static", x_scale=1.0, w_scale=1.0, out_scale=1.0,
                    grad_scale=1.0, grad_x_mult=None, grad_w_mult=None) -> None:
    """What every forward kernel runs first: `check`, `CHECK_FINITE` and `saturation_stats`."""
    check(x, w, bias, scaling, x_scale, w_scale, out_scale, grad_scale)
    _check_finite(OP, x=x, w=w)
    _count("x", x, reference.E4M3, scaling, x_scale)
    _count("w", w, reference.E4M3, scaling, w_scale)
    for stats in _STATS:
        stats.calls += 1


def _before_backward(grad, x, w, scaling, x_scale, w_scale, grad_scale, *_) -> None:
    """What every backward kernel runs first: `check_backward`, `CHECK_FINITE`, the stats."""
    check_backward(grad, x, w, scaling, x_scale, w_scale, grad_scale)
    _check_finite(BACKWARD_OP, grad=grad)
    _count("grad", grad, reference.E5M2, scaling, grad_scale)


@torch.library.custom_op("aa::fp8_linear", mutates_args=())
def fp8_linear(
    x: Tensor,
    w: Tensor,
    bias: Tensor | None = None,
    scaling: str = "static",
    x_scale: float = 1.0,
    w_scale: float = 1.0,
    out_scale: float = 1.0,
    grad_scale: float = 1.0,
    grad_x_mult: float | None = None,
    grad_w_mult: float | None = None,
) -> Tensor:
    """Devices without an FP8 kernel (neither cpu nor cuda): refused."""
    check(x, w, bias, scaling, x_scale, w_scale, out_scale, grad_scale)
    check_device(OP, x.device)
    raise ValueError(f"{OP}: no FP8 kernel registered for device {x.device}")


@fp8_linear.register_fake
def _(x, w, bias=None, scaling="static", x_scale=1.0, w_scale=1.0, out_scale=1.0,
      grad_scale=1.0, grad_x_mult=None, grad_w_mult=None):
    check(x, w, bias, scaling, x_scale, w_scale, out_scale, grad_scale)
    return x.new_empty(*x.shape[:-1], w.shape[0])


@torch.library.custom_op("aa::fp8_linear_backward", mutates_args=())
def fp8_linear_backward(
    grad: Tensor,
    x: Tensor,
    w: Tensor,
    scaling: str,
    x_scale: float,
    w_scale: float,
    grad_scale: float,
    grad_x_mult: float,
    grad_w_mult: float,
    need_x: bool,
    need_w: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Devices without an FP8 kernel (neither cpu nor cuda): refused."""
    check_backward(grad, x, w, scaling, x_scale, w_scale, grad_scale)
    check_device(BACKWARD_OP, x.device)
    raise ValueError(f"{BACKWARD_OP}: no FP8 kernel registered for device {x.device}")


@fp8_linear_backward.register_fake
def _(grad, x, w, scaling, x_scale, w_scale, grad_scale, grad_x_mult, grad_w_mult, need_x,
      need_w, need_bias):
    check_backward(grad, x, w, scaling, x_scale, w_scale, grad_scale)
    dx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    dw = w.new_empty(w.shape) if need_w else x.new_empty(0)
    db = grad.new_empty(w.shape[0], dtype=torch.float32) if need_bias else x.new_empty(0)
    return dx, dw, db


_triton_gemm = triton_kernel(_TRITON, "gemm_nt")


def _cpu_forward(x, w, bias=None, scaling="static", x_scale=1.0, w_scale=1.0, out_scale=1.0,
                 grad_scale=1.0, grad_x_mult=None, grad_w_mult=None):
    return compose.forward(cpu.gemm_nt, x, w, bias, scaling, x_scale, w_scale, out_scale)


def _cpu_backward(grad, x, w, *args):
    return compose.backward(cpu.gemm_nt, grad, x, w, *args)


def _cuda_forward(x, w, bias=None, scaling="static", x_scale=1.0, w_scale=1.0, out_scale=1.0,
                  grad_scale=1.0, grad_x_mult=None, grad_w_mult=None):
    """Triton on sm_89+ (other GPUs are refused)."""
    check_device(OP, x.device)
    return compose.forward(_triton_gemm, x, w, bias, scaling, x_scale, w_scale, out_scale)


def _cuda_backward(grad, x, w, *args):
    check_device(BACKWARD_OP, x.device)
    return compose.backward(_triton_gemm, grad, x, w, *args)


register_kernels(fp8_linear, check=_before_forward, cpu=_cpu_forward, cuda=_cuda_forward)
register_kernels(fp8_linear_backward, check=_before_backward, cpu=_cpu_backward,
                 cuda=_cuda_backward)


def _setup_context(ctx, inputs, output):
    x, w, bias, scaling, x_scale, w_scale, out_scale, grad_scale, gx, gw = inputs
    ctx.save_for_backward(x, w)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.args = (scaling, x_scale, w_scale, grad_scale,
                out_scale if gx is None else gx, out_scale if gw is None else gw)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = (tuple(ctx.needs_input_grad) + (False,) * 3)[:3]
    if not (need_x or need_w or need_b):
        return (None,) * 10
    dx, dw, db = torch.ops.aa.fp8_linear_backward(
        grad.contiguous(), x, w, *ctx.args, need_x, need_w, need_b)
    return (dx if need_x else None, dw if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None) + (None,) * 7


fp8_linear.register_autograd(_backward, setup_context=_setup_context)


def _samples(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=False):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(grad)

    yield (randn(5, 32, grad=True), randn(16, 32, grad=True)), {}
    yield (randn(2, 3, 32, dtype=torch.bfloat16, grad=True),
           randn(48, 32, dtype=torch.bfloat16, grad=True), randn(48, grad=True)), {
        "scaling": "tensorwise", "out_scale": 32 ** -0.5}
    yield (randn(4, 16, grad=True), randn(32, 16), None, "rowwise"), {}
    yield (randn(0, 16, grad=True), randn(16, 16, grad=True)), {"scaling": "static",
                                                                 "x_scale": 2.0,
                                                                 "grad_w_mult": 0.5}


def _backward_samples(device: str):
    for args, kwargs in _samples(device):
        x, w = args[0].detach(), args[1].detach()
        scaling = kwargs.get("scaling", args[3] if len(args) > 3 else "static")
        grad = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype).to(device)
        yield (grad, x, w, scaling, 1.0, 1.0, 1.0, 0.25, 0.5, True, True, True), {}
        yield (grad, x, w, scaling, 1.0, 1.0, 1.0, 1.0, 1.0, False, True, False), {}


register_samples(fp8_linear, _samples)
register_samples(fp8_linear_backward, _backward_samples)

register_onnx(fp8_linear, reason=(
    "FP8 GEMM: ONNX opset 18 and onnxruntime on CPU have no float8 matmul; way out: "
    "export without the fp8 option (the linears stay float32/bfloat16 ops), or serve "
    "through inner_compiler='tensorrt' on an FP8 GPU"))
register_onnx(fp8_linear_backward, reason=TRAINING_ONLY)
