"""kernels/triton_target.py: the GPU a Triton launch is planned for, and its shared memory."""

from __future__ import annotations

import threading

import pytest
import torch

from aa_compile.kernels import triton_target


@pytest.mark.parametrize("cc, limit", [
    ((9, 0), 232448),   # H100 / H200: 227 KB
    ((8, 9), 101376),   # L4, L40S, RTX 4090: 99 KB
    ((8, 0), 166912),   # A100: 163 KB
    ((8, 6), 101376),   # RTX 30xx: 99 KB
    ((7, 5), 65536),    # T4: 64 KB
])
def test_shared_memory_limit_of_known_gpus(cc, limit):
    """The opt-in per-block maxima of the CUDA programming guide's table."""
    assert triton_target.shared_memory_limit(cc) == limit


def test_unknown_minor_takes_the_smallest_of_its_major():
    assert triton_target.shared_memory_limit((8, 8)) == 101376  # min of 8.0 / 8.6 / 8.7 / 8.9
    assert triton_target.shared_memory_limit((9, 9)) == 232448


def test_unknown_major_takes_the_smallest_known():
    assert triton_target.shared_memory_limit((42, 0)) == 65536


def test_no_gpu_outside_assume_on_cpu():
    cpu = torch.device("cpu")
    assert triton_target.capability(cpu) is None
    assert not triton_target.is_gpu_launch(cpu)


def test_assume_plans_for_the_given_gpu_and_restores():
    cpu = torch.device("cpu")
    with triton_target.assume((8, 9)):
        assert triton_target.capability(cpu) == (8, 9)
        assert triton_target.is_gpu_launch(cpu)
        with triton_target.assume((9, 0)):  # nests
            assert triton_target.capability(cpu) == (9, 0)
        assert triton_target.capability(cpu) == (8, 9)
    assert triton_target.capability(cpu) is None


def test_assume_restores_after_an_exception():
    with pytest.raises(KeyError), triton_target.assume((8, 0)):
        raise KeyError("boom")
    assert triton_target.capability(torch.device("cpu")) is None


def test_assume_is_per_thread():
    """A context variable: another thread does not see this thread's assumed GPU."""
    seen = []
    with triton_target.assume((8, 0)):
        t = threading.Thread(target=lambda: seen.append(
            triton_target.capability(torch.device("cpu"))))
        t.start()
        t.join()
    assert seen == [None]


@pytest.mark.parametrize("bad", [(9,), (9, 0, 0), ("9", 0), (9.0, 0), "90", 90, None, (True, 0)])
def test_assume_rejects_malformed_capabilities(bad):
    with pytest.raises(ValueError, match=r"\(major, minor\) ints"), triton_target.assume(bad):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capability_of_a_cuda_device_is_the_device_s():
    dev = torch.device("cuda")
    assert triton_target.capability(dev) == torch.cuda.get_device_capability(dev)
