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
# CI: the same examples every run and no failing-example database, so a red run reproduces
# with `CI=true pytest ...` and a green run means the same next time.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25,
    derandomize=True, database=None,
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


@pytest.fixture(scope="module")
def dtm_tiny():
    """A 3-layer random reference transformer (weights scaled up so pruning changes its
    greedy tokens) and six 4-token prompts: the DTM planner tests' model."""
    from aa_compile.models import Transformer, TransformerConfig

    torch.manual_seed(1)
    m = Transformer(TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2,
                                      d_ff=64, max_seq_len=64)).eval()
    m.reset_parameters(0.3)
    return m, torch.randint(0, 64, (6, 4))


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
