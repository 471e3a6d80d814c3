"""``python -m bench``: run the benchmark workloads with pytest-benchmark, then report.

    python -m bench --quick                 # small shapes (make bench)
    python -m bench                         # full shapes (make bench-full)
    python -m bench --device cuda --out DIR -k rms_norm --rounds 20
    python -m bench --quick --cold-cache    # compile_s of a cold compile, not cache hits
    python -m bench --quick -- -x           # anything after -- goes to pytest
    python -m aa_compile.bench --quick      # the same from any directory (editable install)

Runs ``pytest bench/ -p no:cacheprovider -v`` with ``--benchmark-json`` (a temporary file),
``--benchmark-save-data`` and ``--benchmark-disable-gc``, then `bench.report` writes
``<UTC stamp>-<commit>.{json,md,png}`` and ``latest.*`` under ``--out`` and prints the table.
Exits with pytest's status when pytest fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time

BENCH_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark the aa backend against eager and inductor (pytest-benchmark), then "
            "write a report (JSON, Markdown table, PNG chart) and print the table."
        ),
        epilog="Arguments after '--' are passed to pytest unchanged. This runs from the "
               "repository root; from any other directory use 'python -m aa_compile.bench' "
               "(same arguments).",
    )
    parser.add_argument("--quick", action="store_true",
                        help="small shapes only (the whole set takes tens of minutes on a "
                             "2-core CPU, compiles included: pick workloads with -k)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to benchmark on (default: cuda if available, else cpu)")
    parser.add_argument("-k", dest="keyword", metavar="EXPR", default=None,
                        help="only run benchmarks matching this pytest -k expression, "
                             "e.g. 'rms_norm and not aten'")
    parser.add_argument("--out", default=str(BENCH_DIR / "results"), metavar="DIR",
                        help="where the report files go (default: bench/results)")
    parser.add_argument("--rounds", type=int, default=None, metavar="N",
                        help="timed rounds per benchmark and repeat (default: per workload)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N",
                        help="run each benchmark N times with the variants interleaved; the "
                             "report merges the repeats (default: 5)")
    parser.add_argument("--cold-cache", action="store_true",
                        help="compile into empty inductor/triton caches (a temporary folder), so "
                             "'compile s' measures a cold compile rather than cache hits")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.pytest_args and args.pytest_args[0] == "--":
        args.pytest_args = args.pytest_args[1:]
    return args


def pytest_command(args: argparse.Namespace, json_path: pathlib.Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH_DIR), "-p", "no:cacheprovider", "-v",
        f"--benchmark-json={json_path}", "--benchmark-save-data", "--benchmark-disable-gc",
    ]
    if args.quick:
        cmd.append("--quick")
    if args.device:
        cmd += ["--device", args.device]
    if args.keyword:
        cmd += ["-k", args.keyword]
    if args.rounds is not None:
        cmd += ["--rounds", str(args.rounds)]
    cmd += ["--repeats", str(args.repeats)]
    return cmd + list(args.pytest_args)


def run_pytest(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run pytest and wait for it, even through Ctrl-C / ``timeout -s INT``.

    SIGINT reaches pytest too (same process group); pytest then stops, and pytest-benchmark
    still writes the JSON of the benchmarks that finished, which gets reported. So this process
    ignores SIGINT while pytest runs instead of killing it.
    """
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    user_command = ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory(prefix="aa-bench-") as tmp:
        json_path = pathlib.Path(tmp) / "pytest-benchmark.json"
        cmd = pytest_command(args, json_path)
        print("+ " + shlex.join(cmd), flush=True)
        start = time.perf_counter()
        env = None
        if args.cold_cache:
            env = dict(os.environ)
            env["TORCHINDUCTOR_CACHE_DIR"] = str(pathlib.Path(tmp) / "inductor-cache")
            env["TRITON_CACHE_DIR"] = str(pathlib.Path(tmp) / "triton-cache")
        rc = run_pytest(cmd, env)
        elapsed = time.perf_counter() - start
        print(f"pytest exited with {rc} after {elapsed:.0f} s", flush=True)
        if not json_path.is_file():
            print("no benchmark results were written; nothing to report", file=sys.stderr)
            return rc or 1

        from bench.report import render_table, report_file

        rows, paths = report_file(json_path, args.out, command=user_command)
    print()
    print(render_table(rows))
    print()
    for key in ("json", "md", "png"):
        print(f"wrote {paths[key]}  (and {paths['latest_' + key].name})")
    if rc != 0:
        print(f"pytest failed (exit status {rc}); the report covers the benchmarks that ran",
              file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
