"""``python -m tests.triton_aot``: compile every Triton kernel of aa_compile for real GPUs.

Records the launches of every case (`cases`) for each architecture, compiles each distinct
one (in parallel, through the result cache), checks it against the architecture's limits and
the kernel's spill budget, checks that every ``@triton.jit`` function of ``aa_compile.kernels``
is launched (or called by a launched kernel), and writes ``report.json`` and ``report.md``
(the table: registers, spills, shared memory per launch) to ``--out``. Exit status 1 when
anything failed. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import importlib
import importlib.util
import json
import multiprocessing
import os
import pkgutil
import sys
import time
from pathlib import Path
from typing import Any

#: registers one SM holds (every architecture compiled for), per block at most
REGISTER_FILE = 65536
#: name of the per-module dict of allowed spill stores (bytes per thread) by kernel name
BUDGET_NAME = "AOT_SPILL_BUDGET"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from tests.triton_aot import build, cases

    parser = argparse.ArgumentParser(
        prog="python -m tests.triton_aot", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cc", type=int, nargs="+", default=list(cases.ARCHS),
                        help="compute capabilities to compile for (90 = sm_90)")
    parser.add_argument("-k", dest="only", default="",
                        help="only the cases whose name contains this text (skips the coverage "
                             "check)")
    parser.add_argument("--out", default="build/triton_aot",
                        help="folder for report.json and report.md")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiler processes")
    parser.add_argument("--cache", default=str(build.default_cache_dir()),
                        help="result cache folder ($AA_TRITON_AOT_CACHE)")
    parser.add_argument("--quiet", action="store_true", help="print only the summary line")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    return args


def forget_autotuning() -> None:
    """Clear the choice of every ``triton.autotune`` kernel of aa_compile.kernels: its cache
    key holds no architecture, and each recording must see every config kept for its own."""
    from triton.runtime.autotuner import Autotuner

    for name, module in list(sys.modules.items()):
        if name.startswith("aa_compile.kernels."):
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    value.cache.clear()


def record_all(names: list[str], archs: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{case: {cc: {"refused" | "error" | "launches"}}}`` for the named cases."""
    import aa_compile.ops  # noqa: F401  (registers the ops and their CUDA kernels)
    from tests.triton_aot import cases, launches

    by_name = {c.name: c for c in cases.cases()}
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name in names:
        case = by_name[name]
        out[name] = {}
        for cc in archs:
            forget_autotuning()
            try:
                rec = launches.record(name, cc, lambda: launches.cuda_kernel(case.op)(
                    *case.make()))
            except Exception as e:  # noqa: BLE001  (reported as the case's error)
                out[name][cc] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
                continue
            if rec.refused is not None:
                out[name][cc] = {"refused": rec.refused.splitlines()[0]}
            else:
                out[name][cc] = {"launches": [launch.to_json() for launch in rec.launches]}
    return out


