"""Two-process variant of the training workload: the reference transformer's AdamW training
step under FSDP2 (`aa_compile.distributed.shard_blocks`, ``backend="aa"``) on 2 CPU/gloo
processes against the same step on 1 process, with the same global batch.

    python -m bench --quick -k distributed            # rows in the harness's report
    python -m bench.test_distributed --quick          # speed ratio, peak per rank, the 0.65 bar

Variants: ``1proc`` (one process, the plain model compiled with ``backend="aa"``) and
``2proc`` (two ranks, every block sharded with ``fully_shard``, half the batch each). Every
process runs one thread (``--threads-per-rank``), so two processes use two cores where one
uses one, as two GPUs would: the speed ratio is what the second core buys with FSDP2's
collectives in the way (more threads per process on a shared machine measure mostly OpenMP
waiting for descheduled threads). The time of a step is what the pytest process, which joins
the ranks' process group as a coordinator that does no training, waits between telling the
ranks to run one step (a broadcast) and every rank having finished it (a barrier). The
2-process row's ``peak_vs_1proc`` / ``speed_vs_1proc`` (JSON) compare it with the 1-process
row; the test fails if the two variants' losses differ (they train the same global batch).

Peak memory per rank: every rank is a fresh process (spawned), so its peak resident set size
(``VmHWM`` in ``/proc/self/status``) counts everything it holds at once: parameters, gradients,
AdamW state, the blocks FSDP2 all-gathers, activations, gloo's buffers and what the compiler
keeps. The figure is that peak minus the resident size right before the model is built (the
interpreter, torch, aa_compile and the library code a training step runs: a tiny model's
step loads it first, `load_kernels`; else the code pages the first step maps in would count
as training memory), over the timed steps only: after the compiling first steps
the peak is reset (``5`` to ``/proc/self/clear_refs``), so the compiler's transient peak does not
count (where the kernel refuses the reset, the peak covers the whole run; ``peak_reset`` says
which). glibc's malloc would keep freed blocks of up to 32 MiB in its heap (its mmap threshold
grows with every large free), so the resident size would follow what malloc holds rather than
what is live; the ranks start with ``MALLOC_MMAP_THRESHOLD_=65536``, which serves every block
of 64 KiB and more (every tensor that matters) from mmap and gives it back on free. An
allocator counter (torch.profiler) would miss memory outside PyTorch's allocator and the
profiler perturbs the step. The model is sized so that parameters, gradients and AdamW state
(16 bytes per parameter, the part FSDP2 divides by the world size) dominate.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh

from aa_compile import distributed as aad
from aa_compile.models.transformer import Transformer, TransformerConfig
from aa_compile.models.umup import UmupConfig, UmupTransformer
from aa_compile.report import reports
from bench.harness import CaseLabels, dtype_name

#: variant -> number of training processes
VARIANTS = {"1proc": 1, "2proc": 2}
WORKLOAD = "transformer_fsdp_step"
STOP, STEP, RESET = 0, 1, 2
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
#: the issue's bar: the 2-process peak per rank at most this share of the 1-process peak
MEMORY_BAR = 0.65


@dataclasses.dataclass(frozen=True)
class DistributedCase(CaseLabels):
    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    batch: int
    seq: int
    inner: str  # the aa backend's inner compiler
    model: str = "reference"  # or "umup": the u-μP transformer
    dtype: torch.dtype = torch.float32

    SHAPE = "{model} B{batch}xS{seq} d{d_model} L{n_layers} H{n_heads} V{vocab_size} ({inner})"
    ID = "{model}-d{d_model}-L{n_layers}-S{seq}-{dtype}"

    def build(self) -> torch.nn.Module:
        """The model, freshly initialised (seed it first)."""
        shape = {"vocab_size": self.vocab_size, "d_model": self.d_model,
                 "n_layers": self.n_layers, "n_heads": self.n_heads,
                 "max_seq_len": self.seq + 1}
        if self.model == "umup":
            return UmupTransformer(UmupConfig(**shape))
        return Transformer(TransformerConfig(**shape))


def distributed_cases(quick: bool, device: str) -> list[DistributedCase]:
    """Quick: 16 blocks of d=384 (28M parameters: 450 MB of parameters, gradients and AdamW
    state), a byte vocabulary (the root, which FSDP2 keeps gathered, stays small) and the
    ``eager`` inner compiler (compiling is not what is measured). Full: d=768, inductor, the
    reference and the u-μP transformer."""
    if quick:
        return [DistributedCase(384, 16, 6, 256, 4, 64, "eager")]
    return [DistributedCase(768, 16, 12, 256, 4, 256, "inductor", model)
            for model in ("reference", "umup")]


CASES = distributed_cases


def rss_kib(field: str) -> int:
    """A ``Vm*`` line of ``/proc/self/status`` in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")
    return int(match.group(1))


def reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False where refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def load_kernels(case: DistributedCase) -> None:
    """One AdamW training step of a tiny model of the case's kind, so that the library code a
    training step runs (libtorch's, BLAS's and oneDNN's pages, mapped in on first use) is
    resident before the baseline is read rather than counted as the step's memory."""
    torch.manual_seed(0)
    tiny = dataclasses.replace(case, d_model=64, n_layers=2, n_heads=2).build()
    opt = torch.optim.AdamW(tiny.parameters(), lr=1e-4)
    tiny.loss(torch.randint(0, case.vocab_size, (case.batch, case.seq + 1))).backward()
    opt.step()


def rank_main(rank: int, world: int, store: str, case: DistributedCase, threads: int) -> None:
    """A training process: rank ``rank`` (1..world-1) of the coordinator's group."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    trainers = dist.new_group(list(range(1, world)))
    n = world - 1
    load_kernels(case)
    before = rss_kib("VmRSS")
    torch.manual_seed(0)
    model = case.build()
    options = {"inner_compiler": case.inner}
    ids = torch.randint(0, case.vocab_size, (case.batch, case.seq + 1),
                        generator=torch.Generator().manual_seed(1))
    if n > 1:
        aad.shard_blocks(model, compile_options=options,
                         mesh=DeviceMesh.from_group(trainers, "cpu"))
        ids = aad.shard_batch(ids, trainers)
    else:
        model.compile(backend="aa", options=options)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    losses: list[float] = []
    reset = False
    flag = torch.zeros((), dtype=torch.int64)
    while True:
        dist.broadcast(flag, src=0)
        if flag.item() == STOP:
            break
        if flag.item() == RESET:
            reset = reset_peak()
        else:
            loss = model.loss(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total = aad.sum_over_ranks(loss.detach(), trainers if n > 1 else None)
            losses.append(total.item() / n)
        dist.barrier()
    peak = (rss_kib("VmHWM") - before) / 1024
    rewrites: dict[str, int] = {}
    for rep in reports():
        for name, count in rep.rewrites.items():
            rewrites[name] = rewrites.get(name, 0) + count
    dist.gather_object({"rank": rank - 1, "peak_mib": peak, "peak_reset": reset,
                        "before_mib": before / 1024, "losses": losses,
                        "aa_rewrites": rewrites}, None, dst=0)
    dist.barrier()
    dist.destroy_process_group()


class Ranks:
    """Training processes started fresh for one variant, driven one step at a time from this
    process (which joins their group as rank 0 and trains nothing)."""

    def __init__(self, case: DistributedCase, n: int, threads: int) -> None:
        if dist.is_initialized():
            raise RuntimeError("the distributed bench starts its own process group: run it "
                               "from a process that has none")
        self.n = n
        self.tmp = tempfile.TemporaryDirectory(prefix="aa_bench_dist_")
        store = os.path.join(self.tmp.name, "store")
        context = mp.get_context("spawn")
        self.procs = [context.Process(target=rank_main, args=(r, n + 1, store, case, threads))
                      for r in range(1, n + 1)]
        saved = os.environ.get(MMAP_THRESHOLD)
        os.environ[MMAP_THRESHOLD] = "65536"  # see the module's docstring
        try:
            for p in self.procs:
                p.start()
        finally:
            if saved is None:
                del os.environ[MMAP_THRESHOLD]
            else:
                os.environ[MMAP_THRESHOLD] = saved
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                world_size=n + 1, timeout=datetime.timedelta(minutes=10))
        dist.new_group(list(range(1, n + 1)))  # every member of the world creates it
        self.flag = torch.zeros((), dtype=torch.int64)

    def send(self, what: int) -> None:
        self.flag.fill_(what)
        dist.broadcast(self.flag, src=0)

    def step(self) -> None:
        """One training step on every rank (returns when all have finished it)."""
        self.send(STEP)
        dist.barrier()

    def reset_peak(self) -> None:
        self.send(RESET)
        dist.barrier()

    def close(self) -> list[dict[str, Any]]:
        """Stop the ranks; their peak memory, losses, in rank order."""
        self.send(STOP)
        out: list[Any] = [None] * (self.n + 1)
        dist.gather_object(None, out, dst=0)
        dist.barrier()
        dist.destroy_process_group()
        for p in self.procs:
            p.join(timeout=60)
        self.tmp.cleanup()
        return sorted(out[1:], key=lambda r: r["rank"])

    def kill(self) -> None:
        """After a failure: end the ranks and the group without waiting for them."""
        for p in self.procs:
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        self.tmp.cleanup()


def measure(case: DistributedCase, variant: str, rounds: int, threads_per_rank: int = 1,
            timed=None) -> dict[str, Any]:
    """Run ``variant``: two compiling steps (the first timed as ``compile_s``), reset the peak,
    then ``rounds`` timed steps, by ``timed(step, rounds)`` (default: a perf_counter loop
    returning the step times). Returns the ranks' figures and the step times."""
    n = VARIANTS[variant]
    ranks = Ranks(case, n, threads_per_rank)
    try:
        start = time.perf_counter()
        ranks.step()
        compile_s = time.perf_counter() - start
        ranks.step()
        ranks.reset_peak()
        times = (timed or perf_counter_steps)(ranks.step, rounds)
        per_rank = ranks.close()
    except BaseException:
        ranks.kill()
        raise
    return {"variant": variant, "processes": n, "threads_per_rank": threads_per_rank,
            "compile_s": compile_s, "step_s": times, "ranks": per_rank,
            "peak_mib": max(r["peak_mib"] for r in per_rank),
            "peak_reset": all(r["peak_reset"] for r in per_rank),
            "losses": per_rank[0]["losses"]}


