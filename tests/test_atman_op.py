"""`aa::atman_attention` (CPU path and Triton under the interpreter) vs the float64 reference."""

from __future__ import annotations

import pytest
import torch
from aa_compile.kernels.atman_attention import reference
from hypothesis import given, settings
from hypothesis import strategies as st

import aa_compile.ops  # noqa: F401

MODES = ["log_additive", "multiplicative"]


def _case(draw_shape, seed):
    b, hkv, g, sq, extra, d, n, causal = draw_shape
    gen = torch.Generator().manual_seed(seed)
    sk = sq + extra
    q = torch.randn(b, hkv * g, sq, d, generator=gen)
    k = torch.randn(b, hkv, sk, d, generator=gen)
    v = torch.randn(b, hkv, sk, d, generator=gen)
    idx = torch.randint(-1, sk, (b, n), generator=gen)
    fac = torch.rand(b, n, generator=gen) * 0.95 + 0.05
    return q, k, v, idx, fac, causal, extra


shapes = st.tuples(st.integers(1, 3), st.integers(1, 2), st.integers(1, 3), st.integers(1, 19),
                   st.integers(0, 7), st.sampled_from([1, 3, 8, 16]), st.integers(0, 4),
                   st.booleans())


@settings(max_examples=30)
@given(shape=shapes, seed=st.integers(0, 2**16), mode=st.sampled_from(MODES))
def test_cpu_matches_reference(shape, seed, mode):
    q, k, v, idx, fac, causal, off = _case(shape, seed)
    got = torch.ops.aa.atman_attention(q, k, v, idx, fac, mode, causal, off)
    want = reference.atman_attention(q.double(), k.double(), v.double(), idx, fac, mode, causal,
                                      off, None)
    eager = reference.atman_attention(q, k, v, idx, fac, mode, causal, off, None)
    err, err_eager = (got.double() - want).abs().max(), (eager.double() - want).abs().max()
    assert err <= 4 * err_eager + 1e-6


@settings(max_examples=6)
@given(shape=shapes, seed=st.integers(0, 2**16), mode=st.sampled_from(MODES))
def test_triton_interpreter_matches_reference(shape, seed, mode):
    pytest.importorskip("triton")
    from aa_compile.kernels.atman_attention import triton_kernel

    q, k, v, idx, fac, causal, off = _case(shape, seed)
    got = triton_kernel.atman_attention(q, k, v, idx, fac, mode, causal, off, None,
                                        block_m=16, block_n=16)
    want = reference.atman_attention(q.double(), k.double(), v.double(), idx, fac, mode, causal,
                                     off, None)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_strongest_suppression_wins_and_prefix_unchanged():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, generator=gen) for _ in range(3))
    for mode in MODES:
        a = torch.ops.aa.atman_attention(q, k, v, torch.tensor([[2, 2]]),
                                         torch.tensor([[0.5, 0.1]]), mode, True)
        b = torch.ops.aa.atman_attention(q, k, v, torch.tensor([[2]]), torch.tensor([[0.1]]),
                                         mode, True)
        plain = torch.ops.aa.atman_attention(q, k, v, torch.empty(1, 0, dtype=torch.long),
                                             torch.empty(1, 0), mode, True)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a[:, :, :2], plain[:, :, :2], rtol=0, atol=0)
        assert (a[:, :, 2:] - plain[:, :, 2:]).abs().max() > 1e-3


@pytest.mark.parametrize("change, match", [
    ({"mode": "x"}, "mode"),
    ({"fac": torch.tensor([[0.0]])}, "suppress_factor"),
    ({"fac": torch.tensor([[1.5]])}, "suppress_factor"),
    ({"idx": torch.tensor([[9]])}, "suppress_idx"),
    ({"idx": torch.tensor([[1.0]])}, "suppress_idx"),
    ({"k": torch.randn(1, 3, 6, 8), "v": torch.randn(1, 3, 6, 8)}, "multiple"),
    ({"q_offset": -1}, "q_offset"),
])
def test_bad_inputs(change, match):
    args = {"q": torch.randn(1, 2, 6, 8), "k": torch.randn(1, 2, 6, 8),
            "v": torch.randn(1, 2, 6, 8), "idx": torch.tensor([[1]]),
            "fac": torch.tensor([[0.5]]), "mode": "log_additive", "q_offset": 0}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        torch.ops.aa.atman_attention(args["q"], args["k"], args["v"], args["idx"], args["fac"],
                                     args["mode"], True, args["q_offset"])


def test_opcheck():
    from aa_compile.ops import OPS

    entry = OPS["aa::atman_attention"]
    for args, kwargs in entry.samples("cpu"):
        torch.library.opcheck(entry.op, args, kwargs,
                              test_utils=("test_schema", "test_faketensor"))
