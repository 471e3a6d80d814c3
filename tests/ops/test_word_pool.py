"""`aa::word_pool`: its kernels (``cpu``: the segment path; ``triton``: in the interpreter on CPU
tensors without a GPU, so sizes and example counts are small there) and the op (autograd,
gradcheck, equality with the HAT reference model's pooling, bad inputs, tracing under
torch.compile), each against the float64 padded reference: random word-length distributions
(1-byte words, words at HAT's 100-byte limit, empty words), W = 0 / T = 0, odd D, GQA, shared
and per-word queries, every dtype it takes."""

from __future__ import annotations

import dataclasses
import importlib.util

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from aa_compile.kernels.word_pool import cpu, reference
from aa_compile.models.hat import HATConfig, HATModel
from aa_compile.ops import OPS

from ..strategies import check_layout_invariance, op_calls

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
if HAS_TRITON:
    from aa_compile.kernels.word_pool import triton_kernel

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OP = torch.ops.aa.word_pool
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TRITON_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: max error / max(1, max |float64 answer|): float32 and float64 from accumulation order; half
#: types from the one rounding of the output (2 ulps), nothing from the float32 softmax
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2 * 2**-8,
           torch.float16: 2 * 2**-11}
HEADS = [(1, 1), (4, 4), (4, 2), (6, 2), (3, 1)]

pytestmark = pytest.mark.usefixtures("one_thread")


def on_device(fn):
    """``fn`` on DEVICE tensors (the Triton kernels' device), its results back on the CPU."""
    def call(*args):
        out = fn(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args))
        if isinstance(out, tuple):
            return tuple(None if o is None else o.cpu() for o in out)
        return out.cpu()
    return call


