"""TensorRT lowering of graphs the `aa` passes rewrote (``inner_compiler="tensorrt"``).

The rewritten graph goes to torch-tensorrt's dynamo backend (aot lowering to ATen, partition,
TensorRT engines for the supported parts). `aa::` ops it can express get converters registered
in torch-tensorrt's converter registry (`CONVERTERS`: RMSNorm, the int8 weight-only linear,
window attention as masked attention, HAT's guide add); every other op (`FALLBACK`) stays in
PyTorch, in a partition of its own, running its own CUDA kernel. `compile_graph` records which
`aa::` nodes went into an engine and which fell back (`TensorRTReport`, `reports`).

torch-tensorrt is an optional dependency imported here only (a wheel per torch version and
CUDA: ``torch-tensorrt==2.13.*`` for torch 2.13, CUDA 13, TensorRT 11.0); without it, or
without a CUDA device, `require` raises a `RuntimeError` naming what is missing and the way
out. ``docs/export.md`` has the details.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx as fx

from aa_compile.export.capture import aa_op_name
from aa_compile.logger import log
from aa_compile.ops import registry

try:  # optional: present on provisioned CUDA machines only
    import tensorrt as trt
    import torch_tensorrt
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter, impl
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor
except ImportError as e:
    trt = torch_tensorrt = impl = dynamo_tensorrt_converter = get_trt_tensor = None
    MISSING: str | None = e.name or "torch_tensorrt"
else:
    MISSING = None

#: `aa::` op -> how its converter builds it from TensorRT layers
CONVERTERS: dict[str, str] = {
    "aa::rms_norm": "float32 square, mean over the last axis, + eps, sqrt, divide, x weight, "
                    "cast to out_dtype",
    "aa::int8_linear": "int8 weight constant, per-output-channel IDequantizeLayer (axis 0), "
                       "matrix multiply with x (TensorRT's weight-only int8 GEMM), + bias",
    "aa::window_attention": "IAttentionLayer (scaled dot-product attention) with a boolean "
                            "[T, T] mask: causal window and same document (documents from the "
                            "CSR offsets); only where the lse output is unused",
    "aa::guide_add": "word of every byte from the CSR offsets (counted comparisons), gather "
                     "of the guide vectors, add",
    "aa::guide_add_rms_norm": "guide add as above, then the RMSNorm layers",
}

#: `aa::` op (forward ops) -> why it runs in PyTorch (its CUDA kernel) instead
FALLBACK: dict[str, str] = {
    "aa::word_pool": "ragged per-word attention: no TensorRT layer; PyTorch runs its kernel",
    "aa::trigram_bag": "segment-sum embedding bag: no TensorRT layer",
    "aa::trigram_bag_cpu": "CPU op: never on a TensorRT device",
    "aa::hashed_trigram_bag": "splitmix64 hashing on uint64: no TensorRT integer layer",
    "aa::tfree_words_to_csr": "data-dependent CSR build (sort by word): runs in PyTorch",
    "aa::csr_offsets": "data-dependent CSR build: runs in PyTorch",
    "aa::dictionary_score": "sparse gather-add scoring with top-k: runs in PyTorch",
    "aa::fp8_linear": "dynamically scaled FP8 GEMM (amax per call): runs its own kernel",
    "aa::sae_encode": "top-k sparse encoder with a custom backward: runs in PyTorch",
    "aa::sae_decode": "sparse gather decoder: runs in PyTorch",
    "aa::atman_attention": "used only while aa_compile.atman.explain runs: runs in PyTorch",
}

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class TensorRTReport:
    """What `compile_graph` did with one graph's `aa::` ops.

    Attributes:
        converted: op -> nodes that went into a TensorRT engine.
        fallback: op -> nodes that run in PyTorch (no converter, declined, or a partition
            torch-tensorrt kept out of TensorRT).
        engines: the TensorRT engines (partitions) built; 0 when the whole graph fell back.
    """

    converted: dict[str, int]
    fallback: dict[str, int]
    engines: int

    def __str__(self) -> str:
        return (f"TensorRT: {self.engines} engine(s); aa:: ops converted {self.converted or '{}'}"
                f", in PyTorch {self.fallback or '{}'}")


_REPORTS: list[TensorRTReport] = []
_REGISTERED: list[str] = []


def reports() -> list[TensorRTReport]:
    """The `TensorRTReport` of every graph compiled so far, oldest first."""
    return list(_REPORTS)


def require(example_inputs: list | None = None) -> None:
    """Raise a `RuntimeError` naming what is missing for the TensorRT path: torch-tensorrt (or
    TensorRT), a CUDA device, inputs on it."""
    if MISSING is not None:
        raise RuntimeError(
            f"aa: inner_compiler='tensorrt' needs torch-tensorrt, which is not installed "
            f"(import of {MISSING} failed). Install the wheel built for this torch "
            f"({torch.__version__}): pip install 'torch-tensorrt=={_torch_minor()}.*' on a "
            "machine with an NVIDIA GPU and CUDA 13 (docs/export.md); or use "
            "inner_compiler='inductor'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "aa: inner_compiler='tensorrt' needs a CUDA device and none is visible "
            "(torch.cuda.is_available() is False); run on an NVIDIA GPU or use "
            "inner_compiler='inductor'")
    on_cpu = [i for i, t in enumerate(example_inputs or [])
              if isinstance(t, torch.Tensor) and t.device.type != "cuda"]
    if on_cpu:
        raise RuntimeError(
            f"aa: inner_compiler='tensorrt': graph inputs {on_cpu} are not on a CUDA device; "
            "move the model and its inputs to 'cuda' first")


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def aa_op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """`aa::` op -> calls in ``gm``'s own graph."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        name = aa_op_name(node.target) if node.op == "call_function" else None
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def lowering_report(before: dict[str, int], compiled: Any) -> TensorRTReport:
    """Which `aa::` nodes of a graph (``before``) ended in an engine: torch-tensorrt's
    partitioned module runs its TensorRT engines as ``_run_on_acc_*`` submodules and the rest
    as FX graphs (``_run_on_gpu_*`` and its own graph), whose `aa::` nodes fell back."""
    engines = 0
    fallback: dict[str, int] = {}
    modules = compiled.named_modules() if isinstance(compiled, torch.nn.Module) else []
    for name, module in modules:
        parts = name.split(".")
        if parts[-1].startswith("_run_on_acc"):
            engines += 1
        elif isinstance(module, fx.GraphModule) and not any(
                p.startswith("_run_on_acc") for p in parts):
            for op, calls in aa_op_counts(module).items():
                fallback[op] = fallback.get(op, 0) + calls
    if engines == 0:  # nothing converted: torch-tensorrt handed the graph back
        fallback = dict(before)
    converted = {op: calls - fallback.get(op, 0) for op, calls in before.items()
                 if calls > fallback.get(op, 0)}
    return TensorRTReport(converted=converted, fallback=fallback, engines=engines)


