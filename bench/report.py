"""Reporter: pytest-benchmark JSON -> table of speed-ups, written as JSON, Markdown and PNG.

    python -m bench.report BENCH.json [--out bench/results]

Input is pytest-benchmark's ``--benchmark-json`` file (it holds each benchmark's raw per-round
timings under ``stats.data``; ``--benchmark-save-data`` does the same for ``--benchmark-save``).
Each benchmark is one *row*: a (workload, shape, dtype, device) *case* run by one *variant*.
The harness puts workload, variant, shape, dtype, device, ``compile_s``, ``peak_mib`` and
``aa_rewrites`` in ``extra_info``; kernel workloads add ``bytes`` / ``flops`` /
``flop_precision`` (one call's work) and CUDA rows ``device_name``, for the roofline column.

Per row: median, p20 and p80 of the raw timings (numpy's linear percentiles), the speed-up
against the ``eager`` and the ``inductor`` row of the same case (baseline median / row median,
so > 1 means faster than the baseline; None when the case has no such row), peak MiB and
compile seconds. A row whose ``extra_info["cost_vs"]`` names other variants of its case gets
``cost``: its median over the sum of theirs (the steering workload's bars: a steered model
against the unsteered one, plus the SAE alone).

Output (`write_report`): ``<UTC timestamp>-<short commit>.{json,md,png}`` under the output
folder, copied to ``latest.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import platform
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from bench.roofline import Work, roofline_cell

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results"
BASELINES = ("eager", "inductor")
SCHEMA = "aa-bench-report/1"


@dataclasses.dataclass
class Row:
    """One benchmark: a variant of a case. Times in seconds."""

    workload: str
    variant: str
    shape: str
    dtype: str
    device: str
    median_s: float
    p20_s: float | None
    p80_s: float | None
    rounds: int
    compile_s: float | None = None
    peak_mib: float | None = None
    aa_rewrites: dict[str, int] | None = None
    items: int | None = None  # work per call (extra_info["items"]), for a throughput column
    item_unit: str | None = None  # what an item is (extra_info["item_unit"], e.g. "words")
    bytes: int | None = None  # DRAM bytes one call must move (extra_info["bytes"])
    flops: int | None = None  # floating-point operations of one call (extra_info["flops"])
    flop_precision: str | None = None  # units the flops run on ("bf16", "fp8", ...)
    device_name: str | None = None  # torch.cuda.get_device_name() of a CUDA row
    ratio_vs_eager: float | None = None
    ratio_vs_inductor: float | None = None
    cost_vs: tuple[str, ...] | None = None  # variants of the case this row's cost is held against
    cost: float | None = None  # median / sum of the cost_vs variants' medians (< 1: cheaper)
    name: str = ""

    @property
    def case(self) -> tuple[str, str, str, str]:
        return (self.workload, self.shape, self.dtype, self.device)


# ---------------------------------------------------------------------------------------------
# pytest-benchmark JSON -> rows


def percentiles(data: Sequence[float]) -> tuple[float, float, float]:
    """``(median, p20, p80)`` of raw timings."""
    p20, median, p80 = np.percentile(np.asarray(data, dtype=float), [20, 50, 80])
    return float(median), float(p20), float(p80)


def row_from_benchmark(bench: Mapping[str, Any]) -> Row:
    """A `Row` (ratios not yet filled in) from one entry of the JSON's ``benchmarks`` list.

    Falls back on the group / params for benchmarks that lack the harness's ``extra_info``.
    """
    info = bench.get("extra_info") or {}
    params = bench.get("params") or {}
    stats = bench.get("stats") or {}
    data = stats.get("data")
    if data:
        median, p20, p80 = percentiles(data)
        rounds = len(data)
    else:  # raw data not saved: the median is still in the summary stats
        median, p20, p80 = float(stats["median"]), None, None
        rounds = int(stats.get("rounds", 0))
    return Row(
        workload=str(info.get("workload") or bench.get("group") or bench.get("name", "?")),
        variant=str(info.get("variant") or params.get("variant") or bench.get("param") or "?"),
        shape=str(info.get("shape", "")),
        dtype=str(info.get("dtype", "")),
        device=str(info.get("device", "")),
        median_s=median,
        p20_s=p20,
        p80_s=p80,
        rounds=rounds,
        compile_s=info.get("compile_s"),
        peak_mib=info.get("peak_mib"),
        aa_rewrites=info.get("aa_rewrites"),
        items=info.get("items"),
        item_unit=info.get("item_unit"),
        bytes=info.get("bytes"),
        flops=info.get("flops"),
        flop_precision=info.get("flop_precision"),
        device_name=info.get("device_name"),
        cost_vs=tuple(info["cost_vs"]) if info.get("cost_vs") else None,
        name=str(bench.get("name", "")),
    )


def with_ratios(rows: Iterable[Row]) -> list[Row]:
    """Copies of ``rows`` with the speed-ups against each baseline of the same case filled in,
    and the cost against the ``cost_vs`` variants where a row names them."""
    rows = list(rows)
    medians = {(r.case, r.variant): r.median_s for r in rows}
    out = []
    for r in rows:
        ratios = {}
        for base in BASELINES:
            m = medians.get((r.case, base))
            ratios[base] = m / r.median_s if m is not None and r.median_s > 0 else None
        against = [medians.get((r.case, v)) for v in r.cost_vs or ()]
        cost = (r.median_s / sum(against)
                if against and None not in against and sum(against) > 0 else None)
        out.append(dataclasses.replace(
            r, ratio_vs_eager=ratios["eager"], ratio_vs_inductor=ratios["inductor"], cost=cost
        ))
    return out


def merge_repeats(benches: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One benchmark entry per (workload, shape, dtype, device, variant).

    The harness runs each benchmark ``--repeats`` times with the variants interleaved; the
    repeats are separate pytest-benchmark entries. Their raw rounds are concatenated; compile
    time, peak memory and rewrites come from the repeat that measured them (the first).
    """
    merged: dict[tuple, dict[str, Any]] = {}
    for bench in benches:
        info = bench.get("extra_info") or {}
        if "workload" not in info:  # not a harness benchmark: keep it on its own
            merged[("?", bench.get("fullname", bench.get("name")))] = dict(bench)
            continue
        key = tuple(info.get(k) for k in ("workload", "shape", "dtype", "device", "variant"))
        data = list((bench.get("stats") or {}).get("data") or [])
        if key not in merged:
            first = dict(bench)
            first["extra_info"] = dict(info)
            first["stats"] = {**(bench.get("stats") or {}), "data": data}
            merged[key] = first
            continue
        into = merged[key]
        into["stats"]["data"] = into["stats"]["data"] + data
        for k in ("compile_s", "peak_mib", "aa_rewrites"):
            if into["extra_info"].get(k) is None and info.get(k) is not None:
                into["extra_info"][k] = info[k]
    return list(merged.values())


