"""Every code block of README.md and docs/*.md runs as written (the executed documentation).

A small Markdown collector finds the fenced blocks; each ```sh / ```bash block is one test case
(its logical lines run one by one with bash from the repository root, ``\\`` continuations
joined) and so is each ```python block (the blocks of one file run in order in one Python
process, so later blocks build on earlier ones; selecting a single block with ``-k`` runs the
blocks above it first). ``PATH`` starts with the running interpreter's folder, so ``python``
and ``aa-compile`` are the virtual environment's. ``<!-- doc-test: skip: REASON -->`` on the
line right above a fence skips that block with the reason (``-rs`` lists them); a skip without
a reason, an unlabelled fence or a stray marker fails. Blocks in other languages (```text,
```json, ...) are shown, not run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SHELL = ("sh", "bash", "shell")
PYTHON = ("python", "py", "python3")
#: Pages that may have no runnable block, with the reason.
NO_CODE_PAGES = {
    "docs/performance.md": "a results page: its reproduction commands are quoted inline",
}
#: Wall-clock limit of one shell command or one Python block.
TIMEOUT_S = 300
#: Commands the doc test refuses to run (set-up from scratch, the whole suite or harness, the
#: GPU check, installs; their ``--help`` is fine): their blocks need a skip marker.
NEVER_RUN = re.compile(r"^\s*(make\s+(test|bench|gpu-check|lock)\b|pip\s+install\b"
                       r"|(bash\s+)?\S*gpu_check\.sh\b|python\s+-m\s+bench(?!\S)(?!.*\s-k\s))")

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"<!--\s*doc-test:\s*skip\b(?P<rest>.*?)-->")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language (first word of the info string), its code
    and the skip marker above it (``skip`` the reason; ``marker_error`` if malformed)."""

    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None
    marker_error: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def skip_reason(line: str) -> tuple[str | None, str | None]:
    """(reason, error) of a skip marker on ``line``; (None, None) when there is none."""
    match = MARKER.fullmatch(line.strip())  # a marker alone on its line (not one quoted in prose)
    if match is None:
        return None, None
    rest = match.group("rest").strip()
    if not rest.startswith(":") or not rest[1:].strip():
        return None, f"skip marker without a reason: {line.strip()!r}; write " \
                     "<!-- doc-test: skip: REASON -->"
    return rest[1:].strip(), None


def collect(path: Path, root: Path = ROOT) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown page, and the page's marker/fence problems."""
    page = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            reason, error = skip_reason(lines[i])
            if reason is not None or error is not None:
                next_line = lines[i + 1] if i + 1 < len(lines) else ""
                if FENCE.match(next_line) is None:
                    problems.append(f"{page}:{i + 1}: a doc-test marker must be on the line "
                                    "right above a fence")
            i += 1
            continue
        fence, indent = opening.group("fence"), len(opening.group("indent"))
        lang = (opening.group("info").split() or [""])[0].lower()
        body, j = [], i + 1
        while j < len(lines):
            closing = lines[j].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(re.sub(rf"^[ \t]{{0,{indent}}}", "", lines[j]))  # the fence's indent
            j += 1
        if j == len(lines):
            problems.append(f"{page}:{i + 1}: fence never closed")
        if not lang:
            problems.append(f"{page}:{i + 1}: fence without a language (```text for output, "
                            "```sh or ```python for code that runs)")
        reason, error = skip_reason(lines[i - 1]) if i else (None, None)
        blocks.append(Block(page, i + 1, lang, "\n".join(body) + "\n", reason, error))
        i = j + 1
    return blocks, problems


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in SHELL + PYTHON]


COLLECTED = {p.relative_to(ROOT).as_posix(): collect(p) for p in PAGES}
CASES = [b for blocks, _ in COLLECTED.values() for b in runnable(blocks)]