def compile_all(jobs: list[tuple[str, str, int, str]], n_proc: int, quiet: bool
                ) -> list[dict[str, Any]]:
    """Results of `build.compile_cached` per job, computed by ``n_proc`` processes (spawned,
    so that no parent state such as OpenMP threads is forked)."""
    from aa_compile.progress import progress
    from tests.triton_aot import build

    if n_proc == 1 or len(jobs) <= 1:
        return [build.compile_job(job) for job in progress(jobs, desc="compile", unit="launch",
                                                            disable=quiet)]
    bar = progress(total=len(jobs), desc="compile", unit="launch", disable=quiet)
    ctx = multiprocessing.get_context("spawn")
    results: list[dict[str, Any]] = [{}] * len(jobs)
    with concurrent.futures.ProcessPoolExecutor(n_proc, mp_context=ctx) as pool, bar:
        futures = {pool.submit(build.compile_job, job): i for i, job in enumerate(jobs)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    return results


def kernel_modules() -> list[str]:
    """Every module of ``aa_compile.kernels`` whose source uses ``triton.jit``."""
    import aa_compile.kernels

    names = []
    for info in pkgutil.walk_packages(aa_compile.kernels.__path__, "aa_compile.kernels."):
        spec = importlib.util.find_spec(info.name)
        if spec and spec.origin and spec.origin.endswith(".py"):
            if "triton.jit" in Path(spec.origin).read_text():
                names.append(info.name)
    return sorted(names)


def jit_functions() -> dict[str, Any]:
    """``module:function`` -> the ``@triton.jit`` function, for those defined in the kernels."""
    import triton

    found = {}
    for module_name in kernel_modules():
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            fn = value
            while not isinstance(fn, triton.JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if isinstance(fn, triton.JITFunction) and fn.fn.__module__ == module_name:
                found[f"{module_name}:{name}"] = fn
    return found


def called_jit_functions(fn: Any) -> set[str]:
    """``module:function`` of every ``@triton.jit`` function ``fn`` calls, transitively."""
    import triton

    seen: set[str] = set()
    todo = [fn]
    while todo:
        current = todo.pop()
        for node in ast.walk(ast.parse(current.src)):
            if isinstance(node, ast.Name):
                target = current.fn.__globals__.get(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                target = getattr(current.fn.__globals__.get(node.value.id), node.attr, None)
            else:
                continue
            if isinstance(target, triton.JITFunction) and target is not current:
                name = f"{target.fn.__module__}:{target.fn.__qualname__}"
                if name not in seen:
                    seen.add(name)
                    todo.append(target)
    return seen


def spill_budget(kernel: str) -> int:
    """Allowed spill stores (bytes per thread) of ``kernel``: its module's `BUDGET_NAME`
    entry, 0 if none."""
    module, _, name = kernel.partition(":")
    return int(getattr(importlib.import_module(module), BUDGET_NAME, {}).get(name, 0))


def problems(row: dict[str, Any]) -> list[str]:
    """What makes a compiled launch unusable or over budget on its architecture."""
    if not row["ok"]:
        return [f"compile error: {row['error']}"]
    out = []
    if row["shared"] > row["smem_limit"]:
        out.append(f"shared memory {row['shared']} B > sm_{row['cc']} limit "
                   f"{row['smem_limit']} B (the launch raises OutOfResources)")
    if row["spill_stores"] > row["spill_budget"]:
        out.append(f"spills {row['spill_stores']} B/thread > budget {row['spill_budget']} B "
                   f"({BUDGET_NAME} in {row['kernel'].partition(':')[0]})")
    threads = 32 * (row["num_warps"] or 4)
    if row["regs"] * threads > REGISTER_FILE:
        out.append(f"{row['regs']} registers x {threads} threads > {REGISTER_FILE}")
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from aa_compile.kernels import triton_target
    from tests.triton_aot import cases, launches

    start = time.perf_counter()
    names = [c.name for c in cases.cases() if args.only in c.name]
    recorded = record_all(names, args.cc)
    t_record = time.perf_counter() - start
    jobs: dict[tuple[str, str, int], int] = {}
    for per_cc in recorded.values():
        for cc, rec in per_cc.items():
            for launch in rec.get("launches", []):
                jobs.setdefault((launch["kernel"], launch["spec"], cc), len(jobs))
    job_list = [(kernel, spec, cc, args.cache) for (kernel, spec, cc) in jobs]
    if not args.quiet:
        n = sum(len(r.get("launches", [])) for p in recorded.values() for r in p.values())
        print(f"recorded {n} launches in {t_record:.0f} s; compiling {len(job_list)} distinct ones",
              file=sys.stderr, flush=True)
    results = compile_all(job_list, args.jobs, args.quiet)
    for per_cc in recorded.values():
        for cc, rec in per_cc.items():
            rows = []
            for launch in rec.get("launches", []):
                result = results[jobs[(launch["kernel"], launch["spec"], cc)]]
                row = {"kernel": launch["kernel"], "cc": cc, **launches.spec_summary(
                    launch["spec"]), **result,
                    "smem_limit": triton_target.shared_memory_limit((cc // 10, cc % 10)),
                    "spill_budget": spill_budget(launch["kernel"])}
                row["problems"] = problems(row)
                rows.append(row)
            rec["launches"] = rows
    report: dict[str, Any] = {"triton": __import__("triton").__version__, "archs": args.cc,
                              "cases": recorded}
    if not args.only:
        kernels = jit_functions()
        launched = {row["kernel"] for p in recorded.values() for r in p.values()
                    for row in r.get("launches", [])}
        reached = set(launched)
        for name in launched:
            reached |= called_jit_functions(kernels[name]) if name in kernels else set()
        report["kernels"] = sorted(kernels)
        report["never_launched"] = sorted(set(kernels) - reached)
    report["seconds"] = {"record": round(t_record, 1),
                         "total": round(time.perf_counter() - start, 1),
                         "compiled": sum(not r.get("cached", True) for r in results),
                         "cached": sum(bool(r.get("cached")) for r in results)}
    return report


def table(report: dict[str, Any]) -> str:
    """The Markdown table of a report: one line per launch (or refusal / error)."""
    archs = ", ".join(f"sm_{cc}" for cc in report["archs"])
    lines = [f"Triton {report['triton']} ahead-of-time compile for {archs}",
             "", "| case | sm | kernel | warps | stages | regs | spill st/ld B | smem KB (limit) "
             "| problems |", "|---|---|---|---|---|---|---|---|---|"]
    for case, per_cc in report["cases"].items():
        for cc, rec in per_cc.items():
            if "refused" in rec or "error" in rec:
                what = "refused" if "refused" in rec else "ERROR"
                why = rec.get("refused") or rec.get("error")
                lines.append(f"| {case} | {cc} | — | | | | | | {what}: {why} |")
                continue
            for row in rec["launches"]:
                kernel = row["kernel"].partition(":")[2]
                if not row["ok"]:
                    lines.append(f"| {case} | {cc} | {kernel} | {row['num_warps']} | "
                                 f"{row['num_stages']} | | | | {'; '.join(row['problems'])} |")
                    continue
                lines.append(
                    f"| {case} | {cc} | {kernel} | {row['num_warps']} | {row['num_stages']} | "
                    f"{row['regs']} | {row['spill_stores']}/{row['spill_loads']} | "
                    f"{row['shared'] / 1024:.1f} ({row['smem_limit'] / 1024:.0f}) | "
                    f"{'; '.join(row['problems'])} |")
    if report.get("never_launched"):
        lines += ["", "Never launched by any case: " + ", ".join(report["never_launched"])]
    return "\n".join(lines) + "\n"


def failures(report: dict[str, Any]) -> list[str]:
    out = []
    for case, per_cc in report["cases"].items():
        for cc, rec in per_cc.items():
            if "error" in rec:
                out.append(f"{case} sm_{cc}: {rec['error']}")
            for row in rec.get("launches", []):
                out += [f"{case} sm_{cc} {row['kernel']}: {p}" for p in row["problems"]]
    out += [f"never launched: {k}" for k in report.get("never_launched", [])]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.md").write_text(table(report))
    bad = failures(report)
    if not args.quiet:
        print(table(report))
        for line in bad:
            print("FAIL", line)
    s = report["seconds"]
    print(f"{len(bad)} problems; {s['compiled']} compiled, {s['cached']} from the cache; "
          f"{s['total']:.0f} s; wrote {out / 'report.json'} and {out / 'report.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