def perf_counter_steps(step, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


#: the 1-process result of each case, for the 2-process row's ratios (1proc runs first)
ONE_PROCESS: dict[str, dict[str, Any]] = {}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformer_fsdp_step(benchmark, settings, case, variant):
    if settings.device != "cpu":
        pytest.skip("the two-process variant runs on CPU/gloo")
    if not Path("/proc/self/status").is_file():
        pytest.skip("peak memory per rank reads /proc/self/status (Linux)")
    rounds = settings.rounds_for("model")

    def timed(step, n):
        benchmark.pedantic(step, rounds=n, warmup_rounds=1, iterations=1)
        return list(benchmark.stats.stats.data) if benchmark.stats else []

    result = measure(case, variant, rounds, 1, timed)
    benchmark.group = f"{WORKLOAD} {case.shape} {dtype_name(case.dtype)}"
    info = benchmark.extra_info
    info.update(workload=WORKLOAD, variant=variant, shape=case.shape,
                dtype=dtype_name(case.dtype), device="cpu", compile_s=round(result["compile_s"], 4),
                peak_mib=round(result["peak_mib"], 1),
                peak_per_rank_mib=[round(r["peak_mib"], 1) for r in result["ranks"]],
                peak_reset=result["peak_reset"], threads_per_rank=result["threads_per_rank"],
                items=case.batch * case.seq, item_unit="tokens", losses=result["losses"],
                aa_rewrites=result["ranks"][0]["aa_rewrites"])
    if variant == "1proc":
        ONE_PROCESS[case.id] = result
    elif case.id in ONE_PROCESS:
        one = ONE_PROCESS[case.id]
        info["peak_vs_1proc"] = round(result["peak_mib"] / one["peak_mib"], 3)
        info["speed_vs_1proc"] = round(statistics.median(one["step_s"])
                                       / statistics.median(result["step_s"]), 3)
        # the same training on both: the losses of the ranks' global batch agree
        assert result["losses"] == pytest.approx(one["losses"], rel=1e-4)


def compare(one: dict[str, Any], two: dict[str, Any]) -> dict[str, float]:
    return {"speed_ratio": statistics.median(one["step_s"]) / statistics.median(two["step_s"]),
            "peak_ratio": two["peak_mib"] / one["peak_mib"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.test_distributed",
        description="The reference transformer's FSDP2 training step on 1 and on 2 CPU/gloo "
                    "processes (same global batch): step time ratio and peak memory per rank.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small case (under a minute)")
    parser.add_argument("--model", choices=("reference", "umup"), default="reference",
                        help="the reference or the u-μP transformer")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="torch threads of every training process")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads_per_rank < 1:
        parser.error("--rounds and --threads-per-rank must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    case = dataclasses.replace(distributed_cases(args.quick, "cpu")[0], model=args.model)
    results = {}
    for variant in VARIANTS:
        results[variant] = r = measure(case, variant, args.rounds, args.threads_per_rank)
        print(f"{variant}: {r['processes']} x {r['threads_per_rank']} threads, step "
              f"{1e3 * statistics.median(r['step_s']):.0f} ms (median of {args.rounds}), peak "
              f"per rank {', '.join(str(round(x['peak_mib'])) for x in r['ranks'])} MiB, "
              f"compile step {r['compile_s']:.1f} s", flush=True)
    ratios = compare(results["1proc"], results["2proc"])
    ok = ratios["peak_ratio"] <= MEMORY_BAR
    print(f"{case.shape}: 2 processes vs 1: speed {ratios['speed_ratio']:.2f}x, peak per rank "
          f"{ratios['peak_ratio']:.2f}x of one process (bar <= {MEMORY_BAR}: "
          f"{'met' if ok else 'NOT met'}); load average {os.getloadavg()[0]:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"case": case.shape, "ratios": ratios,
                                              "load_average": os.getloadavg(),
                                              "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
