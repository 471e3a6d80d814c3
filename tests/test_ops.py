"""Every registered aa:: op: opcheck (schema, fake impl, autograd) and bad inputs."""

import pytest
import torch

from aa_compile.ops import OPS

from .conftest import DEVICES


def _cases():
    return [(name, device) for name in OPS for device in DEVICES]


@pytest.mark.parametrize("name, device", _cases())
def test_opcheck(name, device):
    entry = OPS[name]
    samples = list(entry.samples(device))
    assert samples, f"{name} has no samples"
    for args, kwargs in samples:
        torch.library.opcheck(entry.op, args, kwargs)


def test_every_op_names_its_kernels():
    for entry in OPS.values():
        assert {"cpu", "reference"} <= set(entry.kernels), entry.name


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.arange(6).view(2, 3), None, 1e-6), "x must be float16/bfloat16/float32/float64"),
        ((torch.randn(2, 3), torch.randn(4), 1e-6), r"weight must have shape \(3,\)"),
        ((torch.randn(2, 3), torch.randn(3, 1), 1e-6), r"weight must have shape \(3,\)"),
        ((torch.randn(2, 3), torch.ones(3, dtype=torch.int32), 1e-6), "weight must be a float"),
        ((torch.randn(2, 0), None, 1e-6), "non-empty last dimension"),
        ((torch.tensor(1.0), None, 1e-6), "non-empty last dimension"),
    ],
)
def test_rms_norm_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.aa.rms_norm(*args)


def test_rms_norm_backward_checks_grad_shape():
    with pytest.raises(ValueError, match="grad shape"):
        torch.ops.aa.rms_norm_backward(torch.randn(2, 4), torch.randn(2, 3), None, 1e-6)
