"""`aa_compile.export.onnx`: models rewritten by the `aa` passes export to ONNX and onnxruntime
matches eager PyTorch (float32: within 1e-4 of the output's largest magnitude), at the example
shapes and, for dynamic dimensions, at other shapes; bad input fails with the cause named.

The expected values are the eager models' own outputs (plain PyTorch, no aa:: op), computed
here, independent of the export."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
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
    assert "aa::rms_norm x5" in str(report)
    for shape in [(2, 8), (3, 13), (1, 5)]:  # other batch and sequence sizes than exported
        other = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want = reference(other)
        _assert_matches(_run(tmp_path / "ref.onnx", other)[0], want)


def test_int8_model_from_an_fdtm_plan(reference, tmp_path):
    plan = {"layers.0.attn.q_proj": "int8", "layers.1.mlp.down_proj": "int8"}
    model = dtm.apply(reference, plan)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    report = onnx(model, (ids,), tmp_path / "int8.onnx", dynamic_shapes=({1: "seq"},))
    assert report.ops["aa::int8_linear"][0] == 2
    other = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(other)
    _assert_matches(_run(tmp_path / "int8.onnx", other)[0], want)


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
