"""aa::word_pool as an op: autograd against the float64 reference, gradcheck, equality with the
HAT reference model's pooling (a tiny HATModel, a ByteBatch from its splitter), bad inputs
(ValueError naming the argument), and tracing under torch.compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from aa_compile.models.hat import HATConfig, HATModel

from .kernels.test_word_pool_cpu import Problem, check, problems, references

OP = torch.ops.aa.word_pool


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(q, k, v, offsets, grad, scale):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = OP(*leaves, offsets, scale)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


@settings(max_examples=12, deadline=None)
@given(problems())
def test_autograd_matches_float64_reference(p):
    q, k, v, offsets, grad = p.make()
    wants = references(q, k, v, offsets, grad, p.scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"),
                               _run(q, k, v, offsets, grad, p.scale), wants):
        check(got, want, p.dtype, name)


@pytest.mark.parametrize("shared", [True, False])
def test_gradcheck_float64(shared):
    q, k, v, offsets, _ = Problem((3, 1, 0, 4), 4, 2, 3, shared, torch.float64, None, 1.0,
                                  2).make()
    args = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda a, b, c: OP(a, b, c, offsets, 0.7), args)


def test_only_requested_gradients():
    q, k, v, offsets, grad = Problem((2, 3), 2, 2, 4, True, torch.float32, None, 1.0, 1).make()
    k.requires_grad_(True)
    OP(q, k, v, offsets).backward(grad)
    assert k.grad is not None and q.grad is None and v.grad is None


def _hat(seed=0, **overrides):
    torch.manual_seed(seed)
    m = HATModel(HATConfig.tiny(**overrides))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


TEXTS = ["Hello, world! Grüße aus Köln.", "x", "The quick brown fox jumps over the lazy dog."]


def _pool_with_op(pool, h, offsets):
    """`WordPooling.forward` with the attention replaced by the op: projections on the byte
    stream itself (no padding), per-head norms, the op, ``o_proj``."""
    t = h.shape[0]
    heads, hd = pool.n_heads, pool.head_dim
    q = pool.q_norm(pool.q_proj(pool.latent_query).view(heads, hd))[None]  # [1, H, hd]
    k = pool.k_norm(pool.k_proj(h).view(t, heads, hd))
    v = pool.v_proj(h).view(t, heads, hd)
    return pool.o_proj(OP(q, k, v, offsets).reshape(offsets.numel() - 1, -1))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_equals_hat_reference_pooling(qk_norm):
    """Forward and every gradient (h and the pooling parameters) of the reference
    ``WordPooling`` on a ByteBatch from the model's splitter equal the op-based form."""
    m = _hat(pool_qk_norm=qk_norm)
    batch = m.splitter.encode(TEXTS)
    h = torch.randn(batch.n_bytes, m.config.d_enc, requires_grad=True)
    want = m.pooling(h, batch.word_bytes, batch.word_mask)
    got = _pool_with_op(m.pooling, h, batch.word_offsets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(want)
    params = [h, *m.pooling.parameters()]
    g_want = torch.autograd.grad(want, params, grad)
    g_got = torch.autograd.grad(got, params, grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiles_without_graph_breaks():
    q, k, v, offsets, grad = Problem((2, 5, 1), 4, 2, 8, True, torch.float32, None, 1.0,
                                     3).make()
    fn = torch.compile(lambda a, b, c: OP(a, b, c, offsets) * 2, backend="aot_eager",
                       fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad)
    want = _run(q, k, v, offsets, grad * 2, None)
    torch.testing.assert_close(out, want[0] * 2)
    for a, b in zip(leaves, want[1:]):
        torch.testing.assert_close(a.grad, b)


def _args(dtype=torch.float32):
    return [torch.randn(1, 4, 8, dtype=dtype), torch.randn(5, 2, 8, dtype=dtype),
            torch.randn(5, 2, 8, dtype=dtype), torch.tensor([0, 2, 5])]


def _with(i, value):
    args = _args()
    args[i] = value(args[i]) if callable(value) else value
    return args


@pytest.mark.parametrize("args, match", [
    (_with(0, lambda q: q.to(torch.int32)), "q must be a float16/bfloat16/float32/float64"),
    (_with(0, lambda q: q[0]), r"q must be 3-D \[W or 1, H, D\]"),
    (_with(1, lambda k: k.double()), "k must have q's dtype"),
    (_with(2, lambda v: v[:4]), "v must have k's shape"),
    (_with(0, lambda q: torch.randn(1, 3, 8)), "q's head count 3 must be a positive multiple"),
    (_with(0, lambda q: torch.randn(3, 4, 8)), "q must have one query per word"),
    (_with(0, lambda q: torch.randn(1, 4, 0)), "q must have a non-empty head dimension"),
    (_with(3, lambda o: o.float()), "word_offsets must be an int64"),
    (_with(3, lambda o: o[None]), "word_offsets must be 1-D"),
    (_with(3, torch.tensor([0, 2, 4])), "word_offsets must start at 0 and end at T=5"),
    (_with(3, torch.tensor([1, 2, 5])), "word_offsets must start at 0"),
    (_with(3, torch.tensor([0, 3, 2, 5])), "word_offsets must be non-decreasing"),
])
def test_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        OP(*args)


def test_bad_scale_and_grad():
    with pytest.raises(ValueError, match="scale must be a finite float"):
        OP(*_args(), float("nan"))
    q, k, v, o = _args()
    with pytest.raises(ValueError, match="grad must be"):
        torch.ops.aa.word_pool_backward(torch.randn(3, 4, 8), q, k, v, o, None)
