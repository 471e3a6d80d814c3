"""Packaging: every package folder is listed, the wheel ships kernels/ and passes/, and no
top-level folder of ours shadows an installed package, whatever the working directory."""

import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Shipped inside aa_compile through a symlink, and namespace folders: no __init__.py at the top.
LINKED = {"kernels": "aa_compile.kernels", "passes": "aa_compile.passes"}
SITE_PACKAGES = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()


def source_packages() -> set[str]:
    found = set(LINKED.values())
    for folder, _, files in os.walk(ROOT / "aa_compile", followlinks=True):  # the two symlinks
        if "__init__.py" in files:
            found.add(".".join(pathlib.Path(folder).relative_to(ROOT).parts))
    return found


def run_python(code: str, cwd: pathlib.Path, python: str = sys.executable, **env):
    proc = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_pyproject_lists_every_package_folder():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == source_packages()
    assert "package-dir" not in PYPROJECT["tool"]["setuptools"]


def test_kernels_and_passes_are_symlinked_namespace_folders():
    for top, package in LINKED.items():
        assert not (ROOT / top / "__init__.py").exists(), f"{top}/__init__.py would shadow"
        link = ROOT / "aa_compile" / top
        assert link.is_symlink() and link.resolve() == ROOT / top, package


def test_no_top_level_folder_shadows_an_installed_distribution():
    """A folder at the repository root with an __init__.py is a regular package whenever the
    root is on sys.path (python -c, -m, pytest): it must not share a name with any installed
    distribution's top-level module."""
    provided = importlib.metadata.packages_distributions()
    ours = {"aa-compile", "aa_compile"}
    for folder in ROOT.iterdir():
        if not (folder / "__init__.py").exists():
            continue
        others = set(provided.get(folder.name, ())) - ours
        assert not others, f"{folder.name}/ shadows the installed {sorted(others)}"


def test_backend_entry_point_and_extras_are_declared():
    project = PYPROJECT["project"]
    assert project["entry-points"]["torch_dynamo_backends"] == {
        "aa": "aa_compile.backend:aa_backend"
    }
    assert {"triton", "cutlass", "tensorrt", "onnx", "bench", "dev"} <= set(
        project["optional-dependencies"]
    )
    assert any(d.startswith("torch>=2.6") for d in project["dependencies"])


def test_installed_package_resolves_linked_folders():
    import aa_compile.kernels.rms_norm.reference as ref
    import aa_compile.passes.rms_norm as rms

    assert pathlib.Path(ref.__file__).resolve().parent == ROOT / "kernels" / "rms_norm"
    assert pathlib.Path(rms.__file__).resolve().parent == ROOT / "passes"


@pytest.mark.slow
def test_transformers_and_aa_compile_import_side_by_side_from_the_repo_root():
    """transformers imports Hugging Face's `kernels`; from the root ours must not shadow it."""
    pytest.importorskip("kernels")
    code = (
        "import pathlib, kernels, passes, transformers, aa_compile, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"root = pathlib.Path({str(ROOT)!r})\n"
        "assert pathlib.Path(kernels.__file__).resolve().parent != root / 'kernels', kernels\n"
        "assert passes.__file__ is None, passes  # at most our namespace folder, never a package\n"
        "cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,\n"
        "                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)\n"
        "out = LlamaForCausalLM(cfg)(torch.randint(0, 64, (1, 5))).logits\n"
        "print(tuple(out.shape))\n"
    )
    assert run_python(code, ROOT).strip() == "(1, 5, 64)"


@pytest.mark.slow
def test_wheel_contains_the_linked_packages_and_never_shadows(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("aa_compile-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in source_packages() - set(LINKED.values()):
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg
    assert "aa_compile/kernels/rms_norm/reference.py" in names
    assert "aa_compile/passes/pipeline.py" in names
    assert not any(n.split("/")[0] in LINKED for n in names), "a top-level kernels/passes"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "aa = aa_compile.backend:aa_backend" in text

    # Installed as a wheel (unpacked into a site folder of its own; this venv's packages behind
    # it, without the editable finder): aa_compile comes from the wheel, kernels from HF.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    startup = ("import sys, site\n"
               f"sys.path[:] = [p for p in sys.path if not p.startswith({str(SITE_PACKAGES)!r})]\n"
               f"site.addsitedir({str(site)!r}); sys.path.append({str(SITE_PACKAGES)!r})\n")
    elsewhere = run_python(startup + "import aa_compile.kernels.rms_norm as k, "
                           "aa_compile.passes.pipeline as p\nprint(k.__file__, len(p.PIPELINE))",
                           tmp_path, PYTHONNOUSERSITE="1")
    assert elsewhere.startswith(str(site)), elsewhere
    if importlib.util.find_spec("kernels") is not None:
        from_root = run_python(startup + "import kernels\nprint(kernels.__file__)", ROOT)
        assert pathlib.Path(from_root.strip()).resolve().parent != ROOT / "kernels", from_root
