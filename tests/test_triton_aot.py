"""Every Triton kernel of aa_compile, compiled ahead of time for sm_90, sm_89 and sm_80 at the
launch configurations the library picks (``tests/triton_aot``), without a GPU.

One subprocess (no ``TRITON_INTERPRET``: the interpreter never compiles) records and compiles
everything once per session, through a result cache (``$AA_TRITON_AOT_CACHE``, default
``~/.cache/aa-compile/triton-aot``), and writes ``build/triton_aot/report.{json,md}``; each
(case, architecture) is then one test: it fails on a compile error, shared memory over the
architecture's per-block limit, spill stores over the kernel's ``AOT_SPILL_BUDGET`` entry (0
when absent) or more registers than the register file holds. A case is skipped only where its
op refuses the architecture (FP8 below sm_89), and never on the newest one. A kernel that no
case launches fails `test_every_jit_function_is_compiled`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tests.triton_aot import build, cases, launches  # noqa: E402
from tests.triton_aot.__main__ import problems, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "triton_aot"
CASE_NAMES = [c.name for c in cases.cases()]


@pytest.fixture(scope="module")
def report(request) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "tests.triton_aot", "--out", str(OUT), "--quiet"]
    path = OUT / "report.json"
    path.unlink(missing_ok=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not path.is_file():
        pytest.fail(f"{' '.join(cmd)} wrote no report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    data = json.loads(path.read_text())
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n{proc.stdout.strip()}")
        if request.config.getoption("verbose") > 0:
            reporter.write_line(table(data))
    return data


@pytest.mark.parametrize("cc", cases.ARCHS, ids=lambda cc: f"sm{cc}")
@pytest.mark.parametrize("name", CASE_NAMES)
def test_compiles_within_limits(report, name, cc):
    """The case's launches compile for ``sm_<cc>`` within shared memory, registers and the
    kernel's spill budget."""
    rec = report["cases"][name][str(cc)]
    if "refused" in rec:
        assert cc != max(report["archs"]), f"the op refuses the newest target: {rec['refused']}"
        pytest.skip(f"the op refuses sm_{cc}: {rec['refused']}")
    assert "error" not in rec, f"the library call failed: {rec.get('error')}"
    assert rec["launches"], "the call launched no Triton kernel"
    found = [f"{row['kernel']}: {p}" for row in rec["launches"] for p in row["problems"]]
    assert not found, "\n".join(found)


def test_every_jit_function_is_compiled(report):
    """Every ``@triton.jit`` function of aa_compile.kernels is launched by a case, or called
    by a launched kernel."""
    assert len(report["kernels"]) >= 19, report["kernels"]
    assert not report["never_launched"], (
        "no case in tests/triton_aot/cases.py launches: " + ", ".join(report["never_launched"]))


# -- on a GPU: each case's launches run, and agree with the CPU kernel -------------------------

#: largest |cuda - cpu| allowed, relative to max(1, max |cpu|), by the inputs' dtype
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def _with_values(args: tuple, seed: int, device: str) -> list:
    """The case's arguments on ``device`` with every float tensor filled with uniform [0, 1)
    values (valid for every op: probabilities, scales, activations); index tensors as the case
    built them."""
    g = torch.Generator(device).manual_seed(seed)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = torch.rand(a.shape, generator=g, device=device).to(a.dtype)
        elif isinstance(a, torch.Tensor):
            a = a.to(device)
        out.append(a)
    return out


def _float_outputs(out) -> list[torch.Tensor]:
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()]


@pytest.mark.cuda
@pytest.mark.parametrize("name", CASE_NAMES)
def test_case_on_the_gpu_matches_the_cpu_kernel(name):
    """The AOT-equivalent smoke: the case's op on the GPU (the launches the AOT test compiled
    for this GPU) against the same op on the CPU (whose kernels tests/ops checks against the
    float64 references). A refusal of this GPU (FP8 below sm_89) skips."""
    case = {c.name: c for c in cases.cases()}[name]
    args = _with_values(case.make(), seed=len(name), device="cuda")
    op = getattr(torch.ops.aa, case.op.split("::", 1)[1])
    try:
        got = op(*args)
    except (ValueError, RuntimeError) as e:
        if launches.REFUSAL.search(str(e)):
            pytest.skip(f"the op refuses this GPU: {e}")
        raise
    torch.cuda.synchronize()
    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    want = op(*args)
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    tol = TOLERANCE.get(dtype, 3e-2) * (4 if "fp8" in name else 1)
    for g, w in zip(_float_outputs(got), _float_outputs(want), strict=True):
        assert g.shape == w.shape
        w32, g32 = w.float(), g.float().cpu()
        scale = max(1.0, float(w32.abs().max())) if w32.numel() else 1.0
        err = float((g32 - w32).abs().max()) / scale if w32.numel() else 0.0
        assert err <= tol, f"max |cuda - cpu| / {scale:.3g} = {err:.3g} > {tol}"


# -- the machinery, on hand-written inputs --------------------------------------------------

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90'
ptxas info    : Function properties for _k
    312 bytes stack frame, 296 bytes spill stores, 284 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 64 bytes smem, 400 bytes cmem[0]
"""


def test_ptxas_numbers_from_a_log():
    assert build.ptxas_numbers(PTXAS_LOG) == {"regs": 255, "spill_stores": 296,
                                              "spill_loads": 284, "stack": 312}
    with pytest.raises(RuntimeError, match="dump_ptxas_log"):
        build.ptxas_numbers("no log here")


def _row(**kw):
    row = {"ok": True, "kernel": "m:_k", "cc": 89, "shared": 1000, "smem_limit": 101376,
           "spill_stores": 0, "spill_budget": 0, "regs": 128, "num_warps": 4}
    return {**row, **kw}


@pytest.mark.parametrize("change, expected", [
    ({}, []),
    ({"shared": 101377}, ["shared memory 101377 B > sm_89 limit 101376 B"]),
    ({"spill_stores": 8}, ["spills 8 B/thread > budget 0 B"]),
    ({"spill_stores": 8, "spill_budget": 8}, []),
    ({"regs": 255, "num_warps": 16}, ["255 registers x 512 threads > 65536"]),
    ({"ok": False, "error": "CompilationError: boom"}, ["compile error: CompilationError"]),
])
def test_problems_of_a_launch(change, expected):
    found = problems(_row(**change))
    assert len(found) == len(expected), found
    for text, want in zip(found, expected):
        assert text.startswith(want), text


@pytest.mark.parametrize("message, refused", [
    ("FP8 matmul needs a GPU with compute capability >= 8.9 (Ada, Hopper or newer); cuda:0 is "
     "sm_80", True),
    ("the kernel needs sm_90", True),
    ("x: expected a 2-D tensor, got 3-D", False),
    ("int8 weights: 128 columns", False),
])
def test_refusal_is_told_by_its_message(message, refused):
    assert bool(launches.REFUSAL.search(message)) is refused


def test_cases_name_ops_with_a_cuda_kernel():
    """Every case calls a registered op that has a CUDA kernel, under a unique name (a renamed
    op fails here rather than as a recording error)."""
    import aa_compile.ops

    assert len(set(CASE_NAMES)) == len(CASE_NAMES)
    with_cuda = {name for name, entry in aa_compile.ops.OPS.items() if "cuda" in entry.kernels}
    assert {c.op for c in cases.cases()} - with_cuda == set()
