"""The benchmark reporter (bench/report.py) on a hand-made pytest-benchmark JSON document.

Expected statistics are computed here with numpy from the raw data; no benchmark runs.
"""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Raw per-round timings (seconds). Case A has all three variants; case B has no inductor row.
RAW = {
    ("transformer_fwd", "eager"): [0.100, 0.104, 0.098, 0.120, 0.101, 0.099, 0.110, 0.097],
    ("transformer_fwd", "inductor"): [0.050, 0.052, 0.049, 0.060, 0.051, 0.048, 0.055],
    ("transformer_fwd", "aa"): [0.045, 0.047, 0.044, 0.046, 0.070, 0.043, 0.045, 0.046, 0.044],
    ("rms_norm_fwd", "eager"): [0.020, 0.021, 0.019, 0.022, 0.020],
    ("rms_norm_fwd", "aa"): [0.010, 0.011, 0.009, 0.012, 0.010, 0.010],
}
SHAPES = {"transformer_fwd": "B2xS128 d256 L4", "rms_norm_fwd": "4096x1024"}


def _bench(workload: str, variant: str, data: list[float] | None) -> dict:
    extra = {
        "workload": workload, "variant": variant, "shape": SHAPES[workload],
        "dtype": "float32", "device": "cpu", "compile_s": 12.5 if variant != "eager" else 0.1,
        "peak_mib": 42.25,
    }
    if variant == "aa":
        extra["aa_rewrites"] = {"rms_norm": 9}
    stats = {"min": 0.0, "max": 1.0, "mean": 0.5, "median": 0.5, "rounds": len(data or [])}
    if data is not None:
        stats["data"] = data
    return {
        "group": f"{workload} {SHAPES[workload]} float32",
        "name": f"test_{workload}[case-{variant}]",
        "fullname": f"bench/test_x.py::test_{workload}[case-{variant}]",
        "params": {"case_id": "case", "variant": variant},
        "param": f"case-{variant}",
        "extra_info": extra,
        "options": {},
        "stats": stats,
    }


@pytest.fixture
def doc() -> dict:
    return {
        "machine_info": {"machine": "x86_64"},
        "commit_info": {"id": "0123456789abcdef0123456789abcdef01234567"},
        "benchmarks": [_bench(w, v, d) for (w, v), d in RAW.items()],
        "datetime": "2026-01-01T00:00:00",
        "version": "5.3.1",
    }


@pytest.fixture
def rows(doc):
    return report.rows_from_pytest_benchmark(doc)


def _row(rows, workload, variant):
    (row,) = [r for r in rows if r.workload == workload and r.variant == variant]
    return row


def _median(key):
    return float(np.median(RAW[key]))


MACHINE = {
    "platform": "Linux-x86_64", "cpu": "Test CPU", "cores": 2, "gpu": "none",
    "python": "3.11", "torch": "2.13.0", "triton": "3.9.0",
    "git_commit": "0123456789abcdef0123456789abcdef01234567", "command": "python -m bench",
}


def test_one_row_per_benchmark_with_medians_and_percentiles(rows):
    assert [(r.workload, r.variant) for r in rows] == list(RAW)
    for (workload, variant), data in RAW.items():
        row = _row(rows, workload, variant)
        assert row.median_s == pytest.approx(np.median(data))
        assert row.p20_s == pytest.approx(np.percentile(data, 20))
        assert row.p80_s == pytest.approx(np.percentile(data, 80))
        assert row.rounds == len(data)
        assert row.shape == SHAPES[workload] and row.dtype == "float32" and row.device == "cpu"
        assert row.peak_mib == 42.25
    assert _row(rows, "transformer_fwd", "aa").aa_rewrites == {"rms_norm": 9}
    assert _row(rows, "transformer_fwd", "inductor").compile_s == 12.5


def test_ratios_vs_eager_and_inductor(rows):
    eager = _median(("transformer_fwd", "eager"))
    inductor = _median(("transformer_fwd", "inductor"))
    aa = _median(("transformer_fwd", "aa"))
    aa_row = _row(rows, "transformer_fwd", "aa")
    assert aa_row.ratio_vs_eager == pytest.approx(eager / aa)
    assert aa_row.ratio_vs_inductor == pytest.approx(inductor / aa)
    assert aa_row.ratio_vs_eager > 1  # faster than eager reads as > 1
    ind_row = _row(rows, "transformer_fwd", "inductor")
    assert ind_row.ratio_vs_eager == pytest.approx(eager / inductor)
    assert ind_row.ratio_vs_inductor == pytest.approx(1.0)
    eager_row = _row(rows, "transformer_fwd", "eager")
    assert eager_row.ratio_vs_eager == pytest.approx(1.0)
    assert eager_row.ratio_vs_inductor == pytest.approx(inductor / eager)
    assert eager_row.ratio_vs_inductor < 1


def test_missing_inductor_baseline_gives_no_ratio(rows):
    aa = _row(rows, "rms_norm_fwd", "aa")
    assert aa.ratio_vs_inductor is None
    assert aa.ratio_vs_eager == pytest.approx(
        _median(("rms_norm_fwd", "eager")) / _median(("rms_norm_fwd", "aa"))
    )
    assert _row(rows, "rms_norm_fwd", "eager").ratio_vs_inductor is None


def test_baselines_are_matched_within_the_same_case(doc):
    other = _bench("rms_norm_fwd", "inductor", [0.001, 0.001, 0.001])
    other["extra_info"]["dtype"] = "bfloat16"  # another case: must not be rms_norm_fwd's baseline
    doc["benchmarks"].append(other)
    rows = report.rows_from_pytest_benchmark(doc)
    assert _row([r for r in rows if r.dtype == "float32"], "rms_norm_fwd", "aa") \
        .ratio_vs_inductor is None


