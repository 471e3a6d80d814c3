"""aa::guide_add and aa::guide_add_rms_norm as ops: autograd against the float64 reference,
gradcheck, equality with the HAT reference decoder's guide add + first attention norm (a tiny
HATModel, a ByteBatch from its splitter), bad inputs, tracing under torch.compile."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.guide_add import reference
from hypothesis import given, settings

from .kernels.test_guide_add_cpu import REL_TOL, Problem, check, problems
from .test_word_pool_op import TEXTS, _hat

ADD, NORM = torch.ops.aa.guide_add, torch.ops.aa.guide_add_rms_norm


pytestmark = pytest.mark.usefixtures("one_thread")


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
    m = _hat(guide_every_layer=every_layer)
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
    from aa_compile.models.transformer import RMSNorm
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

    import aa_compile  # noqa: F401  (installs the decompositions)

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
