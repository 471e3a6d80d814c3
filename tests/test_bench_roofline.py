"""bench/roofline.py and the work each kernel workload declares: byte and FLOP counts against
hand-computed values, the peak lookup, and the report's roofline column."""

from __future__ import annotations

import pytest
import torch

from bench import report, roofline
from bench.harness import RMSNormCase
from bench.roofline import PEAKS, Work

H100 = "NVIDIA H100 80GB HBM3"


# -- the declared work of each workload, by hand ---------------------------------------------

def test_rms_norm_work():
    from bench.test_rms_norm import work

    case = RMSNormCase(4, 8, torch.bfloat16)
    assert work(case, backward=False) == Work(144)  # (x 32 + w 8 + y 32) * 2 B
    assert work(case, backward=True) == Work(144 + 224)  # + (grad, x, dx 96 + w, dw 16) * 2 B


def test_trigram_bag_work():
    from bench.test_trigram_bag import TrigramBagCase, work

    case = TrigramBagCase(100, 10, 4, 3, torch.float32)
    # 30 rows * 16 B + 30 indices * 8 + 4 offsets * 8 + out 3 * 16
    assert work(case, 30, backward=False) == Work(480 + 240 + 32 + 48)
    # + grad 3 * 16 + dweight 100 * 16 + indices and offsets again
    assert work(case, 30, backward=True) == Work(800 + 48 + 1600 + 272)
    # more indices than rows: each of the 100 rows once
    assert work(case, 500, backward=False) == Work(1600 + 4000 + 32 + 48)


def test_hashed_trigram_bag_work():
    from bench.test_hashed_trigram_bag import HashedBagCase, work

    case = HashedBagCase(100, 10, 4, 3, torch.float32)
    ids = 5 * 8 + 4 * 8 + 16  # ids, offsets, whole-word slots
    assert work(case, 5, "hashed_ids", False, 16) == Work(ids + 50 * 16 + 48)
    assert work(case, 5, "hashed_ids", True, 16) == Work(ids + 800 + 48 + 103 * 16 + ids)
    assert work(case, 5, "hash_only", False, 16) == Work(ids + 5 * 10 * 8)


def test_window_attention_work():
    from bench.test_window_attention import WindowAttentionCase, attended_pairs, work

    assert attended_pairs([3], 2) == 1 + 2 + 2
    assert attended_pairs([1, 4], 10) == 1 + (1 + 2 + 3 + 4)
    assert attended_pairs([0], 5) == 0
    case = WindowAttentionCase(4, 2, 2, 1, 8, 2, torch.bfloat16)
    # pairs: doc of 1 -> 1, doc of 3 -> 1 + 2 + 2; times 2 heads = 12
    fwd = work(case, [1, 3], backward=False)
    assert fwd == Work(2 * 128 + 2 * 64 + 32, 4 * 8 * 12, "bf16")  # q, out 128 B; k, v 64 B
    both = work(case, [1, 3], backward=True)
    assert both == Work(416 + 3 * 128 + 2 * 64 + 32 + 128 + 2 * 64, 14 * 8 * 12, "bf16")
    fp32 = WindowAttentionCase(4, 2, 2, 1, 8, 2, torch.float32)
    assert work(fp32, [4], backward=False).precision == "fp32"


def test_hat_ops_work():
    from bench.test_hat_ops import HATOpCase, guide_work, pool_work

    case = HATOpCase(10, 8, 2, torch.float32)  # width H * hd = 8, 4-byte floats
    # k, v 2 * 10 * 32 B; q 32 B; out 3 * 32 B; 4 offsets * 8 B
    assert pool_work(case, 10, 3, backward=False) == Work(32 + 640 + 32 + 96)
    assert pool_work(case, 10, 3, backward=True) == Work(800 + 800 + 672)
    # x 320, g 96, offsets 32, weight 32, y and normed 640
    assert guide_work(case, 10, 3, backward=False) == Work(1120)
    assert guide_work(case, 10, 3, backward=True) == Work(1120 + 1024 + 448)


def test_fp8_linear_work():
    from bench.test_fp8_linear import Fp8LinearCase, work

    case = Fp8LinearCase(2, 4, 8, torch.bfloat16)
    assert work(case, "fp8_rowwise", backward=False) == Work((8 + 32 + 16) * 2, 128, "fp8")
    assert work(case, "bf16", backward=True) == Work(112 + 192, 3 * 128, "bf16")
    assert work(case, "eager", backward=False).precision == "fp32"