def compile_graph(gm: fx.GraphModule, example_inputs: list,
                  options: Mapping[str, Any] | None = None) -> Callable:
    """Lower ``gm`` (already rewritten by the passes) through torch-tensorrt's dynamo backend
    with the `aa::` converters registered; ``options``: torch-tensorrt compilation settings
    (e.g. ``{"min_block_size": 1, "enabled_precisions": {torch.float16}}``). Records and logs
    the `TensorRTReport`."""
    require(example_inputs)
    register_converters()
    before = aa_op_counts(gm)
    backend = torch._dynamo.lookup_backend("torch_tensorrt")  # registered by torch_tensorrt
    compiled = backend(gm, example_inputs, options=dict(options or {}))
    report = lowering_report(before, compiled)
    _REPORTS.append(report)
    log.info("aa: %s", report)
    return compiled


# -- converters (defined only where torch-tensorrt imports) ----------------------------------


def register_converters() -> list[str]:
    """Register the `CONVERTERS` with torch-tensorrt's converter registry (once); returns the
    ops registered."""
    require()
    if _REGISTERED:
        return list(_REGISTERED)
    for name, (convert, validate) in converter_functions().items():
        target = getattr(torch.ops.aa, name.split("::", 1)[1]).default
        dynamo_tensorrt_converter(target, capability_validator=validate,
                                  supports_dynamic_shapes=True)(convert)
        _REGISTERED.append(name)
    return list(_REGISTERED)


