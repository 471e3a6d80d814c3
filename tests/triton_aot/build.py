"""Compile one recorded launch for its GPU down to a cubin, and read what ptxas reports.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc,
32))`` runs the whole pipeline, ptxas included (it ships in the Triton wheel); with
``knobs.nvidia.dump_ptxas_log`` Triton prints ptxas's ``-v`` log, which gives registers,
spill stores/loads and stack per thread; the kernel's metadata gives its shared memory.
Results are cached on disk by Triton version, the kernel's source hash (its called
``@triton.jit`` helpers included), the specialization and the architecture.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

#: bump when the stored result format changes
RESULT_VERSION = 1


def default_cache_dir() -> Path:
    """``$AA_TRITON_AOT_CACHE``, else ``$XDG_CACHE_HOME/aa-compile/triton-aot`` (``~/.cache``)."""
    if os.environ.get("AA_TRITON_AOT_CACHE"):
        return Path(os.environ["AA_TRITON_AOT_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "aa-compile" / "triton-aot"


def jit_function(kernel: str) -> triton.JITFunction:
    """The ``@triton.jit`` function named ``module:function``."""
    module, _, name = kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, triton.JITFunction) and hasattr(fn, "fn"):  # autotune, heuristics
        fn = fn.fn
    return fn


def _constant(value: Any) -> Any:
    """A constexpr as Triton's specialization JSON stores it, decoded (as ``preload`` does)."""
    if isinstance(value, str) and tl.dtype.is_dtype(value):
        return tl.dtype(value)
    if isinstance(value, dict) and "constexpr" in value:
        return tl.constexpr(value["constexpr"])
    if isinstance(value, dict) and "jit_function" in value:
        return jit_function(value["jit_function"])
    return value


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def source(kernel: str, spec: str) -> tuple[ASTSource, dict[str, Any]]:
    """Triton's compile input and options for a recorded launch."""
    data = json.loads(spec)
    constants = {tuple(k): _constant(v) for k, v in zip(data["constant_keys"],
                                                         data["constant_vals"])}
    attrs = {tuple(k): _tuples(v) for k, v in zip(data["attrs_keys"], data["attrs_vals"])}
    signature = {k: _tuples(v) for k, v in data["signature"].items()}
    options = {k: _tuples(v) for k, v in data["options"].items()}
    options.pop("extern_libs", None)  # a path on the recording machine; the default is the same
    return ASTSource(jit_function(kernel), signature, constants, attrs), options


def cache_key(kernel: str, spec: str, cc: int) -> str:
    data = json.loads(spec)
    data["options"].pop("extern_libs", None)
    text = json.dumps([RESULT_VERSION, triton.__version__, kernel,
                       jit_function(kernel).cache_key, data, cc], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _largest(pattern: str, log: str) -> int:
    return max([int(v) for v in re.findall(pattern, log)] or [0])


def ptxas_numbers(log: str) -> dict[str, int]:
    """Registers, spill stores / loads and stack frame (bytes per thread) from ptxas ``-v``."""
    if "Used" not in log:
        raise RuntimeError("no ptxas -v log was printed: knobs.nvidia.dump_ptxas_log has no "
                           f"effect in Triton {triton.__version__}")
    return {"regs": _largest(r"Used (\d+) registers", log),
            "spill_stores": _largest(r"(\d+) bytes spill stores", log),
            "spill_loads": _largest(r"(\d+) bytes spill loads", log),
            "stack": _largest(r"(\d+) bytes stack frame", log)}


def _root_message(error: BaseException) -> str:
    """The first line of the error and, for a nested one (a jitted helper's), the innermost."""
    first = (str(error).strip().splitlines() or [""])[0]
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    inner = getattr(root, "error_message", None) or (str(root).strip().splitlines() or [""])[-1]
    text = f"{type(error).__name__}: {first}"
    return text if inner in text else f"{text} ({inner})"


def compile_launch(kernel: str, spec: str, cc: int) -> dict[str, Any]:
    """``{"ok": True, "regs", "spill_stores", "spill_loads", "stack", "shared"}`` or
    ``{"ok": False, "error"}`` for compiling ``kernel`` with ``spec`` for ``sm_<cc>``."""
    if not hasattr(knobs, "nvidia") or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        raise RuntimeError(f"Triton {triton.__version__} has no knobs.nvidia.dump_ptxas_log")
    src, options = source(kernel, spec)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a Triton cache hit would print no log
        try:
            with contextlib.redirect_stdout(log):
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        except (MemoryError, OSError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001  (any compile error is the finding)
            return {"ok": False, "error": _root_message(e)}
    return {"ok": True, "shared": int(compiled.metadata.shared), **ptxas_numbers(log.getvalue())}


def compile_cached(kernel: str, spec: str, cc: int, cache_dir: str | None = None
                   ) -> dict[str, Any]:
    """`compile_launch`, through the on-disk result cache (``cached: True`` on a hit)."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    path = folder / f"{cache_key(kernel, spec, cc)}.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            return {**json.loads(path.read_text()), "cached": True}
    if not os.environ.get("TRITON_CACHE_DIR"):  # Triton's own cache: scratch, never read
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aa-triton-aot-")
    result = compile_launch(kernel, spec, cc)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return {**result, "cached": False}


def compile_job(job: tuple[str, str, int, str | None]) -> dict[str, Any]:
    """`compile_cached` of ``(kernel, spec, cc, cache_dir)``: a process pool's work item."""
    return compile_cached(*job)