def test_dictionary_work():
    from bench.test_dictionary_decode import DictionaryCase, work

    case = DictionaryCase(5, 20, 10, 2, torch.float32)
    # probs 2 * 20 * 4; offsets 6 * 8 + counts 5 * 8 + entries 30 * (8 + 4); top-10 of 2 rows
    assert work(case, 30) == Work(160 + 48 + 40 + 360 + 2 * 10 * 12)


# -- peaks and the column ---------------------------------------------------------------------

def test_peaks_are_the_data_sheet_figures():
    h100, h200 = PEAKS[H100], PEAKS["NVIDIA H200"]
    assert h100.bandwidth == 3.35e12 and h200.bandwidth == 4.8e12
    assert h100.flops["bf16"] == pytest.approx(989.5e12)  # 1,979 TFLOPS with 2:4 sparsity
    assert h100.flops["fp8"] == pytest.approx(1979e12)
    assert h200.flops == h100.flops  # same GH100 compute, faster memory
    assert roofline.peak_for("NVIDIA H200 ") is h200
    assert roofline.peak_for("NVIDIA A100-SXM4-80GB") is None
    assert roofline.peak_for(None) is None


def test_attained_picks_the_binding_share():
    peak = PEAKS[H100]
    memory = roofline.attained(Work(int(3.35e12 / 2)), 1.0, peak)
    assert memory.share == pytest.approx(0.5) and memory.limit == "HBM"
    assert str(memory) == "1.68 TB/s 50% HBM"
    compute = roofline.attained(Work(10**9, int(989.5e12 * 0.25), "bf16"), 0.5, peak)
    assert compute.limit == "bf16" and compute.share == pytest.approx(0.5)
    assert str(compute) == "495 TFLOP/s 50% bf16"
    assert roofline.attained(Work(), 1.0, peak) is None
    assert str(roofline.attained(Work(3 * 10**9), 0.01, peak)) == "300 GB/s 9% HBM"
    assert str(roofline.attained(Work(10**6), 0.01, peak)) == "100 MB/s 0.0% HBM"
    assert roofline.three_digits(1.5e10, "FLOP/s") == "15.0 GFLOP/s"
    assert roofline.three_digits(0.5, "B/s") == "0.50 B/s"


def test_roofline_cell_is_blank_off_a_known_gpu():
    w = Work(10**9)
    assert roofline.roofline_cell(w, 1e-3, "cpu", None) == "—"
    assert roofline.roofline_cell(w, 1e-3, "cuda", "NVIDIA GeForce RTX 4090") == "—"
    assert roofline.roofline_cell(None, 1e-3, "cuda", H100) == "—"
    assert roofline.roofline_cell(w, 1e-3, "cuda", H100) == "1.00 TB/s 30% HBM"


def test_report_shows_the_roofline_column():
    bench = {"name": "t", "stats": {"data": [1e-3, 1e-3, 1e-3]},
             "extra_info": {"workload": "rms_norm_fwd", "variant": "aa", "shape": "s",
                            "dtype": "bfloat16", "device": "cuda", "device_name": H100,
                            "bytes": 10**9, "flops": 0, "flop_precision": None}}
    rows = report.rows_from_pytest_benchmark({"benchmarks": [bench]})
    assert "1.00 TB/s 30% HBM" in report.render_table(rows)
    cpu = dict(bench, extra_info={**bench["extra_info"], "device": "cpu"})
    cells = report.table_cells(report.rows_from_pytest_benchmark({"benchmarks": [cpu]})[0])
    assert cells[report.COLUMNS.index("roofline")] == "—"
    assert len(cells) == len(report.COLUMNS) == len(report.ALIGN)


@pytest.mark.parametrize("kwargs, match", [
    ({"bytes": -1}, "must be >= 0"),
    ({"flops": 10}, "need a precision"),
    ({"flops": 10, "precision": "int4"}, "need a precision"),
])
def test_work_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Work(**kwargs)


def test_work_adds_only_like_precisions():
    assert Work(1, 2, "bf16") + Work(3) == Work(4, 2, "bf16")
    with pytest.raises(ValueError, match="cannot add bf16 and fp8"):
        Work(0, 1, "bf16") + Work(0, 1, "fp8")


def test_dtype_helpers_name_unknown_dtypes():
    assert roofline.itemsize("bfloat16") == 2 and roofline.precision_of("float16") == "fp16"
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        roofline.itemsize("int8")
    with pytest.raises(ValueError, match="no peak precision for dtype 'float64'"):
        roofline.precision_of("float64")