def environment() -> dict[str, str]:
    """The environment of every command: the running venv's ``bin`` first on ``PATH``."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MPLBACKEND"] = "Agg"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def shell_commands(code: str) -> list[str]:
    """The logical command lines of a shell block: continuations joined, blanks and comments
    dropped."""
    commands, pending = [], ""
    for raw in code.splitlines():
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    if pending.strip():
        commands.append(pending.strip())
    return commands


def run_shell(block: Block) -> str | None:
    """Run a shell block's commands one by one; the first failure's text, or None."""
    for command in shell_commands(block.code):
        if NEVER_RUN.search(command) and "--help" not in command.split():
            return (f"`{command}` is not run by the doc test (set-up, whole suite or harness, "
                    "GPU check, install): put <!-- doc-test: skip: REASON --> on the line above "
                    "the block's fence")
        start = time.perf_counter()
        try:
            proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=ROOT,
                                  env=environment(), capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{command}` ran past {TIMEOUT_S} s"
        if proc.returncode != 0:
            return (f"`{command}` exited {proc.returncode} after "
                    f"{time.perf_counter() - start:.1f} s\n--- stdout ---\n"
                    f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return None


REPLY = "\x00doc-test-reply "
WORKER = r"""
import json, sys, traceback
namespace = {"__name__": "__main__"}
for message in sys.stdin:
    request = json.loads(message)
    try:
        exec(compile(request["code"], request["name"], "exec"), namespace)
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()}
    sys.stdout.flush()
    sys.stderr.flush()
    print("\x00doc-test-reply " + json.dumps(reply), flush=True)
