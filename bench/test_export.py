"""Exported-model workload: the reference transformer's inference forward run by onnxruntime
on the CPU (the file `aa_compile.export.onnx` writes) against the same model in PyTorch.

Variants: ``eager``, ``inductor``, ``aa`` (as ``bench/test_transformer.py``) and the peer
``onnxruntime`` (the ONNX export of the aa-rewritten model, ``CPUExecutionProvider``, one
session with torch's thread count). CPU only: the export's session runs on the CPU here.

``export_int8_transformer_fwd``: the same model with every block linear int8 (an FDTM plan,
`aa_compile.dtm.apply`), in ``eager`` and ``aa`` and exported twice: ``onnxruntime`` (standard
ops, ``runtime="standard"``: DequantizeLinear + MatMul) and ``onnxruntime_matmulnbits`` (the
default ``runtime="onnxruntime"``: onnxruntime's MatMulNBits with int8 activations).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from aa_compile import dtm
from aa_compile.models.transformer import Transformer, TransformerConfig
from bench.harness import (BASE_VARIANTS, bench_variant, inference_step, inference_variant,
                           seed_all, transformer_cases)

PEERS = ("onnxruntime",)
#: the int8 workload's variants: PyTorch (inductor left out: the int8 linears are opaque to it)
#: and the two exports
INT8_VARIANTS = ("eager", "aa", "onnxruntime", "onnxruntime_matmulnbits")

#: the shapes of this workload file, per --quick / --device (see bench/conftest.py)
CASES = transformer_cases


@pytest.fixture(scope="module")
def base(case, settings):
    """The model and token ids, built once per shape; each variant gets a deep copy."""
    seed_all(0)
    cfg = TransformerConfig(vocab_size=case.vocab_size, d_model=case.d_model,
                            n_layers=case.n_layers, n_heads=case.n_heads,
                            n_kv_heads=case.n_kv_heads, max_seq_len=case.seq)
    model = Transformer(cfg).to(device=settings.device, dtype=case.dtype).eval()
    ids = torch.randint(0, case.vocab_size, (case.batch, case.seq), device=settings.device)
    return model, ids


def onnxruntime_variant(model: torch.nn.Module, ids: torch.Tensor, directory,
                        runtime: str = "onnxruntime") -> Callable:
    """``ids -> logits`` through onnxruntime on the exported (aa-rewritten) model; ``runtime``
    as `aa_compile.export.onnx` takes it."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from aa_compile.export import onnx

    path = directory / "transformer.onnx"
    onnx(model, (ids,), path, dynamic_shapes=({0: "batch", 1: "seq"},), runtime=runtime)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return run


#: each workload's onnxruntime variants and the ``runtime`` each exports for (the int8
#: workload's plain ``onnxruntime`` is the standard-operator file, its peer uses MatMulNBits)
EXPORT_RUNTIMES = {"onnxruntime": "onnxruntime"}
INT8_EXPORT_RUNTIMES = {"onnxruntime": "standard", "onnxruntime_matmulnbits": "onnxruntime"}


def bench_exported(benchmark, settings, case, variant: str, workload: str, model, ids,
                   tmp_path_factory, runtimes: dict[str, str]) -> None:
    """Time ``model`` on ``ids`` as ``variant`` runs it: an onnxruntime session of the file
    exported for ``runtimes[variant]``, or a torch variant."""
    if settings.device != "cpu":
        pytest.skip("the exported model runs on onnxruntime's CPU provider here")

    def build():
        if variant in runtimes:
            return onnxruntime_variant(model, ids, tmp_path_factory.mktemp("export"),
                                       runtimes[variant])
        return inference_variant(model, variant)

    bench_variant(benchmark, settings, case, variant, workload, kind="model",
                  build=build, step=lambda run: inference_step(run, ids))


@pytest.mark.parametrize("variant", BASE_VARIANTS + PEERS)
def test_export_transformer_fwd(benchmark, settings, case, base, variant, repeat,
                                tmp_path_factory):
    bench_exported(benchmark, settings, case, variant, "export_transformer_fwd", *base,
                   tmp_path_factory, EXPORT_RUNTIMES)


@pytest.fixture(scope="module")
def int8_model(base):
    """The base model with every block linear int8 (the LM head kept), as an FDTM plan does."""
    model, ids = base
    plan = {name: "int8" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    return dtm.apply(model, plan), ids


@pytest.mark.parametrize("variant", INT8_VARIANTS)
def test_export_int8_transformer_fwd(benchmark, settings, case, int8_model, variant, repeat,
                                     tmp_path_factory):
    bench_exported(benchmark, settings, case, variant, "export_int8_transformer_fwd",
                   *int8_model, tmp_path_factory, INT8_EXPORT_RUNTIMES)
