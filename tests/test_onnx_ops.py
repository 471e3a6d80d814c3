"""Every `aa::` op exports to ONNX: a translation or a written reason is registered with it, and
every translation, run by onnxruntime on the op's registered samples, matches the op in eager
mode (whose kernels ``tests/ops`` hold to the float64 references)."""

from __future__ import annotations

import pytest
import torch

from aa_compile.ops import OPS, registry

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from aa_compile.export.translations import (  # noqa: E402
    MissingTranslationError, check_translatable, how_exported, translation_table)

#: onnxruntime's CPU kernels: float32, float64 and integers (no bfloat16/float16 arithmetic)
_RUNS_ON_CPU = (torch.float32, torch.float64, torch.int8, torch.int32, torch.int64, torch.bool)


def test_every_op_has_a_translation_or_a_reason():
    """A new op that forgets `register_onnx` fails here."""
    exports = registry.onnx_exports()
    missing = [name for name in registry.defined_ops() if name not in exports]
    assert not missing, f"ops without register_onnx(translation or reason): {missing}"


def test_backward_ops_are_training_only():
    for name in registry.defined_ops():
        if name.endswith("_backward"):
            assert registry.onnx_exports()[name].reason == registry.TRAINING_ONLY, name


def test_translations_resolve():
    """Each ``module:function`` imports and names a callable."""
    table = translation_table()
    translated = [n for n, e in registry.onnx_exports().items() if e.translation is not None]
    assert len(table) == len(translated)
    assert all(callable(fn) for fn in table.values())


def test_register_onnx_bad_input():
    with pytest.raises(ValueError, match="exactly one of translation"):
        registry.register_onnx("aa::not_an_op")
    with pytest.raises(ValueError, match="exactly one of translation"):
        registry.register_onnx("aa::not_an_op", "m:f", reason="why")
    with pytest.raises(ValueError, match="module:function"):
        registry.register_onnx("aa::not_an_op", "no_colon")
    with pytest.raises(ValueError, match="registered already"):
        registry.register_onnx("aa::rms_norm", reason="again")


def test_missing_translation_names_the_op_and_the_way_out():
    with pytest.raises(MissingTranslationError, match=r"aa::fp8_linear: FP8 GEMM.*way out"):
        check_translatable(["aa::rms_norm", "aa::fp8_linear"])
    with pytest.raises(MissingTranslationError, match=r"aa::made_up registered no ONNX"):
        how_exported("aa::made_up")
    check_translatable(["aa::rms_norm", "aa::int8_linear"])  # translated: no error


class _Call(torch.nn.Module):
    """Calls one op; the sample's tensors are the graph inputs, everything else constants."""

    def __init__(self, op, args: tuple, kwargs: dict):
        super().__init__()
        self.op, self.args, self.kwargs = op, args, kwargs

    def forward(self, *tensors):
        it = iter(tensors)
        args = [next(it) if isinstance(a, torch.Tensor) else a for a in self.args]
        kwargs = {k: next(it) if isinstance(v, torch.Tensor) else v
                  for k, v in self.kwargs.items()}
        return self.op(*args, **kwargs)


def _exportable_samples(name: str) -> list:
    """The op's CPU samples whose tensors onnxruntime's CPU kernels take, without grad."""
    out = []
    for args, kwargs in OPS[name].samples("cpu"):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        dtypes = [v for v in kwargs.values() if isinstance(v, torch.dtype)]
        if all(t.dtype in _RUNS_ON_CPU for t in tensors) and all(d in _RUNS_ON_CPU for d in dtypes):
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v
                      for k, v in kwargs.items()}
            out.append((args, kwargs))
    return out


def _translated_ops() -> list[str]:
    return sorted(n for n, e in registry.onnx_exports().items()
                  if e.translation is not None and n in OPS)


def _close(got, want, name: str, i: int) -> None:
    want = want.detach()
    assert tuple(got.shape) == tuple(want.shape), (name, i, got.shape, want.shape)
    got = torch.from_numpy(got)
    if want.dtype.is_floating_point:
        tol = 1e-4 if want.dtype == torch.float32 else 1e-10
        scale = want.abs().max().item() if want.numel() else 0.0
        torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol * max(scale, 1.0),
                                   msg=lambda m: f"{name} sample {i}: {m}")
    else:
        assert torch.equal(got.to(want.dtype), want), (name, i, got, want)


@pytest.mark.parametrize("name", _translated_ops())
def test_translation_matches_eager_in_onnxruntime(name, tmp_path):
    samples = _exportable_samples(name)
    assert samples, f"{name}: no sample onnxruntime's CPU kernels can run"
    table = translation_table()
    for i, (args, kwargs) in enumerate(samples[:2]):
        module = _Call(OPS[name].op, args, kwargs).eval()
        tensors = tuple(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        want = module(*tensors)
        want = list(want) if isinstance(want, (tuple, list)) else [want]
        program = torch.onnx.export(module, tensors, dynamo=True, verbose=False,
                                    custom_translation_table=table)
        path = tmp_path / f"{i}.onnx"
        program.save(str(path))
        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {inp.name: t.numpy() for inp, t in zip(session.get_inputs(), tensors)}
        assert len(feeds) == len(session.get_inputs()), f"{name}: an input was folded away"
        got = session.run(None, feeds)
        assert len(got) == len(want), (name, i)
        for g, w in zip(got, want):
            _close(g, w, name, i)


def test_rms_norm_becomes_onnxruntimes_fused_kernel(tmp_path):
    """The standard-op RMSNorm is the pattern onnxruntime fuses into its contrib
    ``SimplifiedLayerNormalization`` (which onnx.checker would reject in the file itself)."""

    class Norm(torch.nn.Module):
        def forward(self, x, w):
            return torch.ops.aa.rms_norm(x, w, 1e-6)

    program = torch.onnx.export(Norm().eval(), (torch.randn(4, 32), torch.randn(32)),
                                dynamo=True, verbose=False,
                                custom_translation_table=translation_table())
    program.save(str(tmp_path / "norm.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "norm.onnx"), options,
                         providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops == ["SimplifiedLayerNormalization"], ops