def rows_from_pytest_benchmark(doc: Mapping[str, Any]) -> list[Row]:
    """All rows of a pytest-benchmark JSON document (repeats merged), ratios included."""
    return with_ratios(row_from_benchmark(b) for b in merge_repeats(doc.get("benchmarks", [])))


# ---------------------------------------------------------------------------------------------
# machine info


def cpu_model(cpuinfo: str | None = None) -> str:
    """The ``model name`` of /proc/cpuinfo (or ``platform.processor()``)."""
    if cpuinfo is None:
        try:
            cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model") and value.strip():
            return value.strip()
    return platform.processor() or "unknown"


def git_commit(root: pathlib.Path = REPO_ROOT) -> str | None:
    """The checked-out commit, read from ``.git`` directly (no git process)."""
    git = root / ".git"
    try:
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            git = (root / git.read_text().split(":", 1)[1].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head or None
        ref = head.split(":", 1)[1].strip()
        common = git
        if (git / "commondir").is_file():
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for base in (git, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    except OSError:
        return None
    return None


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - machine info must never fail the report
        return None
    return None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def collect_machine_info(
    doc: Mapping[str, Any] | None = None, command: Sequence[str] | str | None = None
) -> dict[str, Any]:
    """Where the numbers come from. No host name (``platform.platform()`` holds none)."""
    commit = git_commit() or ((doc or {}).get("commit_info") or {}).get("id")
    if command is not None and not isinstance(command, str):
        command = " ".join(str(c) for c in command)
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": _gpu_name() or "none",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "pytest_benchmark": _version("pytest-benchmark"),
        "git_commit": commit,
        "command": command,
        # 1/5/15-minute load averages when the report is written: on a small shared machine a
        # load well above the cores the benchmark itself keeps busy means noisy timings.
        "loadavg": _loadavg(),
    }


# ---------------------------------------------------------------------------------------------
# rendering


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.3f}"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _rewrites(value: Mapping[str, int] | None) -> str:
    if not value:
        return "—" if value is None else "none"
    return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))


