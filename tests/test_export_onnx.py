"""`aa_compile.export.onnx`: models rewritten by the `aa` passes export to ONNX and onnxruntime
matches eager PyTorch (float32: within 1e-4 of the output's largest magnitude), at the example
shapes and, for dynamic dimensions, at other shapes; bad input fails with the cause named.

The expected values are the eager models' own outputs (plain PyTorch, no aa:: op), computed
here, independent of the export."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch import nn

onnx_lib = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from aa_compile import dtm  # noqa: E402
from aa_compile.export import (ExportError, MismatchError, MissingTranslationError,  # noqa: E402
                               onnx)
from aa_compile.models import Transformer, TransformerConfig  # noqa: E402

RTOL = 1e-4


def _run(path, *inputs) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= RTOL * scale


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    cfg = TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=64, max_seq_len=64)
    return Transformer(cfg).eval()


def test_reference_transformer_dynamic_batch_and_sequence(reference, tmp_path):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    report = onnx(reference, (ids,), tmp_path / "ref.onnx",
                  dynamic_shapes=({0: "batch", 1: "seq"},))
    assert report.ops == {"aa::rms_norm": (5, "aa_compile.kernels.rms_norm.onnx_translation:"
                                              "rms_norm")}
    assert report.rewrites["rms_norm"] == 5
    assert report.dynamic == {0: {0: "batch", 1: "seq"}}
    assert report.bounds == {"seq": 64}  # the model's max_seq_len (its RoPE table)
    assert "aa::rms_norm x5" in str(report) and "seq <= 64" in str(report)
    for shape in [(2, 8), (3, 13), (1, 5)]:  # other batch and sequence sizes than exported
        other = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = reference(other)
        _assert_matches(_run(tmp_path / "ref.onnx", other)[0], want)


def test_int8_model_from_an_fdtm_plan_standard_ops(reference, tmp_path):
    """``runtime="standard"``: int8 codes through DequantizeLinear, float activations, 1e-4."""
    plan = {"layers.0.attn.q_proj": "int8", "layers.1.mlp.down_proj": "int8"}
    model = dtm.apply(reference, plan)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    report = onnx(model, (ids,), tmp_path / "int8.onnx", dynamic_shapes=({1: "seq"},),
                  runtime="standard")
    assert report.ops["aa::int8_linear"][0] == 2
    assert report.min_sqnr_db is None
    ops = {(n.domain, n.op_type) for n in onnx_lib.load(str(tmp_path / "int8.onnx")).graph.node}
    assert ("", "DequantizeLinear") in ops and not any(d for d, _ in ops)
    other = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(other)
    _assert_matches(_run(tmp_path / "int8.onnx", other)[0], want)


def _sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    noise = (got.double() - want.double()).pow(2).sum()
    return (10 * torch.log10(want.double().pow(2).sum() / noise)).item()


def test_int8_model_runs_as_matmulnbits_for_onnxruntime(reference, tmp_path):
    """Every block linear int8: the default runtime (onnxruntime) writes MatMulNBits with packed
    uint8 codes, no int8 weight left, and every output keeps the stated 30 dB SQNR vs eager, also
    at shapes other than the exported one."""
    plan = {name: "int8" for name, m in reference.named_modules()
            if isinstance(m, nn.Linear) and name != "lm_head"}
    model = dtm.apply(reference, plan)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    report = onnx(model, (ids,), tmp_path / "nbits.onnx", dynamic_shapes=({0: "b", 1: "seq"},))
    assert report.ops["aa::int8_linear"] == (
        len(plan), "aa_compile.kernels.int8_linear.onnx_translation:int8_linear_matmulnbits")
    assert report.min_sqnr_db == 30.0 and report.sqnr_db[0] >= 30.0
    assert "SQNR per output" in str(report)
    graph = onnx_lib.load(str(tmp_path / "nbits.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == len(plan) and {n.domain for n in nbits} == {"com.microsoft"}
    assert "DequantizeLinear" not in {n.op_type for n in graph.node}
    assert not [i.name for i in graph.initializer if i.data_type == onnx_lib.TensorProto.INT8]
    for shape in [(2, 6), (3, 11)]:
        other = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            want = model(other)
        got = _run(tmp_path / "nbits.onnx", other)[0]
        assert got.shape == want.shape
        assert _sqnr_db(got, want) >= 30.0


def test_int8_below_its_sqnr_bound_names_the_way_out(monkeypatch, tmp_path):
    """A lossy variant is held to its SQNR bound: one nothing meets raises, naming the output
    and runtime='standard'."""
    from aa_compile.export import translations

    class Int8(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(9)
            self.register_buffer("w", torch.randint(-127, 128, (16, 32), generator=g,
                                                    dtype=torch.int8))
            self.register_buffer("s", torch.rand(16, generator=g) / 50)

        def forward(self, x):
            return torch.ops.aa.int8_linear(x, self.w, self.s, None)

    strict = dataclasses.replace(translations.ONNXRUNTIME_VARIANTS["aa::int8_linear"],
                                 min_sqnr_db=1000.0)
    monkeypatch.setitem(translations.ONNXRUNTIME_VARIANTS, "aa::int8_linear", strict)
    with pytest.raises(MismatchError, match=r"output 0: .*SQNR.*below the 1000 dB.*"
                       r"runtime='standard'"):
        onnx(Int8(), (torch.randn(4, 32),), tmp_path / "s.onnx")


def test_dynamic_dims_bad_bounds_and_values(tmp_path):
    from torch.export import Dim

    with pytest.raises(ExportError, match=r"size 4 is outside b's bounds \[2, 3\]"):
        onnx(_Linear(), (torch.randn(4, 32),), tmp_path / "x.onnx",
             dynamic_shapes=({0: Dim("b", min=2, max=3)},))
    with pytest.raises(ExportError, match="neither a name nor a torch.export.Dim"):
        onnx(_Linear(), (torch.randn(4, 32),), tmp_path / "x.onnx", dynamic_shapes=({0: 5},))


def test_bad_runtime_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"runtime='trt' is not valid"):
        onnx(_Linear(), (torch.randn(2, 32),), tmp_path / "x.onnx", runtime="trt")


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        return self.proj(x)


def test_fp8_graph_names_the_op_and_the_way_out(tmp_path):
    with pytest.raises(MissingTranslationError,
                       match=r"aa::fp8_linear: FP8 GEMM.*way out: export without the fp8 option"):
        onnx(_Linear(), (torch.randn(4, 32),), tmp_path / "fp8.onnx",
             options={"fp8": "tensorwise"})
    assert not (tmp_path / "fp8.onnx").exists()


def test_dynamic_dimension_the_model_fixes_is_refused(tmp_path):
    class Fixed(nn.Module):
        def forward(self, x):
            return x.reshape(2, 8) * 2  # the batch can only be 2

    with pytest.raises(ExportError, match="dynamic"):
        onnx(Fixed(), (torch.randn(2, 8),), tmp_path / "f.onnx", dynamic_shapes=({0: "b"},))


@pytest.mark.parametrize("spec, match", [
    (({0: "b"}, {0: "b"}), "one entry per example input"),
    (({5: "b"},), "dimension 5 does not exist"),
    (({0: "b"},), "size 1 in the example"),
])
def test_bad_dynamic_shapes(spec, match, tmp_path):
    with pytest.raises(ExportError, match=match):
        onnx(_Linear(), (torch.randn(1, 32),), tmp_path / "x.onnx", dynamic_shapes=spec)


def test_bad_model_and_inputs(tmp_path):
    with pytest.raises(TypeError, match="must be an nn.Module"):
        onnx(lambda x: x, (torch.randn(2),), tmp_path / "x.onnx")
    with pytest.raises(TypeError, match="tuple of\\s+tensors"):
        onnx(_Linear(), (torch.randn(2, 32), 3), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="not_a_pass"):
        onnx(_Linear(), (torch.randn(2, 32),), tmp_path / "x.onnx",
             options={"passes": ["not_a_pass"]})


def test_graph_break_is_named(tmp_path):
    class Breaks(nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x + 1

    with pytest.raises(ExportError, match="one graph"):
        onnx(Breaks(), (torch.randn(2, 3),), tmp_path / "b.onnx")


def test_mismatch_is_reported(tmp_path):
    """A tolerance nothing meets (rtol < 0) turns the check into an error naming the output."""
    with pytest.raises(MismatchError, match="output 0"):
        onnx(_Linear(), (torch.randn(2, 32),), tmp_path / "m.onnx", rtol=-1.0)


def test_training_modes_are_restored_module_by_module(tmp_path):
    model = _Linear().train()
    model.proj.eval()
    onnx(model, (torch.randn(2, 32),), tmp_path / "t.onnx")
    assert model.training and not model.proj.training


def test_missing_onnx_extra_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'aa-compile\[onnx\]'"):
        onnx(_Linear(), (torch.randn(2, 32),), tmp_path / "x.onnx")
