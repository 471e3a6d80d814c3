"""Architecture: the import-linter contracts in ``.importlinter``, no import cycle anywhere in
``aa_compile`` (function-local imports included), a cheap ``import aa_compile`` (no Triton, no C
build) and no private name used across modules.

Layers, top to bottom (``docs/architecture.md``): the front door (``aa_compile``'s top-level
modules backend/config/report/cli and the task APIs atman and dtm) -> ``aa_compile.passes`` ->
``aa_compile.ops`` -> ``aa_compile.kernels``. ``aa_compile.models`` and ``aa_compile.data`` are
leaves that import none of these; the kernels import nothing of ``aa_compile`` outside
themselves; the shared logger (``aa_compile.logger``) and ``aa_compile.plotting`` import nothing
of ``aa_compile``.

``kernels/`` and ``passes/`` are namespace folders reached through symlinks, so grimp and
import-linter only see them as extra root packages (``ROOT_PACKAGES``).
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "aa_compile"
ROOT_PACKAGES = (PACKAGE, "aa_compile.kernels", "aa_compile.passes")
CONFIG = ROOT / ".importlinter"
TIMEOUT = 300


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """The import graph of aa_compile with its two linked namespace folders (no cache)."""
    return grimp.build_graph(*ROOT_PACKAGES, cache_dir=None)


# --------------------------------------------------------------------------------------------
# (a) import-linter


def test_import_linter_contracts_are_kept():
    """``lint-imports .importlinter`` from the repository root: every contract kept."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()",
         str(CONFIG.relative_to(ROOT)), "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )
    out = proc.stdout + proc.stderr
    broken = [line.strip()[: -len("BROKEN")].strip() for line in out.splitlines()
              if line.strip().endswith("BROKEN")]
    assert proc.returncode == 0, (
        "import-linter: broken contract(s):\n"
        + "".join(f"  - {name}\n" for name in broken)
        + ("" if broken else "  (no contract named; the checker failed)\n")
        + "\n" + out[-8000:]
    )


def _contracts() -> dict[str, configparser.SectionProxy]:
    parser = configparser.ConfigParser()
    assert parser.read(CONFIG), f"{CONFIG} is missing"
    prefix = "importlinter:contract:"
    return {s[len(prefix):]: parser[s] for s in parser.sections() if s.startswith(prefix)}


def _lines(value: str) -> set[str]:
    return {line.strip() for line in value.splitlines() if line.strip()}


def _top_level_modules() -> set[str]:
    """``aa_compile.<name>`` for every module and package directly inside ``aa_compile/``."""
    found = set()
    for entry in (ROOT / PACKAGE).iterdir():
        if entry.name.startswith((".", "__")):
            continue
        if entry.is_dir() or entry.suffix == ".py":
            found.add(f"{PACKAGE}.{entry.stem if entry.suffix == '.py' else entry.name}")
    return found


def test_kernel_and_leaf_contracts_name_every_other_module(graph):
    """The forbidden contracts that say "imports nothing of aa_compile outside itself" list
    every other top-level module, ones added later included; and no kernel or leaf imports the
    root module ``aa_compile`` (which a contract cannot name without naming everything)."""
    contracts = _contracts()
    everything = _top_level_modules()
    for contract_id, sources in (("kernels", {"aa_compile.kernels"}),
                                 ("shared-leaves", {"aa_compile.logger", "aa_compile.plotting",
                                                    "aa_compile.progress", "aa_compile.threads",
                                                    "aa_compile.cli_format"})):
        contract = contracts[contract_id]
        assert _lines(contract["source_modules"]) == sources
        missing = sorted(everything - sources - _lines(contract["forbidden_modules"]))
        assert not missing, f"contract {contract_id!r}: add {missing} to forbidden_modules"
    leaves = ("aa_compile.kernels", "aa_compile.models", "aa_compile.data", "aa_compile.logger",
              "aa_compile.plotting")
    offenders = sorted(m for m in graph.find_modules_that_directly_import(PACKAGE)
                       if m.startswith(tuple(f"{leaf}." for leaf in leaves)) or m in leaves)
    assert not offenders, f"import the root package aa_compile: {offenders}"


# --------------------------------------------------------------------------------------------
# (b) no import cycle