COLUMNS = (
    "workload", "shape", "dtype", "device", "variant", "median ms", "p20 ms", "p80 ms",
    "rounds", "vs eager", "vs inductor", "cost", "peak MiB", "compile s", "throughput",
    "roofline", "aa rewrites",
)
ALIGN = ("---",) * 5 + ("---:",) * 11 + ("---",)  # text left, numbers right


def _throughput(row: Row) -> str:
    """``items / median`` with the row's unit, e.g. ``"441.2k words/s"``; — when not given."""
    if not row.items or not row.median_s:
        return "—"
    rate = row.items / row.median_s
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.1f}{suffix} {row.item_unit or 'items'}/s"
    return f"{rate:.1f} {row.item_unit or 'items'}/s"


def _roofline(row: Row) -> str:
    """Achieved bandwidth or FLOP/s and its share of the GPU's peak (`bench.roofline`)."""
    if not row.bytes and not row.flops:
        return "—"
    work = Work(row.bytes or 0, row.flops or 0, row.flop_precision if row.flops else None)
    return roofline_cell(work, row.median_s, row.device, row.device_name)


def _cost(row: Row) -> str:
    """``"1.02 of aa"``: the row's median over the summed medians of its ``cost_vs``."""
    if row.cost is None:
        return "—"
    return f"{row.cost:.3f} of {'+'.join(row.cost_vs or ())}"


def table_cells(row: Row) -> list[str]:
    return [
        row.workload, row.shape, row.dtype, row.device, row.variant,
        _ms(row.median_s), _ms(row.p20_s), _ms(row.p80_s), str(row.rounds),
        _ratio(row.ratio_vs_eager), _ratio(row.ratio_vs_inductor), _cost(row),
        _num(row.peak_mib, ".1f"), _num(row.compile_s, ".2f"), _throughput(row),
        _roofline(row), _rewrites(row.aa_rewrites),
    ]


def render_table(rows: Sequence[Row]) -> str:
    """The Markdown table alone (one line per row)."""
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(ALIGN) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in table_cells(r)) + " |"
              for r in rows]
    return "\n".join(lines)


def render_markdown(rows: Sequence[Row], machine: Mapping[str, Any]) -> str:
    """Header with the machine info, the table, and how to read it."""
    head = ["# aa-compile benchmarks", ""]
    for key in ("git_commit", "platform", "cpu", "cores", "gpu", "python", "torch",
                "triton", "pytest_benchmark", "loadavg", "command", "created_utc"):
        if key in machine:
            head.append(f"- **{key}**: `{machine[key]}`")
    notes = [
        "",
        "Times per call in milliseconds (median, 20th and 80th percentile of the timed rounds). "
        "`vs eager` / `vs inductor`: baseline median / this median of the same case, "
        "so > 1 is faster than the baseline; — where the case has no such baseline. "
        "`cost` (rows that name what they are held against, e.g. `1.02 of aa`): this median / "
        "the sum of those variants' medians in the same case, so < 1 is cheaper. "
        "`compile s`: the first (warm-up) call, compilation included; it shrinks on re-runs that "
        "hit inductor's on-disk cache (`python -m bench --cold-cache` avoids that), and later "
        "variants can reuse kernels an earlier one compiled in the same process. `peak MiB`: see "
        "`bench/harness.py::peak_memory_mib` (CUDA: allocator peak incl. live tensors; CPU: "
        "peak of memory allocated during one call). `roofline`: what one call must move "
        "(bytes) or compute (FLOPs), as its workload declares, over the median, and its share "
        "of the GPU's data-sheet peak (HBM bandwidth or dense tensor-core FLOP/s, whichever "
        "share is larger; `bench/roofline.py`, sources in `docs/gpu.md`); — on a CPU, for a GPU "
        "without known peaks, or for a workload that declares no work.",
    ]
    return "\n".join(head + ["", render_table(rows)] + notes) + "\n"