def test_benchmark_without_raw_data_falls_back_to_summary_median(doc):
    doc["benchmarks"] = [_bench("rms_norm_fwd", "eager", None)]
    (row,) = report.rows_from_pytest_benchmark(doc)
    assert row.median_s == 0.5 and row.p20_s is None and row.p80_s is None
    assert "—" in report.render_table([row])


def test_markdown_has_machine_header_and_every_row(rows):
    md = report.render_markdown(rows, MACHINE)
    assert "Test CPU" in md and MACHINE["git_commit"] in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)  # header, separator, one line per row
    for row in rows:
        median_ms = f"{row.median_s * 1e3:.3f}"
        assert any(
            f"| {row.workload} |" in line and f"| {row.variant} |" in line and median_ms in line
            for line in table
        ), (row.workload, row.variant)
    aa_line = next(line for line in table if "| transformer_fwd |" in line and "| aa |" in line)
    ratio = _median(("transformer_fwd", "inductor")) / _median(("transformer_fwd", "aa"))
    assert f"{ratio:.2f}x" in aa_line and "rms_norm=9" in aa_line


def test_write_report_files_png_and_json_roundtrip(rows, tmp_path):
    now = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    paths = report.write_report(rows, MACHINE, tmp_path / "results", now=now)
    stem = "20260102T030405Z-01234567"
    for ext in ("json", "md", "png"):
        assert paths[ext] == tmp_path / "results" / f"{stem}.{ext}"
        assert paths[ext].is_file()
        latest = tmp_path / "results" / f"latest.{ext}"
        assert latest.read_bytes() == paths[ext].read_bytes()
    png = paths["png"].read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 1000

    doc = json.loads(paths["json"].read_text())
    assert doc["machine"]["cpu"] == "Test CPU"
    assert doc["machine"]["created_utc"] == "20260102T030405Z"
    assert report.rows_from_report_json(doc) == rows
    assert "| transformer_fwd |" in paths["md"].read_text()


def test_cpu_model_and_git_commit_readers(tmp_path):
    assert report.cpu_model("processor\t: 0\nmodel name\t: Some CPU 9000\n") == "Some CPU 9000"
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "packed-refs").write_text("# pack-refs\n" + "ab" * 20 + " refs/heads/main\n")
    assert report.git_commit(tmp_path) == "ab" * 20
    (git / "refs" / "heads" / "main").write_text("cd" * 20 + "\n")
    assert report.git_commit(tmp_path) == "cd" * 20
    assert report.git_commit(tmp_path / "nowhere") is None


def test_repeats_are_merged_into_one_row_per_variant():
    """Interleaved repeats of a benchmark become one row whose rounds are all the repeats'."""
    first = _bench("rms_norm_fwd", "aa", [0.010, 0.012, 0.011])
    second = _bench("rms_norm_fwd", "aa", [0.020, 0.009])
    second["extra_info"].pop("compile_s")
    second["extra_info"].pop("peak_mib")
    eager = _bench("rms_norm_fwd", "eager", [0.030, 0.031])
    rows = report.rows_from_pytest_benchmark({"benchmarks": [first, eager, second]})
    assert [r.variant for r in rows] == ["aa", "eager"]
    aa = rows[0]
    all_data = [0.010, 0.012, 0.011, 0.020, 0.009]
    assert aa.rounds == 5
    assert aa.median_s == pytest.approx(float(np.median(all_data)))
    assert aa.p20_s == pytest.approx(float(np.percentile(all_data, 20)))
    assert aa.compile_s == 12.5 and aa.peak_mib == 42.25
    assert aa.ratio_vs_eager == pytest.approx(float(np.median([0.030, 0.031]) / np.median(all_data)))


def test_throughput_column_from_items_and_median():
    bench = _bench("rms_norm_fwd", "eager", [0.002, 0.004, 0.003])
    bench["extra_info"].update(items=1500, item_unit="words")
    rows = report.rows_from_pytest_benchmark({"benchmarks": [bench]})
    expected = 1500 / float(np.median([0.002, 0.004, 0.003]))
    assert report._throughput(rows[0]) == f"{expected / 1e3:.1f}k words/s"
    assert "words/s" in report.render_table(rows)
    plain = report.rows_from_pytest_benchmark({"benchmarks": [_bench("rms_norm_fwd", "aa", [1.0])]})
    assert report._throughput(plain[0]) == "—"


def test_cost_against_the_sum_of_named_variants():
    """A row naming ``cost_vs`` gets its median over the sum of those variants' medians."""
    plain = _bench("rms_norm_fwd", "aa", [0.100, 0.110, 0.090])
    alone = _bench("rms_norm_fwd", "alone", [0.020, 0.030, 0.010])
    steered = _bench("rms_norm_fwd", "steered", [0.120, 0.130, 0.125])
    steered["extra_info"]["cost_vs"] = ["aa", "alone"]
    partial = _bench("rms_norm_fwd", "partial", [0.5])
    partial["extra_info"]["cost_vs"] = ["aa", "missing"]
    rows = report.rows_from_pytest_benchmark({"benchmarks": [plain, alone, steered, partial]})
    by = {r.variant: r for r in rows}
    assert by["steered"].cost == pytest.approx(0.125 / (0.100 + 0.020))
    assert by["steered"].cost_vs == ("aa", "alone")
    assert by["aa"].cost is None and by["partial"].cost is None  # nothing named / one missing
    table = report.render_table(rows)
    assert f"{0.125 / 0.120:.3f} of aa+alone" in table
    assert all(line.count("|") == table.splitlines()[0].count("|") for line in table.splitlines())