def _strongly_connected(nodes: list[str], edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _cycle_through(first: str, members: set[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest import cycle from ``first`` back to itself inside ``members``."""
    previous: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for child in edges[node]:
                if child == first:
                    path = [node]
                    while path[-1] != first:
                        path.append(previous[path[-1]])
                    return [*reversed(path), first]
                if child in members and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {first}")  # cannot happen inside a component


def _describe(graph: grimp.ImportGraph, cycle: list[str]) -> str:
    parts = [cycle[0]]
    for importer, imported in zip(cycle, cycle[1:]):
        details = graph.get_import_details(importer=importer, imported=imported)
        where = ", ".join(f"l.{d['line_number']}: {d['line_contents']}" for d in details)
        parts.append(f"  -> {imported}    ({importer} {where})")
    return "\n".join(parts)


def test_no_import_cycles(graph):
    """No strongly connected component of more than one module in the import graph. grimp
    reads every import statement, so a function-local import that closes a cycle counts."""
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    components = _strongly_connected(modules, edges)
    report = [
        f"cycle among {component}:\n"
        + _describe(graph, _cycle_through(component[0], set(component), edges))
        for component in components
    ]
    assert not components, "import cycles:\n\n" + "\n\n".join(report)


# --------------------------------------------------------------------------------------------
# (c) a cheap import


_IMPORT_CHECK = textwrap.dedent("""
    import json, sys
    import aa_compile
    heavy = sorted(m for m in sys.modules
                   if m == "triton" or m.startswith("triton.") or m.endswith(".triton_kernel"))
    print(json.dumps(heavy))
""")


def _importer_chain(importtime: str, module: str) -> list[str]:
    """``module`` and the modules that imported it, innermost first, from ``-X importtime``
    (children are printed before their parent, one indentation step deeper)."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or line.rstrip().endswith("package"):
            continue
        name = line.split("|", 2)[2]
        rows.append((len(name) - len(name.lstrip(" ")), name.strip()))
    for i, (depth, name) in enumerate(rows):
        if name == module:
            chain = [name]
            for parent_depth, parent in rows[i + 1:]:
                if parent_depth < depth:
                    chain.append(parent)
                    depth = parent_depth
            return chain
    return []


def test_import_is_cheap_no_triton_no_native_build(tmp_path):
    """``import aa_compile`` in a fresh interpreter loads no Triton module (not even an op's
    ``triton_kernel``, which Triton-compiles at import) and builds no C kernel: ``CC`` is a
    script that leaves a marker if anything calls the compiler, and the kernel cache is empty."""
    marker = tmp_path / "compiler-was-called"
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\necho \"$@\" > '{marker}'\nexit 1\n")
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    env = {**os.environ, "CC": str(cc), "AA_COMPILE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _IMPORT_CHECK], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    why = ""
    if heavy:
        first = "triton" if "triton" in heavy else heavy[0]
        why = "\nimported by: " + " <- ".join(_importer_chain(proc.stderr, first))
    assert not heavy, f"import aa_compile loads Triton: {heavy[:8]}{why}"
    assert not marker.exists(), f"import aa_compile ran the C compiler: {marker.read_text()}"
    built = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert not built, f"import aa_compile built native kernels: {built}"


# --------------------------------------------------------------------------------------------
# (d) no private name across modules


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _source_modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``), through the two symlinks."""
    modules = {}
    for folder, dirs, files in os.walk(ROOT / PACKAGE, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        parts = Path(folder).relative_to(ROOT).parts
        modules.setdefault(".".join(parts), (Path(folder) / "__init__.py", True))  # namespace
        for name in sorted(files):
            if name.endswith(".py"):
                is_init = name == "__init__.py"
                module = ".".join(parts if is_init else (*parts, name[:-3]))
                modules[module] = (Path(folder) / name, is_init)
    return modules


def _private_module_scope(module: str) -> str | None:
    """The package a private module (or one inside a private module) is private to: the parent
    of its innermost private component; None for a public module. The top-level private modules
    of ``aa_compile`` are private to its top-level modules only: its subpackages are layers of
    their own."""
    parts = module.split(".")
    private = [i for i, part in enumerate(parts) if _is_private(part)]
    return None if not private else ".".join(parts[: private[-1]])


def _may_import_private_module(importer: str, importer_is_package: bool, module: str) -> bool:
    scope = _private_module_scope(module)
    if scope is None:
        return True
    if scope == PACKAGE:  # aa_compile's own top-level modules (and the root __init__)
        return importer == PACKAGE or (importer.count(".") == 1 and not importer_is_package)
    return importer == scope or importer.startswith(scope + ".")


def _private_imports(module: str, source: str, is_package: bool,
                     modules: dict[str, tuple[Path, bool]], where: str) -> list[str]:
    """Every private name ``module`` (its ``source``; ``where``: the file, for messages) takes
    from another module of aa_compile, and every private module it may not import."""
    tree = ast.parse(source, where)
    found = []
    bound: dict[str, str] = {}  # local name -> aa_compile module it is bound to

    def ours(name: str) -> bool:
        return name == PACKAGE or name.startswith(PACKAGE + ".")

    def check_module(target: str, line: int) -> None:
        if ours(target) and not _may_import_private_module(module, is_package, target):
            found.append(f"{where}:{line}: {module} imports the private module {target}")

    def check_name(target: str, name: str, line: int, how: str) -> None:
        if not _is_private(name):
            return
        if f"{target}.{name}" in modules:
            check_module(f"{target}.{name}", line)
        elif target != module:
            found.append(f"{where}:{line}: {module} {how} the private name {name} of {target}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if ours(alias.name):
                    check_module(alias.name, node.lineno)
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not ours(target):
                continue
            check_module(target, node.lineno)
            for alias in node.names:
                check_name(target, alias.name, node.lineno, "imports")
                if f"{target}.{alias.name}" in modules:
                    bound[alias.asname or alias.name] = f"{target}.{alias.name}"
    # module._name, also through a chain of submodules (aa_compile.ops.registry._x)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = []
        value: ast.expr = node
        while isinstance(value, ast.Attribute):
            chain.append(value.attr)
            value = value.value
        if not isinstance(value, ast.Name) or value.id not in bound:
            continue
        target = bound[value.id]
        for attr in reversed(chain):
            if _is_private(attr):
                check_name(target, attr, node.lineno, "uses")
                break
            if f"{target}.{attr}" not in modules:
                break
            target = f"{target}.{attr}"
    return found


def test_no_private_name_crosses_modules():
    """No module of aa_compile imports (or reaches through a module attribute) a private name
    (``_x``, dunders excepted) of another module; a private module is imported only from within
    the package it is private to (see `_private_module_scope`)."""
    modules = _source_modules()
    found = sorted({
        hit
        for module, (path, is_package) in modules.items() if path.exists()
        for hit in _private_imports(module, path.read_text(), is_package, modules,
                                    str(path.relative_to(ROOT)))
    })
    assert not found, "private names used across modules:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from aa_compile.dtm.rounds import _check_fraction\n", "private name _check_fraction"),
    ("from .sweep import _Context\n", "private name _Context of aa_compile.dtm.sweep"),
    ("from . import sweep\nsweep._part(c)\n", "uses the private name _part"),
    ("import aa_compile.dtm.sweep\naa_compile.dtm.sweep._Context\n", "uses the private name"),
    ("from aa_compile._logging import log\n", "private module aa_compile._logging"),
    ("from aa_compile.kernels import _native\n", "private module aa_compile.kernels._native"),
    ("from . import sweep as _s\nfrom .sweep import __all__\n", None),
])
def test_private_name_rule_examples(source, expected):
    """The rule of `test_no_private_name_crosses_modules` on a pretend ``aa_compile.dtm.x``."""
    modules = {m: (Path(), False) for m in (
        "aa_compile.dtm.x", "aa_compile.dtm.sweep", "aa_compile.dtm.rounds", "aa_compile.dtm",
        "aa_compile", "aa_compile._logging", "aa_compile.kernels", "aa_compile.kernels._native")}
    found = _private_imports("aa_compile.dtm.x", source, False, modules, "x.py")
    if expected is None:
        assert not found
    else:
        assert len(found) == 1 and expected in found[0], found
    # what stays legal: a package's own private module, kernels' _native inside kernels
    assert _may_import_private_module("aa_compile.kernels.trigram_bag.cpu_avx2", False,
                                      "aa_compile.kernels._native")
    assert _may_import_private_module("aa_compile.backend", False, "aa_compile._logging")
    assert not _may_import_private_module("aa_compile.passes.fp8_linear", False,
                                          "aa_compile._logging")
