"""Shared test set-up: Triton runs in its interpreter when there is no GPU; hypothesis profiles."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25
)
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25,
    derandomize=True,
)
settings.load_profile("ci" if os.environ.get("CI") else "default")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (bit-stable reductions), then restore the count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no dynamo cache entries leak between tests."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
