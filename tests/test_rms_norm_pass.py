"""The RMSNorm rewrite: fires on every spelling it claims, leaves what fails a guard, stays exact."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import aa_compile
from aa_compile.models.transformer import RMSNorm

EAGER = {"inner_compiler": "eager"}


class Spelled(nn.Module):
    """RMSNorm written in one of the ways real models write it."""

    def __init__(self, spelling: str, dim: int = 24, eps: float = 1e-5):
        super().__init__()
        self.spelling, self.eps = spelling, eps
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        s, w, eps = self.spelling, self.weight, self.eps
        if s == "functional":
            return F.rms_norm(x, (x.shape[-1],), w, eps)
        if s == "functional_no_eps":
            return F.rms_norm(x, (x.shape[-1],), w)
        if s == "square_mul":
            return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w
        if s == "torch_mean_square":
            return w * (x * torch.rsqrt(torch.mean(torch.square(x), -1, keepdim=True) + eps))
        if s == "div_sqrt":
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        if s == "eps_first":
            return x * (eps + x.pow(2).mean(-1, keepdim=True)).rsqrt() * w
        if s == "no_weight":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        if s == "float_method":
            h = x.float()
            return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w
        if s == "weight_then_cast":
            h = x.to(torch.float32)
            return (w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
        raise AssertionError(s)


SPELLINGS = ["functional", "functional_no_eps", "square_mul", "torch_mean_square", "div_sqrt",
             "eps_first", "no_weight", "float_method", "weight_then_cast"]


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_spelling_is_rewritten_and_exact(spelling, dtype):
    torch.manual_seed(0)
    m = Spelled(spelling).to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype) * 3
    rep = aa_compile.report(m, x, options=EAGER)
    assert rep.rewrites["rms_norm"] == 1, rep
    torch._dynamo.reset()
    got = torch.compile(m, backend="aa", options=EAGER)(x)
    want = m(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    # the op rounds once where the spelled-out form may round twice
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(got, want, **tol)


def test_mixed_precision_weight_keeps_promoted_dtype():
    """bf16 activations times an fp32 weight give fp32, as in the original graph."""
    m = RMSNorm(16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    got = torch.compile(m, backend="aa", options=EAGER)(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, m(x), atol=1e-2, rtol=1e-2)


def test_nn_rmsnorm_module_is_rewritten():
    m = nn.RMSNorm(12, eps=1e-6)
    x = torch.randn(2, 12)
    assert aa_compile.report(m, x, options=EAGER).rewrites["rms_norm"] == 1


class Guarded(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.weight = nn.Parameter(torch.randn(8))

    def forward(self, x):
        if self.case == "mean_over_dim0":
            return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)
        if self.case == "no_keepdim":
            return torch.rsqrt(x.pow(2).mean(-1) + 1e-6)
        if self.case == "rstd_reused":
            r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x * r * self.weight, r
        if self.case == "two_dim_functional":
            return F.rms_norm(x, x.shape[-2:])
        if self.case == "eps_tensor":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.weight[:1])
        raise AssertionError(self.case)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("mean_over_dim0", "mean is not over the last dimension"),
        ("no_keepdim", None),
        ("rstd_reused", "used outside the RMSNorm pattern"),
        ("two_dim_functional", "is not just the last dimension"),
        ("eps_tensor", "eps is not a constant"),
    ],
)
def test_guards_leave_the_graph_alone_and_say_why(case, reason):
    m = Guarded(case)
    x = torch.randn(6, 8) + 0.5
    rep = aa_compile.report(m, x, options=EAGER)
    assert rep.rewrites["rms_norm"] == 0
    if reason is not None:
        assert any(reason in r for _, _, r in rep.skipped), rep.skipped
    torch._dynamo.reset()
    got = torch.compile(m, backend="aa", options=EAGER)(x)
    torch.testing.assert_close(got, m(x))


def test_broadcast_weight_is_left_as_a_multiply():
    """A [1, 1, N] weight is not the op's [N] weight: the rewrite stops before the multiply."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 1, 8))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    m, x = M(), torch.randn(2, 3, 8)
    assert aa_compile.report(m, x, options=EAGER).rewrites["rms_norm"] == 1
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(m, backend="aa", options=EAGER)(x), m(x))


def test_disabled_pass_does_not_fire():
    m, x = RMSNorm(8), torch.randn(2, 8)
    rep = aa_compile.report(m, x, options={"inner_compiler": "eager", "disable": ["rms_norm"]})
    assert "rms_norm" not in rep.rewrites
    assert "rms_norm" not in rep.passes_run


def test_inductor_generates_the_cpu_code_itself():
    """On CPU the op reaches inductor as math (fused loops), not as an opaque extern call."""
    from torch._inductor.utils import run_and_get_code

    m, x = RMSNorm(32), torch.randn(4, 32, requires_grad=True)
    _, code = run_and_get_code(lambda: torch.compile(m, backend="aa")(x).sum().backward())
    assert code and not any("aa.rms_norm" in c for c in code)


def test_hugging_face_llama_rmsnorm_is_rewritten():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        rep = aa_compile.report(lambda i: model(input_ids=i).logits, ids, options=EAGER)
        assert rep.rewrites["rms_norm"] == 2 * cfg.num_hidden_layers + 1, rep
        torch._dynamo.reset()
        got = torch.compile(lambda i: model(input_ids=i).logits, backend="aa", options=EAGER)(ids)
        torch.testing.assert_close(got, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_dynamic_shapes_with_symbolic_eps(inner):
    """Under dynamic=True dynamo lifts ``self.eps`` into a graph input (a symbolic float); the
    rewrite still fires and one graph serves every sequence length."""
    torch.manual_seed(0)
    m = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        m.weight.normal_()
    compiled = torch.compile(m, backend="aa", options={"inner_compiler": inner}, dynamic=True)
    counts = []
    for rows in (3, 5, 9):
        x = torch.randn(2, rows, 16)
        torch.testing.assert_close(compiled(x), m(x), atol=1e-5, rtol=1e-5)
        counts.append(len(aa_compile.last_report().graphs))
    # inductor wants eps concrete: dynamo then retraces once with it specialized, within the
    # first call; later sequence lengths compile nothing new
    assert counts[0] == counts[1] == counts[2]
    graphs = aa_compile.last_report().graphs
    assert graphs and all(g.passes[0].rewrites == 1 for g in graphs)


def test_pass_runs_through_the_custom_graph_pass_interface():
    """A pass as inductor's CustomGraphPass hook rewrites like run() does."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    from aa_compile.passes.pipeline import PASSES

    hook = PASSES["rms_norm"].as_inductor_pass()
    assert isinstance(hook, CustomGraphPass) and hook.uuid() == PASSES["rms_norm"].uuid()
    seen = []

    def backend(gm, example_inputs):
        hook(gm.graph)
        seen.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    m, x = RMSNorm(8), torch.randn(3, 8)
    torch.testing.assert_close(torch.compile(m, backend=backend)(x), m(x))
    assert torch.ops.aa.rms_norm.default in seen
    assert torch.rsqrt not in seen
