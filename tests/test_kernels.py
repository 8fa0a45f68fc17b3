"""Sparse kernels: the dispatch rule against a table, and every kernel against the masked-dense path
(forward, spikes, input/weight/bias gradients) within fp32 tolerance, layer by layer and end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndsnn_cli.kernels import DENSE, KERNELS, SPARSE_KERNEL_MODES, available_kernels, choose
from ndsnn_cli.kernels.execution import SparseExecution
from ndsnn_cli.kernels.layout import build_layout
from ndsnn_cli.snn.neuron import mark_spikes, saving_spikes_as_bool
from ndsnn_cli.sparse.masks import Masks

KERNEL_NAMES = available_kernels()  # torch-sparse always; numba when installed
# fp32: the kernels sum in another order than oneDNN; differences stay below TOL x the largest |value|
TOL = 2e-5

NUMBA_CROSS = KERNELS["numba"].crossover_density


@pytest.mark.parametrize(("mode", "density", "device", "amp", "available", "expected"), [
    ("off", 0.01, "cpu", False, ("numba", "torch-sparse"), DENSE),
    ("auto", 0.01, "cpu", False, ("numba", "torch-sparse"), "numba"),
    ("auto", NUMBA_CROSS, "cpu", False, ("numba", "torch-sparse"), "numba"),
    ("auto", 0.5, "cpu", False, ("numba", "torch-sparse"), DENSE),           # above the crossover
    ("auto", 0.01, "cpu", False, ("torch-sparse",), DENSE),                  # fallback never auto
    ("auto", 0.01, "cpu", True, ("numba", "torch-sparse"), DENSE),           # bf16 autocast: dense
    ("auto", 0.01, "cuda", False, ("numba", "torch-sparse"), DENSE),         # no CUDA kernel
    ("on", 0.9, "cpu", False, ("numba", "torch-sparse"), "numba"),
    ("on", 0.01, "cpu", False, ("torch-sparse",), "torch-sparse"),           # fallback without numba
    ("on", 0.01, "cuda", False, ("numba", "torch-sparse"), DENSE),
    ("on", 0.01, "cpu", True, ("numba", "torch-sparse"), DENSE),
    ("on", 0.01, "cpu", False, (), DENSE),
])
def test_choose_follows_the_dispatch_table(mode, density, device, amp, available, expected) -> None:
    assert choose(mode, density, device, amp, available) == expected


def test_choose_rejects_an_unknown_mode() -> None:
    assert set(SPARSE_KERNEL_MODES) == {"auto", "on", "off"}
    with pytest.raises(ValueError, match="unknown sparse_kernels mode"):
        choose("fast", 0.1, "cpu", False, ())


def test_layout_lists_the_mask_positions_by_output_and_by_input_channel() -> None:
    mask = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    mask[0, 1, 2, 0] = mask[2, 0, 1, 1] = mask[2, 1, 0, 2] = True
    layout = build_layout(mask)
    assert layout.nnz == 3 and layout.rowptr.tolist() == [0, 1, 1, 3] and layout.colptr.tolist() == [0, 1, 3]
    assert list(zip(layout.tap_out, layout.tap_in, layout.tap_kh, layout.tap_kw, strict=True)) == [
        (0, 1, 2, 0), (2, 0, 1, 1), (2, 1, 0, 2)]
    assert layout.col_out.tolist() == [2, 0, 2]  # input channel 0: tap (2,0); channel 1: (0,1), (2,1)
    weight = torch.arange(54.0).reshape(3, 2, 3, 3)
    assert layout.values(weight).tolist() == [15.0, 40.0, 47.0]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual.float() - expected.float()).abs().max()) <= TOL * scale


def _masked_layer(layer: nn.Module, density: float, seed: int) -> Masks:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(layer.weight.shape, generator=generator) < density
    with torch.no_grad():
        layer.weight.mul_(mask)
    return Masks({"weight": layer.weight}, {"weight": mask})


def _run(layer: nn.Module, x: torch.Tensor, spikes: bool) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad()
    with saving_spikes_as_bool():
        out = layer(mark_spikes(x) if spikes else x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad)
    return out.detach(), x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()


CONVS = {  # (c_in, c_out, kernel, stride, padding, size)
    "3x3 s1 p1": (6, 8, 3, 1, 1, 9),
    "3x3 s2 p1": (6, 8, 3, 2, 1, 9),
    "3x3 s1 p0": (5, 4, 3, 1, 0, 7),
    "1x1 s2 p0": (6, 8, 1, 2, 0, 8),
}


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize(("memory_format", "spikes"), [(torch.channels_last, True), (torch.contiguous_format, False)])
def test_sparse_conv_matches_masked_dense(kernel, case, memory_format, spikes) -> None:
    c_in, c_out, k, stride, pad, size = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad).to(memory_format=torch.channels_last)
    masks = _masked_layer(conv, 0.3, 1)
    x = torch.rand(10, c_in, size, size)
    x = (x < 0.3).float() if spikes else x
    x = x.contiguous(memory_format=memory_format)
    dense = _run(conv, x, spikes)
    execution = SparseExecution(conv, masks, "on", "cpu", amp=False)
    execution.available = (kernel,)
    assert execution.rebuild() == {"weight": kernel}
    sparse = _run(conv, x, spikes)
    assert execution.layers["weight"].calls == 1
    for name, a, b in zip(("out", "grad_x", "grad_b"), sparse[:2] + sparse[3:], dense[:2] + dense[3:], strict=True):
        assert a.shape == b.shape, name
        _close(a, b)
    _close(sparse[2], dense[2] * masks.masks["weight"])       # weight gradient at the mask only
    assert not sparse[2][~masks.masks["weight"]].any()
    assert sparse[0].is_contiguous(memory_format=memory_format)
    execution.set_dense_weight_grad(True)                      # an update step: the dense gradient
    _close(_run(conv, x, spikes)[2], dense[2])
    execution.remove()
    assert "forward" not in conv.__dict__


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("spikes", [True, False])
def test_sparse_linear_matches_masked_dense(kernel, spikes) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    masks = _masked_layer(linear, 0.2, 2)
    x = torch.rand(16, 40)
    x = (x < 0.2).float() if spikes else x
    dense = _run(linear, x, spikes)
    execution = SparseExecution(linear, masks, "on", "cpu", amp=False)
    execution.available = (kernel,)
    execution.rebuild()
    sparse = _run(linear, x, spikes)
    for a, b in zip(sparse[:2] + sparse[3:], dense[:2] + dense[3:], strict=True):
        _close(a, b)
    _close(sparse[2], dense[2] * masks.masks["weight"])
    execution.set_dense_weight_grad(True)
    _close(_run(linear, x, spikes)[2], dense[2])


def test_autocast_falls_back_to_the_dense_forward() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    masks = _masked_layer(conv, 0.1, 0)
    execution = SparseExecution(conv, masks, "on", "cpu", amp=False)
    execution.rebuild()
    x = torch.rand(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16 and execution.layers["weight"].calls == 0
    assert SparseExecution(conv, masks, "on", "cpu", amp=True).rebuild() == {"weight": DENSE}
