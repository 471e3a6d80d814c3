"""The `aa` backend: registration, options, inner compilers, pass failures, logging, caching."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import aa_compile
from aa_compile.passes.pipeline import PASSES


class MLP(nn.Module):
    """Nothing in here matches any pass."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def run_python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )


def test_backend_is_registered():
    assert "aa" in torch._dynamo.list_backends()


def test_entry_point_works_without_import():
    proc = run_python(
        """
        import sys, torch
        f = torch.compile(lambda x: torch.sin(x) * 2, backend="aa",
                          options={"inner_compiler": "eager"})
        x = torch.randn(5)
        assert torch.allclose(f(x), torch.sin(x) * 2)
        print("aa_compile" in sys.modules)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_bad_option_through_torch_compile_raises_value_error_at_first_call():
    compiled = torch.compile(MLP(), backend="aa", options={"inner_compilr": "eager"})
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 16))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or getattr(e, "inner_exception", None)
    assert any(isinstance(c, ValueError) and "valid options" in str(c) for c in chain)


def test_compile_helper_checks_options_immediately():
    with pytest.raises(ValueError, match="unknown option"):
        aa_compile.compile(MLP(), options={"bogus": True})
    with pytest.raises(TypeError, match="nn.Module or callable"):
        aa_compile.compile(42)


@pytest.mark.parametrize("inner", ["eager", "aot_eager", "inductor"])
def test_unmatched_model_runs_like_eager(inner):
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16, requires_grad=True)
    rep = aa_compile.report(model, x, options={"inner_compiler": inner})
    from aa_compile.passes.pipeline import PASSES

    assert rep.rewrites == dict.fromkeys(PASSES, 0)
    compiled = torch.compile(model, backend="aa", options={"inner_compiler": inner})
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert x.grad is not None


def test_unmatched_model_gets_exactly_inductors_code():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(4, 16)
    ours = torch.compile(model, backend="aa")(x)
    torch._dynamo.reset()
    theirs = torch.compile(model)(x)
    assert torch.equal(ours, theirs)


def test_failing_pass_is_reported_not_fatal(monkeypatch):
    def boom(self, gm, ctx):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(type(PASSES["rms_norm"]), "run", boom)
    x = torch.randn(3, 16)
    rep = aa_compile.report(MLP(), x, options={"inner_compiler": "eager"})
    assert rep.errors == [("rms_norm", "RuntimeError: synthetic failure")]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="synthetic failure"):
        aa_compile.report(MLP(), x, options={"inner_compiler": "eager", "strict": True})


def test_tensorrt_inner_compiler_without_package_says_how_to_install():
    try:
        import torch_tensorrt  # noqa: F401

        pytest.skip("torch-tensorrt is installed")
    except ImportError:
        pass
    with pytest.raises(Exception, match=r"needs torch-tensorrt.*pip install 'torch-tensorrt==2\.\d+\.\*'"):
        torch.compile(MLP(), backend="aa", options={"inner_compiler": "tensorrt"})(
            torch.randn(2, 16)
        )


def test_debug_logging_from_env_var():
    proc = run_python(
        """
        import torch, aa_compile
        from aa_compile.models.transformer import RMSNorm
        torch.compile(RMSNorm(8), backend="aa", options={"inner_compiler": "eager"})(
            torch.randn(2, 8))
        """,
        env={"AA_COMPILE_LOG": "debug"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "[aa_compile DEBUG] pass rms_norm: 1 rewrite(s)" in proc.stderr


def test_bad_log_level_is_rejected():
    proc = run_python("import aa_compile", env={"AA_COMPILE_LOG": "loud"})
    assert proc.returncode != 0
    assert "AA_COMPILE_LOG='loud' is not a logging level" in proc.stderr


def test_pass_uuid_is_stable_across_processes():
    here = PASSES["rms_norm"].uuid()
    assert isinstance(here, bytes) and here == type(PASSES["rms_norm"])().uuid()
    proc = run_python(
        "from aa_compile.passes.pipeline import PASSES; print(PASSES['rms_norm'].uuid().hex())"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == here.hex()


@pytest.mark.slow
def test_inductor_fx_graph_cache_hits_on_second_process(tmp_path):
    code = """
        import json, torch, aa_compile
        from torch._dynamo.utils import counters
        from aa_compile.models import Transformer, TransformerConfig
        torch.manual_seed(0)
        m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                          max_seq_len=16))
        torch.compile(m, backend="aa")(torch.randint(0, 64, (1, 8)))
        print(json.dumps(dict(counters["inductor"])))
    """
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    first = run_python(code, env)
    assert first.returncode == 0, first.stderr
    second = run_python(code, env)
    assert second.returncode == 0, second.stderr
    hits = json.loads(second.stdout.strip().splitlines()[-1])
    assert hits.get("fxgraph_cache_hit", 0) >= 1, hits


def test_mode_and_inductor_options_reach_inductor(monkeypatch):
    """torch.compile(mode=...) and options["inductor_options"] become inductor config patches."""
    import torch._inductor.compile_fx as cfx

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        seen["patches"] = config_patches
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    x = torch.randn(2, 16)
    torch.compile(MLP(), backend="aa", mode="max-autotune-no-cudagraphs")(x)
    assert seen["patches"]["max_autotune"] is True
    torch._dynamo.reset()
    torch.compile(MLP(), backend="aa", options={"inductor_options": {"max_fusion_size": 7}})(x)
    patches = dict(seen["patches"])
    assert patches.pop("post_grad_custom_post_pass") is not None  # the ops-version hook
    assert patches == {"max_fusion_size": 7}


def test_ops_source_hash_tracks_kernel_sources(tmp_path, monkeypatch):
    """Inductor's cache key gets a hash of the op/kernel sources: editing a kernel changes it."""
    from aa_compile.ops import registry

    mod = tmp_path / "aa_fake_kernel_mod.py"
    mod.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = registry.OpEntry(name="aa::_hash_probe", op=None,
                             kernels={"cpu": "aa_fake_kernel_mod:kernel"},
                             samples=lambda d: iter(()))
    monkeypatch.setattr(registry, "collect", lambda: {entry.name: entry})
    before = registry.source_hash()
    assert registry.source_hash() == before  # deterministic
    mod.write_text("X = 2\n")
    assert registry.source_hash() != before


def test_inductor_compiles_carry_the_ops_version_pass(monkeypatch):
    import torch._inductor.compile_fx as cfx

    from aa_compile import backend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches or {})
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    fn = torch.compile(lambda x: x * 2, backend="aa")
    fn(torch.ones(3))
    hook = seen.get("post_grad_custom_post_pass")
    assert hook is not None and isinstance(hook.uuid(), bytes)
    from aa_compile.ops.registry import source_hash

    assert hook.uuid() == source_hash()
    assert isinstance(backend, object)
