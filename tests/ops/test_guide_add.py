"""`aa::guide_add` and `aa::guide_add_rms_norm`: their kernels (``cpu``; ``triton``: in the
interpreter on CPU tensors without a GPU, so sizes and example counts are small there) and the
ops (autograd, gradcheck, equality with the HAT reference decoder's guide add + first attention
norm, bad inputs, tracing under torch.compile, the inductor decompositions), each against the
float64 reference: random word lengths (1-byte words, 100-byte words, empty words), W = 0 /
T = 0, odd widths, every dtype it takes, weight or none, out_dtype."""

from __future__ import annotations

import dataclasses
import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aa_compile.kernels.guide_add import cpu, reference
from aa_compile.kernels.rms_norm import reference as rms_reference
from aa_compile.models.transformer import RMSNorm

# (the same tolerances: max error / max(1, max |float64 answer|), 2 ulps of the output for half
# types, the kernels round once)
from .test_word_pool import REL_TOL, TEXTS, check, on_device, tiny_hat

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from aa_compile.kernels.guide_add import triton_kernel

ADD, NORM = torch.ops.aa.guide_add, torch.ops.aa.guide_add_rms_norm
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
word_lengths = st.one_of(st.integers(1, 12), st.sampled_from([0, 1, 1, 100]))
SHORT = st.one_of(st.integers(1, 6), st.sampled_from([0, 1, 9, 17]))

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclasses.dataclass(frozen=True)
class Problem:
    lengths: tuple[int, ...]
    dim: int
    dtype: torch.dtype
    weight_dtype: torch.dtype | None  # None: no weight
    out_dtype: torch.dtype | None
    eps: float
    seed: int

    def make(self):
        """``(x, g, offsets, weight, grad_y, grad_normed)``."""
        gen = torch.Generator().manual_seed(self.seed)
        offsets = torch.zeros(len(self.lengths) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        t = int(offsets[-1])

        def randn(*shape, dtype=self.dtype, shift=0.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) + shift).to(dtype)

        x, g = randn(t, self.dim), randn(len(self.lengths), self.dim)
        w = None if self.weight_dtype is None else randn(self.dim, dtype=self.weight_dtype,
                                                          shift=1.0)
        return (x, g, offsets, w, randn(t, self.dim),
                randn(t, self.dim, dtype=self.out_dtype or self.dtype))


