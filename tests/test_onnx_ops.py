"""Every `aa::` op exports to ONNX: a translation or a written reason is registered with it, and
every translation, run by onnxruntime on the op's registered samples, matches the op in eager
mode (whose kernels ``tests/ops`` hold to the float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aa_compile.ops import OPS, registry

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from aa_compile.export.weight_packing import fold_weight_packing  # noqa: E402
from aa_compile.export.translations import (  # noqa: E402
    ONNXRUNTIME_VARIANTS, MissingTranslationError, check_translatable, how_exported, min_sqnr_db,
    translation_kinds, translation_table)

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


@pytest.mark.parametrize("runtime", ["onnxruntime", "standard"])
def test_translations_resolve(runtime):
    """Each ``module:function`` imports and names a callable, for both runtimes."""
    table = translation_table(runtime)
    translated = [n for n, e in registry.onnx_exports().items() if e.translation is not None]
    assert len(table) == len(translated)
    assert all(callable(fn) for fn in table.values())


def test_onnxruntime_variants_replace_only_their_op():
    standard, ort_table = translation_table("standard"), translation_table("onnxruntime")
    differ = {op._schema.name for op in standard if standard[op] is not ort_table[op]}
    assert differ == set(ONNXRUNTIME_VARIANTS) == {"aa::int8_linear"}
    assert how_exported("aa::int8_linear", "standard").endswith(":int8_linear")
    assert how_exported("aa::int8_linear", "onnxruntime").endswith(":int8_linear_matmulnbits")
    assert min_sqnr_db(["aa::rms_norm", "aa::int8_linear"], "onnxruntime") == 30.0
    assert min_sqnr_db(["aa::rms_norm", "aa::int8_linear"], "standard") is None
    assert min_sqnr_db(["aa::rms_norm"], "onnxruntime") is None


def test_bad_runtime_is_named():
    for call in (lambda: translation_table("tensorrt"), lambda: how_exported("aa::rms_norm", "x"),
                 lambda: min_sqnr_db([], "ort")):
        with pytest.raises(ValueError, match=r"choose one of \['onnxruntime', 'standard'\]"):
            call()


def test_translation_kinds_cover_every_op():
    """The ONNX column of ``aa-compile info``: one entry per defined op, naming its kind."""
    kinds = translation_kinds()
    assert set(kinds) == set(registry.defined_ops())
    assert kinds["aa::rms_norm"] == "standard ops"
    assert kinds["aa::int8_linear"].startswith("standard ops; onnxruntime: ")
    assert "MatMulNBits" in kinds["aa::int8_linear"]
    assert kinds["aa::fp8_linear"].startswith("none (FP8 GEMM")
    assert kinds["aa::rms_norm_backward"] == f"none ({registry.TRAINING_ONLY})"


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
    table = translation_table("standard")
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


class _Int8Linear(torch.nn.Module):
    """One ``aa::int8_linear`` whose codes, scales and bias are buffers (initializers)."""

    def __init__(self, w_int8, scales, bias):
        super().__init__()
        self.register_buffer("w_int8", w_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x):
        return torch.ops.aa.int8_linear(x, self.w_int8, self.scales, self.bias)


def _export_matmulnbits(module, x, path):
    program = torch.onnx.export(module, (x,), dynamo=True, verbose=False, optimize=False,
                                custom_translation_table=translation_table("onnxruntime"))
    fold_weight_packing(program.model)
    program.optimize()
    program.save(str(path))
    onnx.checker.check_model(str(path))
    return onnx.load(str(path))


@pytest.mark.parametrize("shape, n, k, bias", [((3, 5, 70), 17, 70, True), ((4, 64), 24, 64, False)])
def test_matmulnbits_repacks_the_codes_exactly_and_stays_in_its_error_bound(
        shape, n, k, bias, tmp_path):
    """The file's MatMulNBits codes are ``q + 128`` in blocks of 32 along K (K padded with 128),
    every block scaled by its row's scale; the only error is onnxruntime's int8 rounding of the
    activations, at most half a step (``max|x_block| / 254``) per activation, so at most
    ``sum_blocks max|x_block| / 254 * sum_block |w[n]|`` per output (float64 restatement)."""
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, generator=g) / 50 + 1e-3
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    model = _export_matmulnbits(_Int8Linear(w, scales, b).eval(), x, tmp_path / "nbits.onnx")
    nodes = [nd for nd in model.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    assert "DequantizeLinear" not in {nd.op_type for nd in model.graph.node}
    attrs = {a.name: a.i for a in nodes[0].attribute}
    blocks = -(-k // 32)
    assert attrs == {"K": k, "N": n, "bits": 8, "block_size": 32, "accuracy_level": 4}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    codes = inits[nodes[0].input[1]]
    want_codes = torch.full((n, blocks * 32), 128, dtype=torch.int32)
    want_codes[:, :k] = w.to(torch.int32) + 128
    assert codes.dtype == np.uint8
    assert np.array_equal(codes, want_codes.reshape(n, blocks, 32).numpy())
    assert np.array_equal(inits[nodes[0].input[2]],
                          scales[:, None].expand(n, blocks).reshape(-1).numpy())
    assert nodes[0].input[1].endswith("w_int8.matmulnbits_codes")

    session = ort.InferenceSession(str(tmp_path / "nbits.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    weight = w.double() * scales.double()[:, None]
    rows = x.double().reshape(-1, k)
    want = rows @ weight.t() + (b.double() if bias else 0)
    pad = blocks * 32 - k
    x_max = torch.nn.functional.pad(rows.abs(), (0, pad)).reshape(-1, blocks, 32).amax(-1)
    w_sum = torch.nn.functional.pad(weight.abs(), (0, pad)).reshape(n, blocks, 32).sum(-1)
    bound = (x_max / 254) @ w_sum.t()
    err = (got.double().reshape(-1, n) - want).abs()
    slack = 1e-5 * want.abs().max()  # float32 accumulation
    assert got.shape == (*shape[:-1], n)
    assert (err <= bound + slack).all(), (err - bound).max()
    assert err.max() > 0  # the activations were rounded: the int8 path ran


def test_matmulnbits_float64_input_takes_the_standard_translation(tmp_path):
    """onnxruntime has no float64 MatMulNBits: float64 stays exact through standard ops."""
    g = torch.Generator().manual_seed(8)
    w = torch.randint(-127, 128, (8, 40), generator=g, dtype=torch.int8)
    scales = torch.rand(8, generator=g, dtype=torch.float64) / 50
    x = torch.randn(3, 40, generator=g, dtype=torch.float64)
    model = _export_matmulnbits(_Int8Linear(w, scales, None).eval(), x, tmp_path / "f64.onnx")
    assert "MatMulNBits" not in {nd.op_type for nd in model.graph.node}
    session = ort.InferenceSession(str(tmp_path / "f64.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    want = x @ (w.double() * scales[:, None]).t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
