"""pytest set-up of the benchmark harness (``pytest bench/``; ``python -m bench`` wraps it).

Options: ``--quick`` (small shapes, the CPU-friendly set), ``--device cpu|cuda`` (default: cuda
when available), ``--rounds N`` (override every workload's timed rounds).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from bench.harness import Settings, seed_all

# A run compiles the same module code for many variants x cases (eager/inductor/aa, forward
# and training, several shapes); past dynamo's default recompile limit (8 per code object) it
# would silently run the rest eagerly and the table would compare eager with eager.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
torch._dynamo.config.accumulated_cache_size_limit = max(
    torch._dynamo.config.accumulated_cache_size_limit, 4096)


def pytest_addoption(parser):
    group = parser.getgroup("aa-bench", "aa-compile benchmark harness")
    group.addoption(
        "--quick", action="store_true", default=False,
        help="small shapes only (tens of minutes for every workload on a 2-core CPU; select with -k)",
    )
    group.addoption(
        "--device", choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to benchmark on (default: cuda if available, else cpu)",
    )
    group.addoption(
        "--rounds", type=int, default=None,
        help="timed rounds per benchmark and repeat (default: per workload, see bench/harness.py)",
    )
    group.addoption(
        "--repeats", type=int, default=5,
        help="run every benchmark this many times, the variants of a case interleaved "
             "(eager, inductor, aa, eager, ...), so slow drift of the machine hits them alike; "
             "the reporter merges the repeats' rounds (default: 5)",
    )


def pytest_configure(config):
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: no CUDA device is available")
    rounds = config.getoption("--rounds")
    if rounds is not None and rounds < 1:
        raise pytest.UsageError("--rounds must be >= 1")
    if config.getoption("--repeats") < 1:
        raise pytest.UsageError("--repeats must be >= 1")


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    return Settings(
        quick=pytestconfig.getoption("--quick"),
        device=pytestconfig.getoption("--device"),
        rounds=pytestconfig.getoption("--rounds"),
    )


@pytest.fixture(scope="session", autouse=True)
def _fresh_session():
    """The run starts with an empty dynamo cache. Compiled variants then live for the whole
    session (see `bench.harness.build_once`), so repeats reuse them instead of recompiling."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed():
    seed_all(0)


def _cases(module, config):
    """The cases a workload file declares with ``CASES = <fn(quick, device) -> cases>``."""
    return module.CASES(config.getoption("--quick"), config.getoption("--device"))


@pytest.fixture(scope="module")
def case(case_id, request):
    return next(c for c in _cases(request.module, request.config) if c.id == case_id)


def pytest_generate_tests(metafunc):
    # Parametrized by id (a plain string keeps pytest-benchmark's JSON "params" readable).
    if "case_id" in metafunc.fixturenames:
        ids = [c.id for c in _cases(metafunc.module, metafunc.config)]
        metafunc.parametrize("case_id", ids, ids=ids, scope="module")
    if "repeat" in metafunc.fixturenames:
        n = metafunc.config.getoption("--repeats")
        metafunc.parametrize("repeat", range(n), ids=[f"r{i}" for i in range(n)])


def pytest_benchmark_generate_commit_info(config):
    """The commit, read from ``.git`` without starting git (whose ``describe --dirty`` would
    refresh the index under a lock while others may be using the checkout)."""
    from bench.report import git_commit

    return {"id": git_commit(), "dirty": None, "project": "aa-compile", "branch": None}


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info.pop("node", None)  # no host names in saved results


def pytest_collection_modifyitems(config, items):
    """Order: transformer workloads first (the headline numbers, and what survives a time
    limit: an interrupted run still reports what finished); within a workload and case, by
    repeat, then variant, so the variants' rounds interleave."""

    def key(item):
        spec = getattr(item, "callspec", None)
        params = spec.params if spec else {}
        indices = spec.indices if spec else {}
        return (
            0 if "test_transformer" in item.nodeid else 1,
            item.module.__name__,
            item.originalname,
            str(params.get("case_id", "")),
            params.get("repeat", 0),
            indices.get("variant", 0),
        )

    items.sort(key=key)