@st.composite
def problems(draw, dtypes=DTYPES, max_words=12, lengths=word_lengths):
    dtype = draw(st.sampled_from(dtypes))
    return Problem(
        lengths=tuple(draw(st.lists(lengths, min_size=0, max_size=max_words))),
        dim=draw(st.sampled_from([1, 3, 16, 33, 200])),
        dtype=dtype,
        weight_dtype=draw(st.sampled_from([None, dtype, torch.float32])),
        out_dtype=draw(st.sampled_from([None, torch.float32] if dtype != torch.float64
                                       else [None])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _d(t):
    return None if t is None else t.double()


def check_plain(fwd, bwd, p: Problem):
    x, g, offsets, _, grad, _ = p.make()
    check(fwd(x, g, offsets), reference.guide_add(x.double(), g.double(), offsets), p.dtype, "y")
    dg = bwd(grad, offsets)
    check(dg, reference.guide_add_backward(grad.double(), offsets), p.dtype, "dg")
    empty = torch.tensor([n == 0 for n in p.lengths], dtype=torch.bool)
    assert (dg[empty] == 0).all()


def check_fused(fwd, bwd, p: Problem, grads=("y", "normed")):
    x, g, offsets, w, gy, gn = p.make()
    y, normed = fwd(x, g, offsets, w, p.eps, p.out_dtype)
    y64, n64 = reference.guide_add_rms_norm(x.double(), g.double(), offsets, _d(w), p.eps)
    check(y, y64, p.dtype, "y")
    # normalize the rounded y in float64: the op's definition (y is rounded first)
    n64 = rms_reference.rms_norm(y.double(), _d(w), p.eps)
    check(normed, n64, p.out_dtype or p.dtype, "normed")
    gy = gy if "y" in grads else None
    gn = gn if "normed" in grads else None
    dx, dg, dw = bwd(gy, gn, y, w, offsets, p.eps)
    want = reference.guide_add_rms_norm_backward(_d(gy), _d(gn), y.double(), _d(w), offsets,
                                                 p.eps)
    check(dx, want[0], p.dtype, "dx")
    check(dg, want[1], p.dtype, "dg")
    if w is None:
        assert dw is None
    else:  # a sum over all T rows: scale the half-type bound by sqrt(T)
        assert dw.dtype == w.dtype
        _check_loose(dw, want[2], REL_TOL[w.dtype] * (1 + y.shape[0] ** 0.5))


def _check_loose(got, want, tol):
    if got.numel():
        err = (got.double() - want).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (err, tol)


def kernels(name: str):
    """``(guide_add_fwd, guide_add_bwd, guide_add_rms_norm_fwd, guide_add_rms_norm_bwd)`` of a
    kernel; Triton on DEVICE, results back on the CPU."""
    if name == "cpu":
        mod, wrap = cpu, (lambda fn: fn)
    elif not HAS_TRITON:
        pytest.skip("triton is not installed")
    else:
        mod, wrap = triton_kernel, on_device
    return tuple(wrap(fn) for fn in (mod.guide_add_fwd, mod.guide_add_bwd,
                                     mod.guide_add_rms_norm_fwd, mod.guide_add_rms_norm_bwd))


# --- the kernels against the float64 reference ---------------------------------------------

#: per kernel: the problems (Triton: few short words, no float64) and the examples
PROPERTY = {
    "cpu": (problems(), 25),
    "triton": (problems(dtypes=TRITON_DTYPES, max_words=6, lengths=SHORT), 8),
}


@pytest.mark.parametrize("form", ["plain", "fused"])
@pytest.mark.parametrize("name", list(PROPERTY))
def test_matches_float64_reference(name, form):
    strategy, examples = PROPERTY[name]
    fns = kernels(name)
    check_form, fwd, bwd = ((check_plain, *fns[:2]) if form == "plain"
                            else (check_fused, *fns[2:]))

    @settings(max_examples=examples, deadline=None)
    @given(strategy)
    def run(p):
        check_form(fwd, bwd, p)

    run()


@pytest.mark.parametrize("name", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", [("y",), ("normed",), ()])
def test_fused_backward_with_missing_gradients(name, dtype, grads):
    p = Problem((3, 0, 5, 1), 17, dtype, torch.float32, None, 1e-6, 4)
    check_fused(*kernels(name)[2:], p, grads)


@pytest.mark.parametrize("name", ["cpu", "triton"])
@pytest.mark.parametrize("lengths", [(), (0,), (0, 0), (0, 3, 0), (100,)])
def test_no_words_no_bytes_and_edge_words(name, lengths):
    fwd, bwd, nfwd, nbwd = kernels(name)
    for dim in (8, 33):
        p = Problem(lengths, dim, torch.float32, torch.float32, None, 1e-6, 0 if dim == 8 else 1)
        check_plain(fwd, bwd, p)
        check_fused(nfwd, nbwd, p)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_float32_forward_is_exact(name):
    """float32: ``y`` is the exactly rounded sum, bit for bit what eager ``x + g[idx]`` gives."""
    fwd = kernels(name)[0]
    p = Problem((4, 1, 7), 33, torch.float32, None, None, 1e-6, 9)
    x, g, offsets, *_ = p.make()
    idx = torch.repeat_interleave(torch.arange(3), torch.tensor(p.lengths))
    assert torch.equal(fwd(x, g, offsets), x + g[idx])


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_backward_does_not_alias_or_modify_grads(name):
    _, _, nfwd, nbwd = kernels(name)
    p = Problem((3, 2), 8, torch.float32, torch.float32, None, 1e-6, 2)
    x, g, offsets, w, gy, _ = p.make()
    y, _ = nfwd(x, g, offsets, w, 1e-6)
    before = gy.clone()
    dx, _, _ = nbwd(gy, None, y, w, offsets, 1e-6)
    assert dx.data_ptr() != gy.data_ptr()
    dx.add_(1)
    assert torch.equal(gy, before)


@needs_triton
def test_triton_more_words_than_backward_programs():
    """Each backward program owns a range of several words (8 programs off a GPU)."""
    _, _, nfwd, nbwd = kernels("triton")
    p = Problem(tuple(i % 5 for i in range(20)), 24, torch.float32,
                torch.float32, None, 1e-6, 6)
    check_fused(nfwd, nbwd, p)
    x, g, offsets, w, gy, gn = p.make()
    y, _ = nfwd(x, g, offsets, w, 1e-6, None)
    first, second = nbwd(gy, gn, y, w, offsets, 1e-6), nbwd(gy, gn, y, w, offsets, 1e-6)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_triton_wide_rows_fall_back_to_unfused(monkeypatch):
    monkeypatch.setattr(triton_kernel, "MAX_FUSED_D", 16)
    p = Problem((3, 1, 0, 4), 33, torch.float32, torch.float32, None, 1e-6, 8)
    check_fused(*kernels("triton")[2:], p)


@needs_triton
@pytest.mark.parametrize("call, match", [
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4).double(), torch.randn(1, 4).double(),
                                         torch.tensor([0, 3])), "x: float64"),
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4), torch.randn(2, 4),
                                         torch.tensor([0, 3])), "g must have one row per word"),
    (lambda: triton_kernel.guide_add_fwd(torch.randn(3, 4), torch.randn(1, 5),
                                         torch.tensor([0, 3])), "g must be as wide as x"),
    (lambda: triton_kernel.guide_add_rms_norm_fwd(torch.randn(3, 4), torch.randn(1, 4),
                                                  torch.tensor([0, 3]), torch.randn(5), 1e-6),
     r"weight must have shape \(4,\)"),
])
def test_triton_bad_input_raises_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- the ops --------------------------------------------------------------------------------