"""


class PythonSession:
    """One Python process per page: runs its ```python blocks in order in one namespace."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=environment(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.results: dict[int, str | None] = {}  # block line -> error (None: ran fine)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def run(self, block: Block) -> str | None:
        """Run ``block``; its error text (with its output), or None."""
        if block.line in self.results:
            return self.results[block.line]
        if self.proc.poll() is not None:
            return f"the page's Python process had ended (exit {self.proc.returncode})"
        self.proc.stdin.write(json.dumps({"code": block.code, "name": block.id}) + "\n")
        self.proc.stdin.flush()
        output, deadline = [], time.monotonic() + TIMEOUT_S
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                error = f"ran past {TIMEOUT_S} s"
                break
            if line is None:
                error = "the Python process died"
                break
            if line.startswith(REPLY):
                reply = json.loads(line[len(REPLY):])
                error = None if reply["ok"] else reply["error"]
                break
            output.append(line)
        if error is not None:
            error = f"{error}\n--- output ---\n{''.join(output)[-4000:]}"
        self.results[block.line] = error
        return error

    def end_input(self) -> None:
        """Let the process finish: it exits after its last block."""
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.proc.stdin.close()

    def close(self) -> None:
        self.end_input()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def python_sessions():
    sessions: dict[str, PythonSession] = {}
    yield sessions
    for session in sessions.values():  # all exit at once, not one after another
        session.end_input()
    for session in sessions.values():
        session.close()


def run_block(block: Block, sessions: dict[str, PythonSession]) -> str | None:
    """Run one block once per test session; its error text, or None."""
    if block.id in SHELL_RESULTS:
        return SHELL_RESULTS[block.id]
    if block.lang in SHELL:
        SHELL_RESULTS[block.id] = run_shell(block)
        return SHELL_RESULTS[block.id]
    session = sessions.get(block.page)
    if session is None:
        session = sessions[block.page] = PythonSession()
    return session.run(block)


SHELL_RESULTS: dict[str, str | None] = {}


@pytest.mark.parametrize("block", CASES, ids=[b.id for b in CASES])
def test_block_runs(block: Block, python_sessions) -> None:
    if block.marker_error is not None:
        pytest.fail(f"{block.id}: {block.marker_error}", pytrace=False)
    if block.skip is not None:
        pytest.skip(f"{block.id}: {block.skip}")
    page_blocks, _ = COLLECTED[block.page]
    for earlier in runnable(page_blocks):  # what this block builds on, when run alone (-k)
        if earlier.line >= block.line:
            break
        if earlier.skip is None and earlier.marker_error is None:
            if run_block(earlier, python_sessions) is not None:
                pytest.fail(f"{block.id}: an earlier block of the page failed "
                            f"({earlier.id}); fix that one first", pytrace=False)
    error = run_block(block, python_sessions)
    if error is not None:
        pytest.fail(f"{block.id}:\n{error}", pytrace=False)


def test_every_page_has_code_blocks(capsys) -> None:
    counts = {page: runnable(blocks) for page, (blocks, _) in COLLECTED.items()}
    summary = ", ".join(f"{page} {len(b)} ({sum(x.skip is not None for x in b)} skipped)"
                        for page, b in counts.items())
    total = sum(len(b) for b in counts.values())
    with capsys.disabled():  # shown in the test run's output, -q included
        print(f"\ndoc blocks: {total} runnable in {len(counts)} pages: {summary}")
    empty = [p for p, b in counts.items() if not b and p not in NO_CODE_PAGES]
    assert not empty, f"pages without a runnable (```sh / ```python) block: {empty}"
    assert len(PAGES) >= 2 and ROOT / "README.md" in PAGES


def test_fences_and_markers_are_well_formed() -> None:
    problems = [p for _, page_problems in COLLECTED.values() for p in page_problems]
    assert not problems, "\n".join(problems)


# -- the collector itself ------------------------------------------------------------------


def collect_text(tmp_path: Path, text: str) -> tuple[list[Block], list[str]]:
    page = tmp_path / "docs" / "__doc_test_probe__.md"
    page.parent.mkdir()
    page.write_text(text, encoding="utf-8")
    return collect(page, root=tmp_path)


def test_collector_finds_blocks_languages_lines_and_markers(tmp_path) -> None:
    text = ("# t\n"
            "```sh\necho a \\\n  b\n# comment\n\necho c\n```\n"
            "<!-- doc-test: skip: needs a GPU -->\n"
            "```python\nx = 1\n```\n"
            "<!-- doc-test: skip -->\n"
            "~~~bash\nfalse\n~~~\n"
            "```text\nnot run\n```\n"
            "```\nunlabelled\n```\n"
            "<!-- doc-test: skip: dangling -->\n\n")
    blocks, problems = collect_text(tmp_path, text)
    assert [(b.line, b.lang) for b in blocks] == [(2, "sh"), (10, "python"), (14, "bash"),
                                                   (17, "text"), (20, "")]
    assert shell_commands(blocks[0].code) == ["echo a    b", "echo c"]
    assert blocks[1].skip == "needs a GPU" and blocks[1].code == "x = 1\n"
    assert blocks[2].skip is None and "without a reason" in blocks[2].marker_error
    assert [b.id for b in runnable(blocks)] == [f"docs/__doc_test_probe__.md:{n}"
                                                for n in (2, 10, 14)]
    assert len(problems) == 2
    assert "fence without a language" in problems[0] and ":20:" in problems[0]
    assert "right above a fence" in problems[1] and ":23:" in problems[1]


def test_collector_reports_an_unclosed_fence(tmp_path) -> None:
    blocks, problems = collect_text(tmp_path, "```python\nx = 1\n")
    assert [b.lang for b in blocks] == ["python"]
    assert problems == ["docs/__doc_test_probe__.md:1: fence never closed"]


@pytest.mark.parametrize("command", ["make bench", "make test PYTEST_ARGS=-x",
                                     "bash bench/gpu_check.sh OUT", "pip install -e .",
                                     "python -m bench --quick", "python -m bench"])
def test_commands_that_must_not_run_are_refused(command) -> None:
    error = run_shell(Block("p.md", 1, "sh", f"true\n{command}\n"))
    assert error is not None and "skip" in error and command in error


