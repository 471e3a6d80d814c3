"""Every registered aa:: op: opcheck (schema, fake impl, autograd), any memory layout of its
inputs, and bad inputs."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aa_compile.ops import OPS, registry

from .conftest import DEVICES
from .strategies import check_layout_invariance, op_calls


def _cases():
    return [(name, device) for name in OPS for device in DEVICES]


@pytest.mark.parametrize("name, device", _cases())
def test_opcheck(name, device):
    entry = OPS[name]
    samples = list(entry.samples(device))
    assert samples, f"{name} has no samples"
    for args, kwargs in samples:
        torch.library.opcheck(entry.op, args, kwargs)


def test_every_defined_op_is_registered():
    """An op the dispatcher knows in the aa namespace but that registered no samples would
    escape opcheck and `aa-compile info`."""
    assert set(registry.defined_ops()) == set(OPS)


def test_every_op_names_its_kernels():
    """Each kernel name is ``module:function`` and resolves to what torch.library runs."""
    for entry in OPS.values():
        assert entry.kernels, entry.name
        for device, name in entry.kernels.items():
            module, _, qualname = name.partition(":")
            assert module.startswith("aa_compile."), (entry.name, device, name)
            if device != "cuda":  # CUDA kernels load Triton on first use
                target = importlib.import_module(module)
                for part in qualname.split("."):
                    target = getattr(target, part)
                assert callable(target), (entry.name, device, name)


_SAMPLES: dict[tuple[str, str], list] = {}


def _samples_of(name: str, device: str) -> list:
    if (name, device) not in _SAMPLES:
        _SAMPLES[name, device] = list(OPS[name].samples(device))
    return _SAMPLES[name, device]


@pytest.mark.parametrize("name, device", _cases())
@settings(max_examples=40)
@given(data=st.data())
def test_every_op_any_layout(name, device, data):
    """Every tensor argument of every op, as a strided / transposed / permuted / expanded view
    with a storage offset, gives what the same values give contiguous (outputs, gradients and
    errors alike)."""
    call = data.draw(op_calls(_samples_of(name, device)), label="call")
    check_layout_invariance(OPS[name].op, call, name)