def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


@settings(max_examples=12, deadline=None)
@given(problems())
def test_autograd_matches_float64_reference(p):
    x, g, offsets, w, gy, gn = p.make()
    xl, gl, wl = _leaf(x), _leaf(g), _leaf(w)
    y = ADD(xl, gl, offsets)
    y.backward(gy)
    check(y, reference.guide_add(x.double(), g.double(), offsets), p.dtype, "y")
    check(xl.grad, gy.double(), p.dtype, "dx")
    check(gl.grad, reference.guide_add_backward(gy.double(), offsets), p.dtype, "dg")

    xl, gl = _leaf(x), _leaf(g)
    y, normed = NORM(xl, gl, offsets, wl, p.eps, p.out_dtype)
    torch.autograd.backward([y, normed], [gy, gn])
    want = reference.guide_add_rms_norm_backward(
        gy.double(), gn.double(), y.detach().double(), None if w is None else w.double(),
        offsets, p.eps)
    check(xl.grad, want[0], p.dtype, "dx")
    check(gl.grad, want[1], p.dtype, "dg")
    if w is not None:
        err = (wl.grad.double() - want[2]).abs().max().item() if w.numel() else 0.0
        assert err <= REL_TOL[w.dtype] * (1 + x.shape[0] ** 0.5) * max(
            1.0, want[2].abs().max().item())


def test_gradcheck_float64():
    x, g, offsets, w, *_ = Problem((3, 0, 2, 1), 5, torch.float64, torch.float64, None, 1e-6,
                                   3).make()
    args = [t.requires_grad_(True) for t in (x, g, w)]
    assert torch.autograd.gradcheck(lambda a, b: ADD(a, b, offsets), args[:2])
    assert torch.autograd.gradcheck(
        lambda a, b, c: NORM(a, b, offsets, c, 1e-6), args)
    # only one output used: the other's gradient enters as zeros
    assert torch.autograd.gradcheck(lambda a, b, c: NORM(a, b, offsets, c, 1e-6)[1], args)


@pytest.mark.parametrize("every_layer", [False, True])
def test_equals_hat_reference_decoder(every_layer):
    """``x + guide(pred)[byte_word]`` and the first block's ``attn_norm`` of the reference
    ``ByteDecoder`` equal the fused op (forward, and gradients of h, pred and every parameter
    involved), on a ByteBatch from the model's splitter."""
    m = tiny_hat(guide_every_layer=every_layer)
    batch = m.splitter.encode(TEXTS)
    dec = m.decoder
    h = torch.randn(batch.n_bytes, m.config.d_enc, requires_grad=True)
    pred = torch.randn(batch.n_words, m.config.d_backbone, requires_grad=True)
    norm = dec.layers[0].attn_norm

    x_ref = h[None] + dec.guides[0](pred)[batch.byte_word]  # ByteDecoder.forward, layer 0
    n_ref = norm(x_ref)
    y, normed = NORM(h, dec.guides[0](pred), batch.word_offsets, norm.weight, norm.eps)
    torch.testing.assert_close(y, x_ref[0], rtol=0, atol=0)
    torch.testing.assert_close(normed, n_ref[0], rtol=1e-6, atol=1e-6)
    gy, gn = torch.randn_like(y), torch.randn_like(normed)
    params = [h, pred, norm.weight, *dec.guides[0].parameters()]
    want = torch.autograd.grad([x_ref[0], n_ref[0]], params, [gy, gn])
    got = torch.autograd.grad([y, normed], params, [gy, gn])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the plain form (layers after the first with guide_every_layer)
    plain = ADD(h, dec.guides[-1](pred), batch.word_offsets)
    torch.testing.assert_close(plain, (h[None] + dec.guides[-1](pred)[batch.byte_word])[0],
                               rtol=0, atol=0)


def test_bfloat16_half_weight_matches_reference_within_a_rounding():
    """bfloat16 model: the reference rounds ``y * rstd`` before ``* weight``; the op rounds
    once, so they agree to about one bfloat16 ulp."""
    x, g, offsets, w, *_ = Problem((4, 1, 6), 64, torch.bfloat16, torch.bfloat16, None, 1e-6,
                                   5).make()
    y, normed = NORM(x, g, offsets, w, 1e-6)
    idx = torch.repeat_interleave(torch.arange(3), offsets.diff())
    ref_norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        ref_norm.weight.copy_(w)
        want = ref_norm(x + g[idx])
    assert torch.equal(y, x + g[idx])
    torch.testing.assert_close(normed, want, rtol=2 * 2**-8, atol=1e-3)


