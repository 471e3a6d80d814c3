"""The CUTLASS emitter of aa::fp8_linear: emits an sm90a FP8 GEMM (alpha = unit-scale
epilogue) through the CUTLASS Python interface and compiles it with nvcc.

Needs the ``cutlass`` extra (nvidia-cutlass) and ``nvcc``; skips with the reason otherwise.
Planning (about a minute: the interface enumerates every sm90 kernel) plus an nvcc compile of
a CUTLASS 3 kernel (one to two minutes on two cores) exceed the unit-test budget, so the
compile test is marked ``slow``. No GPU is needed (nothing runs)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from aa_compile.kernels.fp8_linear import cutlass_emit


def test_missing_interface_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cutlass_emit, "interface", lambda: None)
    with pytest.raises(RuntimeError, match=r"aa-compile\[cutlass\]"):
        cutlass_emit.emit_fp8_gemm(tmp_path)


@pytest.mark.slow
def test_emitted_sm90a_fp8_gemm_compiles_with_nvcc(tmp_path):
    if cutlass_emit.interface() is None:
        pytest.skip("the CUTLASS Python interface (pip install aa-compile[cutlass]) is absent")
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    cu = cutlass_emit.emit_fp8_gemm(tmp_path, "bf16", cc=90)
    src = cu.read_text()
    assert "float_e4m3_t" in src and "Sm90" in src
    assert 'extern "C" int aa_fp8_gemm_sm90(' in src
    obj = tmp_path / "gemm.o"
    proc = subprocess.run(cutlass_emit.nvcc_command(cu, obj, cc=90), capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert obj.stat().st_size > 0
    nm = shutil.which("cuobjdump")
    if nm:
        listing = subprocess.run([nm, "-lelf", str(obj)], capture_output=True, text=True,
                                 check=False)
        assert "sm_90a" in listing.stdout