def render_png(rows: Sequence[Row], path: pathlib.Path | str, title: str = "") -> None:
    """Bar chart: one group per case, one bar per variant, y = speed-up vs eager (Agg).

    Cases without an ``eager`` row (nothing to compare with) are left out of the chart; they
    are in the table."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.ratio_vs_eager is not None]
    cases = list(dict.fromkeys(r.case for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    colors = {v: f"C{i % 10}" for i, v in enumerate(variants)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 1.5), 4.5))
    labelled: set[str] = set()
    for j, case in enumerate(cases):  # bars of the variants this case has, centred on j
        present = [r for v in variants for r in rows
                   if r.case == case and r.variant == v and r.ratio_vs_eager is not None]
        width = 0.8 / max(len(present), 1)
        for i, row in enumerate(present):
            x = j + (i - (len(present) - 1) / 2) * width
            label = None if row.variant in labelled else row.variant
            labelled.add(row.variant)
            bar = ax.bar([x], [row.ratio_vs_eager], width=width, color=colors[row.variant],
                         label=label)
            ax.bar_label(bar, labels=[f"{row.ratio_vs_eager:.2f}"], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{w}\n{s}\n{d} {dev}" for w, s, d, dev in cases], fontsize=7)
    ax.set_ylabel("speed-up vs eager (eager median / median)")
    ax.set_title(title or "aa-compile benchmarks: speed-up vs eager (higher is faster)")
    if labelled:
        ax.legend(title="variant", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def to_json_doc(rows: Sequence[Row], machine: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "machine": dict(machine),
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def rows_from_report_json(doc: Mapping[str, Any]) -> list[Row]:
    """Rows back from a document written by `to_json_doc`."""
    return [Row(**r) for r in doc["rows"]]


# ---------------------------------------------------------------------------------------------
# writing


def utc_stamp(now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_report(
    rows: Sequence[Row],
    machine: Mapping[str, Any],
    out_dir: pathlib.Path | str = DEFAULT_OUT,
    now: _dt.datetime | None = None,
) -> dict[str, pathlib.Path]:
    """Write ``<stamp>-<commit>.{json,md,png}`` and ``latest.*`` copies; return their paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = utc_stamp(now)
    machine = {**machine, "created_utc": stamp}
    commit = (machine.get("git_commit") or "nocommit")[:8]
    stem = out_dir / f"{stamp}-{commit}"
    paths = {ext: stem.with_suffix(f".{ext}") for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(to_json_doc(rows, machine), indent=2) + "\n")
    paths["md"].write_text(render_markdown(rows, machine))
    render_png(rows, paths["png"], title=f"speed-up vs eager @ {commit} ({stamp})")
    for ext, path in list(paths.items()):
        latest = out_dir / f"latest.{ext}"
        shutil.copyfile(path, latest)
        paths[f"latest_{ext}"] = latest
    return paths


def report_file(
    bench_json: pathlib.Path | str,
    out_dir: pathlib.Path | str = DEFAULT_OUT,
    command: Sequence[str] | str | None = None,
) -> tuple[list[Row], dict[str, pathlib.Path]]:
    """Read a pytest-benchmark JSON file, write the report files; return rows and paths."""
    doc = json.loads(pathlib.Path(bench_json).read_text())
    rows = rows_from_pytest_benchmark(doc)
    machine = collect_machine_info(doc, command)
    return rows, write_report(rows, machine, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report",
        description="Summarize a pytest-benchmark JSON file (from the bench/ harness).",
    )
    parser.add_argument("bench_json", help="file written by pytest --benchmark-json=PATH")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    command = ["python", "-m", "bench.report", *(sys.argv[1:] if argv is None else argv)]
    rows, paths = report_file(args.bench_json, args.out, command=command)
    print(render_table(rows))
    for key in ("json", "md", "png"):
        print(f"wrote {paths[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