def test_compiles_without_graph_breaks():
    x, g, offsets, w, gy, gn = Problem((2, 5, 1), 16, torch.float32, torch.float32, None, 1e-6,
                                       3).make()

    def f(a, b, c):
        y, n = NORM(ADD(a, b, offsets), b, offsets, c, 1e-6)
        return y, n

    fn = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [_leaf(t) for t in (x, g, w)]
    y, n = fn(*leaves)
    torch.autograd.backward([y, n], [gy, gn])
    ref = [_leaf(t) for t in (x, g, w)]
    y2, n2 = f(*ref)
    torch.autograd.backward([y2, n2], [gy, gn])
    torch.testing.assert_close(n, n2)
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def _args():
    return [torch.randn(5, 4), torch.randn(2, 4), torch.tensor([0, 2, 5])]


def _with(i, value):
    args = _args()
    args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.mark.parametrize("args, match", [
    (_with(0, lambda x: x.long()), "x must be a float16/bfloat16/float32/float64"),
    (_with(0, lambda x: x[None]), r"x must be 2-D \[T, d\]"),
    (_with(1, lambda g: g.double()), "g must have x's dtype"),
    (_with(1, lambda g: g[:, :3]), r"g must be as wide as x \(4\)"),
    (_with(1, lambda g: torch.randn(3, 4)), "g must have one row per word"),
    (_with(2, lambda o: o.float()), "word_offsets must be an int64"),
    (_with(2, torch.tensor([0, 2, 6])), "word_offsets must start at 0 and end at T=5"),
    (_with(2, torch.tensor([0, 3, 2, 5])), "word_offsets must be non-decreasing"),
])
def test_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        ADD(*args)
    with pytest.raises(ValueError, match=match):
        NORM(*args, torch.ones(4), 1e-6)


@pytest.mark.parametrize("weight, eps, kwargs, match", [
    (torch.ones(5), 1e-6, {}, r"weight must have shape \(4,\)"),
    (torch.ones(4, dtype=torch.int32), 1e-6, {}, "weight must be a float tensor"),
    (torch.ones(4), -1.0, {}, "eps must be a finite float >= 0"),
    (torch.ones(4), 1e-6, {"out_dtype": torch.int32}, "out_dtype must be a float dtype"),
])
def test_bad_norm_inputs(weight, eps, kwargs, match):
    with pytest.raises(ValueError, match=match):
        NORM(*_args(), weight, eps, **kwargs)


@pytest.mark.parametrize("case", ["float32, both outputs", "bfloat16, normed only"])
def test_inductor_decomposition_on_cpu_matches_the_kernels(case):
    """Under inductor on CPU the fused op and its backward are decomposed into aa::guide_add,
    aa::guide_add_backward and RMSNorm math that inductor generates: the compiled code calls
    the plain ops and not the fused ones, and its outputs and gradients equal the eager
    kernels' (the same definition: y rounded first, one rounding of each output)."""
    from torch._inductor.utils import run_and_get_code

    from aa_compile.ops import install_inductor_decompositions

    install_inductor_decompositions()  # what the aa backend does before its first compile
    both = case.startswith("float32")
    p = (Problem((3, 1, 0, 9, 2), 24, torch.float32, torch.float32, None, 1e-6, 5) if both
         else Problem((2, 5, 1), 16, torch.bfloat16, torch.float32, torch.float32, 1e-5, 6))
    x, g, offsets, w, gy, gn = p.make()

    def f(a, b, c):
        return NORM(a, b, offsets, c, p.eps, p.out_dtype)

    def run(fn, leaves):
        y, normed = fn(*leaves)
        if both:
            torch.autograd.backward([y, normed], [gy, gn])
        else:
            normed.backward(gn)
        return y, normed

    torch._dynamo.reset()
    got_leaves, want_leaves = [_leaf(t) for t in (x, g, w)], [_leaf(t) for t in (x, g, w)]
    got, code = run_and_get_code(run, torch.compile(f, backend="inductor"), got_leaves)
    want = run(f, want_leaves)
    code = "\n".join(code)
    assert "ops.aa.guide_add_rms_norm" not in code  # (not called; names and comments stay)
    assert "aa.guide_add.default" in code and "aa.guide_add_backward.default" in code
    tol = ({"rtol": 1e-5, "atol": 1e-6} if both else {"rtol": 2 * 2**-8, "atol": 1e-2})
    for a, e in zip(got, want):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **tol)
    for a, e in zip(got_leaves, want_leaves):
        torch.testing.assert_close(a.grad, e.grad, **tol)
