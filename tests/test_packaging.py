"""Packaging: the package-dir mapping names every package; the wheel ships kernels/ and passes/."""

import pathlib
import subprocess
import sys
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAPPING = {"aa_compile": "aa_compile", "aa_compile.kernels": "kernels",
           "aa_compile.passes": "passes"}


def source_packages() -> set[str]:
    found = set()
    for name, folder in MAPPING.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    # aa_compile/ itself does not hold kernels/ or passes/, so nothing is counted twice
    return found


def test_pyproject_lists_every_package_folder():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == source_packages()
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == MAPPING


def test_backend_entry_point_and_extras_are_declared():
    project = PYPROJECT["project"]
    assert project["entry-points"]["torch_dynamo_backends"] == {
        "aa": "aa_compile.backend:aa_backend"
    }
    assert {"triton", "cutlass", "tensorrt", "onnx", "bench", "dev"} <= set(
        project["optional-dependencies"]
    )
    assert any(d.startswith("torch>=2.6") for d in project["dependencies"])


def test_installed_package_resolves_mapped_folders():
    import aa_compile.kernels.rms_norm.reference as ref
    import aa_compile.passes.rms_norm as rms

    assert pathlib.Path(ref.__file__).resolve().parent == ROOT / "kernels" / "rms_norm"
    assert pathlib.Path(rms.__file__).resolve().parent == ROOT / "passes"


@pytest.mark.slow
def test_wheel_contains_mapped_packages(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("aa_compile-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in source_packages():
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    assert "aa_compile/kernels/rms_norm/reference.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "aa = aa_compile.backend:aa_backend" in text