def _dtype_of(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _float_input(node: fx.Node, settings: Any = None) -> bool:
    return _dtype_of(node.args[0]) in _FLOATS


def _lse_unused(node: fx.Node, settings: Any = None) -> bool:
    """Window attention converts to IAttentionLayer, which gives no log-sum-exp."""
    return _float_input(node) and all(
        user.target is operator.getitem and user.args[1] == 0 for user in node.users)


def _rms_norm_layers(ctx: Any, target: Any, name: str, x: Any, weight: Any, eps: float,
                     out_dtype: Any) -> Any:
    xf = impl.cast.to_copy(ctx, target, None, f"{name}_f32", x, torch.float32)
    square = impl.elementwise.mul(ctx, target, None, f"{name}_sq", xf, xf)
    mean = impl.reduce.mean(ctx, target, None, f"{name}_mean", square, -1, True)
    root = impl.unary.sqrt(ctx, target, None, f"{name}_sqrt",
                           impl.elementwise.add(ctx, target, None, f"{name}_eps", mean,
                                                float(eps)))
    y = impl.elementwise.div(ctx, target, None, f"{name}_div", xf, root)
    if weight is not None:
        w = impl.cast.to_copy(ctx, target, None, f"{name}_w32", weight, torch.float32)
        y = impl.elementwise.mul(ctx, target, None, f"{name}_scale", y, w)
    dtype = out_dtype if out_dtype is not None else x.dtype
    return impl.cast.to_copy(ctx, target, None, f"{name}_out", y, dtype)


def _segment_of(ctx: Any, target: Any, name: str, offsets: Any, positions: Any) -> Any:
    """``[T]`` int32: the segment of every position (how many inner CSR boundaries are at or
    below it), by comparing ``[T, 1]`` positions with ``[1, S - 1]`` boundaries."""
    if isinstance(offsets, torch.Tensor):  # a constant: slice it here
        inner = get_trt_tensor(ctx, offsets[1:-1].to(torch.int32), f"{name}_inner")
    else:
        offsets = impl.cast.to_copy(ctx, target, None, f"{name}_off32", offsets, torch.int32)
        length = impl.shape.shape(ctx, target, None, f"{name}_len", offsets, 0)
        end = impl.elementwise.sub(ctx, target, None, f"{name}_end", length, 1)
        inner = impl.slice.slice_op(ctx, target, None, f"{name}_inner", offsets, 0, 1, end, 1)
    below = impl.elementwise.ge(
        ctx, target, None, f"{name}_ge",
        impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_pos", positions, 1),
        impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_bounds", inner, 0))
    counts = impl.cast.to_copy(ctx, target, None, f"{name}_count", below, torch.int32)
    return impl.reduce.sum(ctx, target, None, f"{name}_segment", counts, 1, False)


def _positions(ctx: Any, target: Any, name: str, x: Any, dim: int) -> Any:
    length = impl.shape.shape(ctx, target, None, f"{name}_n", x, dim)
    return impl.arange.arange(ctx, target, None, f"{name}_arange", 0, length, 1)


def _convert_rms_norm(ctx, target, args, kwargs, name):
    x, weight, eps = args[0], args[1], args[2]
    out_dtype = args[3] if len(args) > 3 else kwargs.get("out_dtype")
    return _rms_norm_layers(ctx, target, name, x, weight, eps, out_dtype)


def _convert_int8_linear(ctx, target, args, kwargs, name):
    x, w_int8, scales, bias = args
    if isinstance(w_int8, torch.Tensor) and isinstance(scales, torch.Tensor):  # constants
        codes = get_trt_tensor(ctx, w_int8, f"{name}_codes")
        scale = get_trt_tensor(ctx, scales.to(torch.float32), f"{name}_scales")
        layer = ctx.net.add_dequantize(codes, scale, trt.DataType.FLOAT)
        layer.axis = 0
        weight = layer.get_output(0)
    else:  # codes arrive as engine inputs: dequantize with elementwise layers
        codes = impl.cast.to_copy(ctx, target, None, f"{name}_codes", w_int8, torch.float32)
        scale = impl.unsqueeze.unsqueeze(
            ctx, target, None, f"{name}_scale_col",
            impl.cast.to_copy(ctx, target, None, f"{name}_s32", scales, torch.float32), 1)
        weight = impl.elementwise.mul(ctx, target, None, f"{name}_deq", codes, scale)
    weight = impl.cast.to_copy(ctx, target, None, f"{name}_wcast", weight, x.dtype)
    if bias is not None:
        bias = impl.cast.to_copy(ctx, target, None, f"{name}_bias", bias, x.dtype)
    return impl.linear.linear(ctx, target, None, name, x, weight, bias)


def _convert_window_attention(ctx, target, args, kwargs, name):
    q, k, v, doc_offsets, window = args[:5]
    scale = args[5] if len(args) > 5 else kwargs.get("scale")
    pos = _positions(ctx, target, f"{name}_t", q, len(q.shape) - 2)
    dist = impl.elementwise.sub(
        ctx, target, None, f"{name}_dist",
        impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_qi", pos, 1),
        impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_kj", pos, 0))
    mask = impl.elementwise.logical_and(
        ctx, target, None, f"{name}_window",
        impl.elementwise.ge(ctx, target, None, f"{name}_causal", dist, 0),
        impl.elementwise.lt(ctx, target, None, f"{name}_near", dist, int(window)))
    if doc_offsets is not None:
        doc = _segment_of(ctx, target, f"{name}_doc", doc_offsets, pos)
        same = impl.elementwise.eq(
            ctx, target, None, f"{name}_same",
            impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_di", doc, 1),
            impl.unsqueeze.unsqueeze(ctx, target, None, f"{name}_dj", doc, 0))
        mask = impl.elementwise.logical_and(ctx, target, None, f"{name}_mask", mask, same)
    out = impl.attention.scaled_dot_product_attention(
        ctx, target, None, name, q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
        scale=scale, enable_gqa=q.shape[-3] != k.shape[-3])
    return out, out  # (out, lse): the validator admits only nodes whose lse nobody reads


def _guide_add_layers(ctx, target, name, x, g, word_offsets):
    words = _segment_of(ctx, target, f"{name}_word", word_offsets,
                        _positions(ctx, target, f"{name}_t", x, 0))
    gathered = ctx.net.add_gather(g, words, 0).get_output(0)
    return impl.elementwise.add(ctx, target, None, f"{name}_add", x, gathered)


def _convert_guide_add(ctx, target, args, kwargs, name):
    return _guide_add_layers(ctx, target, name, *args[:3])


def _convert_guide_add_rms_norm(ctx, target, args, kwargs, name):
    x, g, word_offsets, weight, eps = args[:5]
    out_dtype = args[5] if len(args) > 5 else kwargs.get("out_dtype")
    y = _guide_add_layers(ctx, target, name, x, g, word_offsets)
    return y, _rms_norm_layers(ctx, target, f"{name}_norm", y, weight, eps, out_dtype)


def converter_functions() -> dict[str, tuple[Callable, Callable]]:
    """`CONVERTERS`' ops -> (converter, capability validator)."""
    return {
        "aa::rms_norm": (_convert_rms_norm, _float_input),
        "aa::int8_linear": (_convert_int8_linear, _float_input),
        "aa::window_attention": (_convert_window_attention, _lse_unused),
        "aa::guide_add": (_convert_guide_add, _float_input),
        "aa::guide_add_rms_norm": (_convert_guide_add_rms_norm, _float_input),
    }


def coverage() -> dict[str, str]:
    """Every forward `aa::` op -> ``"converted: ..."`` or ``"PyTorch: <reason>"`` (backward ops
    never reach an inference engine and are left out)."""
    table = {}
    for name in registry.defined_ops():
        if name.endswith("_backward"):
            continue
        if name in CONVERTERS:
            table[name] = f"converted: {CONVERTERS[name]}"
        else:
            table[name] = f"PyTorch: {FALLBACK.get(name, 'no converter')}"
    return table
