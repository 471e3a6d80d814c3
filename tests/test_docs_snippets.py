"""What README.md and docs/ tell a newcomer works as written: imports, snippets, errors, --help."""

import ast
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aa_compile

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(path: Path) -> list[str]:
    """The ```python code blocks of a Markdown file."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"),
                      flags=re.DOTALL | re.MULTILINE)


def test_readme_import_lines_work():
    imports = [node for block in python_blocks(README) for node in ast.parse(block).body
               if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert any(isinstance(node, ast.ImportFrom) for node in imports)
    for node in imports:
        code = compile(ast.Module(body=[node], type_ignores=[]), str(README), "exec")
        exec(code, {})  # an ImportError names the README line that is wrong


def test_tfree_layers_named_in_readme_import_from_the_package():
    from aa_compile.models import tfree
    from aa_compile.models.tfree import TFreeLM, TFreeLMConfig  # noqa: F401

    readme = README.read_text(encoding="utf-8")
    for name in ("TrigramTokenizer", "TFreeEmbedding", "TFreeHead", "TFreeDictionary", "TFreeLM"):
        assert f"`{name}`" in readme
        assert name in tfree.__all__ and hasattr(tfree, name), name


def test_fp8_doc_saturation_snippet_runs_and_prints_what_it_says():
    (snippet,) = [b for b in python_blocks(ROOT / "docs" / "fp8.md") if "saturation_stats" in b]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "docs/fp8.md", "exec"), {})
    # the snippet's print line ends in a comment showing its output
    print_line = next(line for line in snippet.splitlines() if line.startswith("print("))
    assert printed.getvalue().strip() == print_line.split("#", 1)[1].strip()


def test_readme_states_how_a_bad_option_fails():
    options = README.read_text(encoding="utf-8").split("## Options", 1)[1].split("|", 1)[0]
    options = " ".join(options.split())
    assert "`aa_compile.compile(model, options={...})` raises it at once" in options
    assert "`torch._dynamo.exc.BackendCompilerFailed`" in options
    assert "`inner_exception` is the `ValueError`" in options

    model, x = torch.nn.Linear(16, 8), torch.randn(2, 16)
    with pytest.raises(ValueError, match="valid options"):
        aa_compile.compile(model, options={"inner_compilr": "eager"})
    compiled = torch.compile(model, backend="aa", options={"inner_compilr": "eager"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(x)
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value.inner_exception, ValueError)
    assert "valid options" in str(info.value.inner_exception)


def test_fp8_parity_help_describes_in_full_sentences():
    proc = subprocess.run([sys.executable, "bench/umup_fp8_parity.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # argparse prints: usage, a blank line, the description, a blank line, the options
    description = proc.stdout.split("\n\n")[1]
    assert not description.startswith(("options:", "optional arguments:")), proc.stdout
    last_sentence = re.split(r"(?<=[.!?])\s+", " ".join(description.split()))[-1]
    assert last_sentence.endswith("."), description