@dataclasses.dataclass(frozen=True)
class Problem:
    lengths: tuple[int, ...]
    heads: int
    kv_heads: int
    dim: int
    shared_q: bool
    dtype: torch.dtype
    scale: float | None
    magnitude: float
    seed: int

    @property
    def n_words(self) -> int:
        return len(self.lengths)

    def make(self):
        """``(q, k, v, offsets, grad)``: values drawn in float64, then cast."""
        g = torch.Generator().manual_seed(self.seed)
        offsets = torch.zeros(self.n_words + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(self.lengths, dtype=torch.int64).cumsum(0)
        t = int(offsets[-1])

        def randn(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(self.dtype)

        q = randn(1 if self.shared_q else self.n_words, self.heads, self.dim,
                  scale=self.magnitude)
        k = randn(t, self.kv_heads, self.dim, scale=self.magnitude)
        v = randn(t, self.kv_heads, self.dim)
        grad = randn(self.n_words, self.heads, self.dim)
        return q, k, v, offsets, grad


word_lengths = st.one_of(
    st.integers(1, 12),  # mostly short words, as in text
    st.sampled_from([0, 1, 1, 99, 100]),  # empty words, single bytes, the byte limit
)
SHORT = st.one_of(st.integers(1, 6), st.sampled_from([0, 1, 17]))


@st.composite
def problems(draw, dtypes=DTYPES, max_words=12, lengths=word_lengths):
    heads, kv_heads = draw(st.sampled_from(HEADS))
    return Problem(
        lengths=tuple(draw(st.lists(lengths, min_size=0, max_size=max_words))),
        heads=heads, kv_heads=kv_heads,
        dim=draw(st.sampled_from([1, 3, 8, 17, 64])),
        shared_q=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        scale=draw(st.sampled_from([None, 0.25, 1.3])),
        magnitude=draw(st.sampled_from([0.3, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def references(q, k, v, offsets, grad, scale):
    """float64 ``(out, dq, dk, dv)`` on the (already rounded) inputs."""
    d64 = [t.double() for t in (q, k, v)]
    out = reference.word_pool(*d64, offsets, scale)
    return (out, *reference.word_pool_backward(grad.double(), *d64, offsets, scale))


def check(got, want, dtype, name="", terms=0.0):
    """Within ``REL_TOL`` of the result's scale, plus (float32/float64) a few rounding steps of
    ``terms``, the size of the terms that cancel in it."""
    assert got.dtype == dtype, name
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert not got.isnan().any(), name
    if got.numel() == 0:
        return
    err = (got.double() - want).abs().max().item()
    bound = REL_TOL[dtype] * max(1.0, want.abs().max().item())
    if dtype in (torch.float32, torch.float64):
        bound += 4 * torch.finfo(dtype).eps * terms
    assert err <= bound, (name, err, bound)


def score_grad_terms(q, k, v, grad, scale) -> float:
    """The size of the terms of ``dS = P * (dO . v - delta)`` times a q or k entry: where the
    softmax saturates, ``dq`` and ``dk`` cancel to far below these and keep their rounding."""
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    rows = [x.double().norm(dim=-1).max().item() for x in (grad, v)]
    return scale * rows[0] * rows[1] * max(q.abs().max().item(), k.abs().max().item())


def check_all(fwd, bwd, p: Problem):
    q, k, v, offsets, grad = p.make()
    wants = references(q, k, v, offsets, grad, p.scale)
    out = fwd(q, k, v, offsets, p.scale)
    dq, dk, dv = bwd(grad, q, k, v, offsets, p.scale)
    terms = score_grad_terms(q, k, v, grad, p.scale)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), wants):
        check(got, want, p.dtype, name, terms if name in ("dq", "dk") else 0.0)
    empty = torch.tensor([n == 0 for n in p.lengths], dtype=torch.bool)
    if empty.any():  # empty words: exact zero rows (and no gradient into a per-word query)
        assert (out[empty] == 0).all()
        if not p.shared_q:
            assert (dq[empty] == 0).all()


def _through_op(q, k, v, offsets, grad, scale):
    """``(out, dq, dk, dv)`` through the op and autograd."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = OP(*leaves, offsets, scale)
    out.backward(grad)
    return (out.detach(), *(t.grad for t in leaves))


def kernel(name: str):
    """``(forward, backward)`` of a kernel (``op``: the op, the backward through autograd);
    Triton on DEVICE, results back on the CPU."""
    if name == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        return on_device(triton_kernel.word_pool_fwd), on_device(triton_kernel.word_pool_bwd)
    if name == "op":
        return OP, lambda grad, q, k, v, offsets, scale: _through_op(q, k, v, offsets, grad,
                                                                      scale)[1:]
    return cpu.word_pool_fwd, cpu.word_pool_bwd


# --- the kernels and the op against the float64 reference ----------------------------------

#: per kernel: the problems (Triton: few short words, no float64) and the examples
PROPERTY = {
    "cpu": (problems(), 25),
    "triton": (problems(dtypes=TRITON_DTYPES, max_words=4, lengths=SHORT), 6),
    "op": (problems(), 12),
}


@pytest.mark.parametrize("name", list(PROPERTY))
def test_matches_float64_reference(name):
    strategy, examples = PROPERTY[name]

    @settings(max_examples=examples, deadline=None)
    @given(strategy)
    def run(p):
        check_all(*kernel(name), p)

    run()


@pytest.mark.parametrize("name", ["cpu", "triton", "op"])
@pytest.mark.parametrize("shared", [True, False])
def test_no_words_and_no_bytes(name, shared):
    for lengths in ((), (0,), (0, 0, 0)):
        check_all(*kernel(name), Problem(lengths, 4, 2, 5, shared, torch.float32, None, 1.0, 0))


@pytest.mark.parametrize("name", ["cpu", "triton"])
@pytest.mark.parametrize("lengths, heads, shared", [
    ((), (2, 2), True), ((0,), (2, 1), False), ((0, 3, 0), (4, 2), True),
    ((100,), (2, 1), True), ((1, 16, 17, 33), (2, 2), False),
])
def test_edge_words(name, lengths, heads, shared):
    """Empty words, no words, a word at the byte limit, tile boundaries (Triton's BLOCK_L =
    16)."""
    check_all(*kernel(name), Problem(lengths, *heads, 5, shared, torch.float32, None, 1.0, 7))


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_is_sdpa_with_key_mask(name):
    """The reference (and the segment path) compute what HAT's WordPooling computes: SDPA over
    padded words with a key mask (``repeat_interleave`` of the key heads for GQA)."""
    forward = reference.word_pool if name == "reference" else kernel(name)[0]
    p = Problem((3, 1, 7, 2, 100), 4, 2, 8, False, torch.float64, None, 1.0, 3)
    q, k, v, offsets, _ = p.make()
    index, mask = reference.grid(offsets)
    kk = k.repeat_interleave(2, dim=1)[index].transpose(1, 2)  # [W, H, L, D]
    vv = v.repeat_interleave(2, dim=1)[index].transpose(1, 2)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], kk, vv, attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(forward(q, k, v, offsets), want)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_large_scores_do_not_overflow(name):
    """Scores of +-1e4 (exp would overflow without the per-word max) stay finite."""
    p = Problem((5, 1, 30), 2, 2, 4, True, torch.float32, 1.0, 60.0, 1)
    check_all(*kernel(name), p)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_inputs_not_modified(name):
    fwd, bwd = kernel(name)
    p = Problem((4, 2, 9), 4, 2, 6, False, torch.float32, None, 1.0, 5)
    q, k, v, offsets, grad = p.make()
    before = [t.clone() for t in (q, k, v, grad)]
    fwd(q, k, v, offsets, None)
    bwd(grad, q, k, v, offsets, None)
    for a, b in zip(before, (q, k, v, grad)):
        assert torch.equal(a, b)


@settings(max_examples=10)
@given(problems(dtypes=[torch.float32], max_words=60, lengths=st.integers(1, 9)))
def test_cpu_many_short_words(p):
    """Text-like batches: many words of 1..9 bytes."""
    check_all(*kernel("cpu"), p)


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_backward_is_deterministic(name):
    _, bwd = kernel(name)
    p = Problem((3, 9, 1, 20), 2, 1, 8, True, torch.float32, None, 1.0, 3)
    q, k, v, offsets, grad = p.make()
    first = bwd(grad, q, k, v, offsets, None)
    second = bwd(grad, q, k, v, offsets, None)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _triton_args(t=5, h=2, hkv=2, d=4, w=2, dtype=torch.float32):
    offsets = torch.tensor([0, 2, t]) if w == 2 else torch.tensor([0, t])
    return (torch.randn(w, h, d, dtype=dtype), torch.randn(t, hkv, d, dtype=dtype),
            torch.randn(t, hkv, d, dtype=dtype), offsets)


@needs_triton
@pytest.mark.parametrize("bad, name", [
    (lambda a: (a[0].double(), a[1].double(), a[2].double(), a[3]), "q: float64"),
    (lambda a: (a[0], a[1][:, :, :3], a[2][:, :, :3], a[3]), "k's head dimension"),
    (lambda a: (a[0], a[1], a[2][:4], a[3]), "v must have k's shape"),
    (lambda a: (a[0][:1, :1], a[1], a[2], a[3]), "q's head count 1"),
    (lambda a: (a[0], a[1], a[2], a[3].float()), "word_offsets must be an int64"),
    (lambda a: (torch.randn(3, 2, 4), a[1], a[2], a[3]), "q must have one query per word"),
])
def test_triton_bad_input_raises_naming_argument(bad, name):
    with pytest.raises(ValueError, match=name):
        triton_kernel.word_pool_fwd(*bad(_triton_args()))


@needs_triton
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_triton_any_input_layout(data):
    """Strided / transposed / permuted / expanded q, k, v and grad give what contiguous ones
    give (the offsets keep their values: the kernels trust them)."""
    samples = [s for s in OPS["aa::word_pool_backward"].samples(DEVICE)
               if DEVICE != "cpu" or s[0][1].dtype == torch.float32]
    call = data.draw(op_calls(samples, keep_values=(4,)), label="call")
    check_layout_invariance(triton_kernel.word_pool_bwd, call, "word_pool_bwd")
    fwd = data.draw(op_calls([(a[1:], k) for a, k in samples], keep_values=(3,)), label="fwd")
    check_layout_invariance(triton_kernel.word_pool_fwd, fwd, "word_pool_fwd")


# --- the op ---------------------------------------------------------------------------------

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


def tiny_hat(seed=0, **overrides):
    """A tiny random `HATModel` (norm weights away from 1)."""
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
    m = tiny_hat(pool_qk_norm=qk_norm)
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
    want = _through_op(q, k, v, offsets, grad * 2, None)
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