def test_shell_blocks_stop_at_the_first_failing_line(tmp_path) -> None:
    marker = tmp_path / "ran"
    error = run_shell(Block("p.md", 1, "sh", f"echo ok\nfalse\ntouch {marker}\n"))
    assert error is not None and "`false` exited 1" in error
    assert not marker.exists()
    # from the repository root, continuation joined, the running interpreter first on PATH
    venv_python = Path(sys.executable).parent / "python"
    code = f"test -d aa_compile \\\n  && test $(command -v python) = {venv_python}\n"
    assert run_shell(Block("p.md", 1, "sh", code)) is None


def test_python_session_keeps_the_namespace_and_reports_errors() -> None:
    session = PythonSession()
    try:
        assert session.run(Block("p.md", 1, "python", "x = 41\nprint('hi')\n")) is None
        assert session.run(Block("p.md", 5, "python", "assert x == 41\n")) is None
        error = session.run(Block("p.md", 9, "python", "print('before')\n1 / 0\n"))
        assert "ZeroDivisionError" in error and "before" in error
    finally:
        session.close()


# -- claims in the prose that a block alone would not check --------------------------------


def python_blocks(path: Path) -> list[str]:
    return [b.code for b in collect(path)[0] if b.lang in PYTHON]


def test_tfree_layers_named_in_readme_import_from_the_package() -> None:
    from aa_compile.models import tfree

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in ("TrigramTokenizer", "TFreeEmbedding", "TFreeHead", "TFreeDictionary", "TFreeLM"):
        assert f"`{name}`" in readme
        assert name in tfree.__all__ and hasattr(tfree, name), name


def test_fp8_doc_saturation_snippet_prints_what_it_says() -> None:
    import contextlib
    import io

    (snippet,) = [b for b in python_blocks(ROOT / "docs" / "fp8.md")
                  if "saturation_stats" in b and "1000.0" in b]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(snippet, "docs/fp8.md", "exec"), {})
    # the snippet's print line ends in a comment showing its output
    print_line = next(line for line in snippet.splitlines() if line.startswith("print("))
    assert printed.getvalue().strip() == print_line.split("#", 1)[1].strip()


def test_readme_states_how_a_bad_option_fails() -> None:
    import torch

    import aa_compile

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    options = " ".join(readme.split("## Options", 1)[1].split("|", 1)[0].split())
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


def test_readme_options_table_lists_every_config_field() -> None:
    import dataclasses

    from aa_compile.config import Config

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Options", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line.split("|")[2].strip()
            for line in table.splitlines() if line.startswith("| `")}
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert set(rows) == set(fields)
    for name, field in fields.items():
        default = (field.default_factory() if field.default is dataclasses.MISSING
                   else field.default)
        shown = rows[name].strip("`")
        if name == "passes":
            assert default is None and shown == "all default passes"
        else:
            assert shown == repr(default).replace("'", '"'), (name, shown, default)


def test_fp8_parity_help_describes_in_full_sentences() -> None:
    proc = subprocess.run([sys.executable, "bench/umup_fp8_parity.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=environment())
    assert proc.returncode == 0, proc.stderr
    # argparse prints: usage, a blank line, the description, a blank line, the options
    description = proc.stdout.split("\n\n")[1]
    assert not description.startswith(("options:", "optional arguments:")), proc.stdout
    last_sentence = re.split(r"(?<=[.!?])\s+", " ".join(description.split()))[-1]
    assert last_sentence.endswith("."), description


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to
    hyphens, repeats numbered."""
    anchors: set[str] = set()
    blocks, _ = collect(path, root=path.parent)
    fenced = {line for b in blocks for line in range(b.line, b.line + b.code.count("\n") + 2)}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None or number in fenced:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors_follow_github(tmp_path) -> None:
    path = tmp_path / "x.md"
    path.write_text("# A `aa::op` (CPU, 2026)\n## Limits\n## Limits\n```text\n# not a heading\n"
                    "```\n### u-μP and FP8_x\n", encoding="utf-8")
    assert heading_anchors(path) == {"a-aaop-cpu-2026", "limits", "limits-1", "u-μp-and-fp8_x"}


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(ROOT)}")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in "
                          f"{path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)
