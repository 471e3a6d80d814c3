"""CUDA-only checks (run by bench/gpu_check.sh; skipped without a GPU)."""

import pytest
import torch

import aa_compile
from aa_compile.kernels.rms_norm import reference
from aa_compile.models import Transformer, TransformerConfig

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_dispatches_to_triton_and_matches_reference(dtype):
    x = torch.randn(37, 999, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(999, device="cuda", dtype=dtype, requires_grad=True)
    y = torch.ops.aa.rms_norm(x, w, 1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    want = reference.rms_norm(x.double(), w.double(), 1e-6)
    dx, dw = reference.rms_norm_backward(g.double(), x.double(), w.double(), 1e-6)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double(), dx, atol=tol * 10, rtol=tol)
    torch.testing.assert_close(w.grad.double(), dw, atol=tol * 100, rtol=tol * 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aa_transformer_on_cuda_keeps_the_triton_kernel(dtype):
    """On CUDA the decomposition declines, so inductor calls the Triton kernel."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    m = Transformer(TransformerConfig(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                                      n_kv_heads=2, max_seq_len=64)).to("cuda", dtype)
    ids = torch.randint(0, 256, (2, 32), device="cuda")
    out, code = run_and_get_code(lambda: torch.compile(m, backend="aa")(ids))
    assert any("aa.rms_norm" in c for c in code)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), m(ids).float(), atol=tol, rtol=tol)
    assert aa_compile.last_report().graphs[-1].passes[0].rewrites == 5
