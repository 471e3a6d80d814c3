"""The TensorRT path (`aa_compile.export.tensorrt`, ``inner_compiler="tensorrt"``): without
torch-tensorrt or CUDA it fails with a `RuntimeError` naming what is missing and the way out;
its converter table covers every forward `aa::` op (converted, or in PyTorch with a reason) and
matches the ops' schemas; the report of converted and fallen-back nodes reads torch-tensorrt's
partitioned module; the real lowering runs only where torch-tensorrt and a CUDA device are
(``bench/gpu_check.sh`` runs this file on a lent GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.fx as fx
from torch import nn

from aa_compile.export import tensorrt
from aa_compile.ops import registry

HAS_TRT = importlib.util.find_spec("torch_tensorrt") is not None
HAS_CUDA = torch.cuda.is_available()


class _Norm(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(self.norm(x))


# -- without torch-tensorrt / CUDA: the error names what is missing --------------------------

@pytest.mark.skipif(HAS_TRT, reason="torch-tensorrt is installed: the missing-package error "
                    "cannot happen here")
def test_missing_torch_tensorrt_names_the_package_and_the_way_out():
    assert tensorrt.MISSING is not None
    with pytest.raises(RuntimeError, match=r"needs torch-tensorrt, which is not installed.*"
                       r"pip install 'torch-tensorrt==2\.\d+\.\*'.*inner_compiler='inductor'"):
        tensorrt.require()
    gm = fx.symbolic_trace(_Norm())
    with pytest.raises(RuntimeError, match="needs torch-tensorrt"):
        tensorrt.compile_graph(gm, [torch.randn(2, 32)])
    assert tensorrt.reports() == []  # nothing was compiled


@pytest.mark.skipif(HAS_TRT, reason="torch-tensorrt is installed")
def test_backend_inner_compiler_tensorrt_fails_clearly():
    """``torch.compile(backend="aa", options={"inner_compiler": "tensorrt"})``: the first call
    raises, naming torch-tensorrt (dynamo wraps the backend's error)."""
    torch._dynamo.reset()
    compiled = torch.compile(_Norm(), backend="aa", options={"inner_compiler": "tensorrt"})
    with pytest.raises(Exception, match=r"inner_compiler='tensorrt' needs torch-tensorrt"):
        compiled(torch.randn(2, 32))
    torch._dynamo.reset()


def test_missing_cuda_and_cpu_inputs_are_named(monkeypatch):
    """With torch-tensorrt present (pretended): no CUDA device, then inputs left on the CPU."""
    monkeypatch.setattr(tensorrt, "MISSING", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA device and none is visible"):
        tensorrt.require()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"graph inputs \[0, 2\] are not on a CUDA device"):
        tensorrt.require([torch.randn(2), 3, torch.randn(1)])


# -- the converter table -----------------------------------------------------------------------

def _forward_ops() -> set[str]:
    return {n for n in registry.defined_ops() if not n.endswith("_backward")}


def test_every_forward_op_is_converted_or_falls_back_with_a_reason():
    """A new op must be listed in CONVERTERS or FALLBACK (with its reason), not both."""
    converted, fallback = set(tensorrt.CONVERTERS), set(tensorrt.FALLBACK)
    assert not converted & fallback
    assert converted | fallback == _forward_ops()
    assert all(reason.strip() for reason in tensorrt.FALLBACK.values())
    table = tensorrt.coverage()
    assert set(table) == _forward_ops()
    assert table["aa::rms_norm"].startswith("converted: ")
    assert table["aa::word_pool"].startswith("PyTorch: ")


def test_claimed_converters_are_the_ones_written():
    """The ops the table claims are exactly those with a converter function (checked without
    torch-tensorrt: the table of functions is plain Python)."""
    assert set(tensorrt.converter_functions()) == set(tensorrt.CONVERTERS)
    assert set(tensorrt.CONVERTERS) == {"aa::rms_norm", "aa::int8_linear", "aa::window_attention",
                                        "aa::guide_add", "aa::guide_add_rms_norm"}


#: the argument order each converter reads (hand-written from the converters)
CONVERTER_ARGUMENTS = {
    "aa::rms_norm": ("x", "weight", "eps", "out_dtype"),
    "aa::int8_linear": ("x", "w_int8", "scales", "bias"),
    "aa::window_attention": ("q", "k", "v", "doc_offsets", "window", "scale"),
    "aa::guide_add": ("x", "g", "word_offsets"),
    "aa::guide_add_rms_norm": ("x", "g", "word_offsets", "weight", "eps", "out_dtype"),
}


@pytest.mark.parametrize("name", sorted(CONVERTER_ARGUMENTS))
def test_converters_read_the_ops_schemas_in_order(name):
    schema = getattr(torch.ops.aa, name.split("::")[1]).default._schema
    assert tuple(a.name for a in schema.arguments) == CONVERTER_ARGUMENTS[name]


# -- the report of a partitioned module -------------------------------------------------------

class _Partitioned(nn.Module):
    """What torch-tensorrt returns: engines as ``_run_on_acc_*``, PyTorch graphs as
    ``_run_on_gpu_*``."""

    def __init__(self, gpu_graph: fx.GraphModule):
        super().__init__()
        self._run_on_acc_0 = nn.Identity()
        self._run_on_acc_2 = nn.Identity()
        self._run_on_gpu_1 = gpu_graph


def _graph_calling(*ops) -> fx.GraphModule:
    graph = fx.Graph()
    x = graph.placeholder("x")
    for op in ops:
        x = graph.call_function(op, (x,))
    graph.output(x)
    return fx.GraphModule(nn.Module(), graph)


def test_lowering_report_counts_engines_and_fallback_nodes():
    before = {"aa::rms_norm": 3, "aa::word_pool": 1}
    gpu = _graph_calling(torch.ops.aa.word_pool.default, torch.ops.aa.rms_norm.default)
    report = tensorrt.lowering_report(before, _Partitioned(gpu))
    assert report.engines == 2
    assert report.converted == {"aa::rms_norm": 2}
    assert report.fallback == {"aa::word_pool": 1, "aa::rms_norm": 1}
    assert "2 engine(s)" in str(report)


def test_lowering_report_whole_graph_handed_back():
    """torch-tensorrt returns the graph itself when conversion fails: nothing converted."""
    gm = _graph_calling(torch.ops.aa.rms_norm.default)
    report = tensorrt.lowering_report({"aa::rms_norm": 1}, gm)
    assert report == tensorrt.TensorRTReport(converted={}, fallback={"aa::rms_norm": 1},
                                             engines=0)
    assert tensorrt.aa_op_counts(gm) == {"aa::rms_norm": 1}


# -- the real lowering (CUDA + torch-tensorrt) -------------------------------------------------

@pytest.mark.skipif(not (HAS_TRT and HAS_CUDA),
                    reason="needs torch-tensorrt and a CUDA device (bench/gpu_check.sh)")
def test_reference_transformer_through_tensorrt_matches_eager():
    from aa_compile.models import Transformer, TransformerConfig

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4,
                                          n_kv_heads=2, max_seq_len=64)).cuda().eval()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aa", options={"inner_compiler": "tensorrt"})
    with torch.no_grad():
        want, got = model(ids), compiled(ids)
    report = tensorrt.reports()[-1]
    assert report.converted.get("aa::rms_norm", 0) > 0, report
    scale = want.abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= 1e-3 * scale
