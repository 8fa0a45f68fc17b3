"""Sparse kernels: the dispatch rule against a table, and every registered kernel against the masked-dense
path (forward, spikes, input/weight/bias gradients) within fp32 tolerance, layer by layer and end to end:
the registry's contract, which a new kernel (one class + one registry line: the toy kernel here) passes."""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli.kernels import DENSE, KERNELS, SPARSE_KERNEL_MODES, KernelInfo, available_kernels, choose
from ndsnn_cli.kernels.execution import SparseExecution, create_kernel
from ndsnn_cli.kernels.layout import build_layout
from ndsnn_cli.kernels.protocol import SparseKernel
from ndsnn_cli.snn.neuron import mark_spikes, saving_spikes_as_bool
from ndsnn_cli.sparse.masks import Masks

KERNEL_NAMES = available_kernels()  # torch-sparse always; numba when installed
# the contract runs over every registered kernel; one whose optional dependency is missing is skipped, by name
REGISTERED = [pytest.param(name, marks=pytest.mark.skipif(name not in KERNEL_NAMES, reason=f"{name}: "
                                                           f"{KERNELS[name].requires} not installed"))
              for name in KERNELS]
# fp32: the kernels sum in another order than oneDNN; differences stay below TOL x the largest |value|
TOL = 2e-5

NUMBA_CROSS = KERNELS["numba"].crossover_density


@pytest.fixture
def install():  # noqa: ANN201
    """`install(execution)`: its forwards swapped in until the test ends."""
    with contextlib.ExitStack() as stack:
        yield stack.enter_context


@pytest.mark.parametrize(("mode", "density", "device", "available", "expected"), [
    ("off", 0.01, "cpu", ("numba", "torch-sparse"), DENSE),
    ("auto", 0.01, "cpu", ("numba", "torch-sparse"), "numba"),
    ("auto", NUMBA_CROSS, "cpu", ("numba", "torch-sparse"), "numba"),
    ("auto", 0.5, "cpu", ("numba", "torch-sparse"), DENSE),           # above the crossover
    ("auto", 0.01, "cpu", ("torch-sparse",), DENSE),                  # fallback never auto
    ("auto", 0.01, "cuda", ("numba", "torch-sparse"), DENSE),         # no CUDA kernel
    ("on", 0.9, "cpu", ("numba", "torch-sparse"), "numba"),
    ("on", 0.01, "cpu", ("torch-sparse",), "torch-sparse"),           # fallback without numba
    ("on", 0.01, "cuda", ("numba", "torch-sparse"), DENSE),
    ("on", 0.01, "cpu", (), DENSE),
])
def test_choose_follows_the_dispatch_table(mode, density, device, available, expected) -> None:
    assert choose(mode, density, device, available) == expected


def test_choose_rejects_an_unknown_mode() -> None:
    assert set(SPARSE_KERNEL_MODES) == {"auto", "calibrate", "on", "off"}
    with pytest.raises(ValueError, match="unknown sparse_kernels mode"):
        choose("fast", 0.1, "cpu", ())


def test_layout_lists_the_mask_positions_by_output_and_by_input_channel() -> None:
    mask = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    mask[0, 1, 2, 0] = mask[2, 0, 1, 1] = mask[2, 1, 0, 2] = True
    layout = build_layout(mask)
    assert layout.nnz == 3 and layout.rowptr.tolist() == [0, 1, 1, 3] and layout.colptr.tolist() == [0, 1, 3]
    taps = (layout.tap_out, layout.tap_in, layout.tap_kh, layout.tap_kw)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int32 for t in taps)
    assert list(zip(*(t.tolist() for t in taps), strict=True)) == [(0, 1, 2, 0), (2, 0, 1, 1), (2, 1, 0, 2)]
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
    "1x1 s1 p0": (6, 8, 1, 1, 0, 5),
    # 16 channels, not fewer: torch 2.14's own channels-last CPU backward of a 1x1 stride-2 conv with
    # 6 -> 8 channels (the masked-dense reference here) gives wrong weight gradients and corrupts the heap.
    "1x1 s2 p0": (16, 16, 1, 2, 0, 8),
    # maps at least ROW_KERNEL_MIN_WIDTH wide: numba's row kernels (the forward; the input gradient at stride 1)
    "3x3 s1 p1 wide": (6, 8, 3, 1, 1, 18),
    "3x3 s2 p1 wide": (6, 8, 3, 2, 1, 33),
}


class _Counting:
    """A kernel whose method calls are counted: the test sees the kernel itself ran, not a dense fallback."""

    def __init__(self, kernel: SparseKernel) -> None:
        self.kernel, self.calls = kernel, collections.Counter()

    def __getattr__(self, name: str):  # noqa: ANN204
        method = getattr(self.kernel, name)

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls[name] += 1
            return method(*args, **kwargs)
        return counted


def _counting(execution: SparseExecution) -> _Counting:
    layer = execution.layers["weight"]
    layer.kernel = _Counting(layer.kernel)
    return layer.kernel


def check_conv_contract(kernel: str, case: str, memory_format: torch.memory_format, spikes: bool) -> None:
    """The contract of a registered kernel on one conv: forward, input, weight (sparse and dense) and bias
    gradients equal the masked-dense path's within TOL, computed by the kernel's own methods, in the
    input's memory format; the module's forward restored after the block."""
    c_in, c_out, k, stride, pad, size = CONVS[case]
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad).to(memory_format=torch.channels_last)
    masks = _masked_layer(conv, 0.3, 1)
    x = torch.rand(10, c_in, size, size)
    x = (x < 0.3).float() if spikes else x
    x = x.contiguous(memory_format=memory_format)
    dense = _run(conv, x, spikes)
    with SparseExecution(conv, masks, "on", "cpu") as execution:
        execution.available = (kernel,)
        assert execution.rebuild() == {"weight": kernel}
        assert isinstance(execution.layers["weight"].kernel, SparseKernel)
        counts = _counting(execution)
        sparse = _run(conv, x, spikes)
        assert execution.layers["weight"].calls == 1
        assert counts.calls["forward"] == counts.calls["input_grad"] == counts.calls["weight_grad"] == 1
        for name, a, b in zip(("out", "grad_x", "grad_b"), sparse[:2] + sparse[3:], dense[:2] + dense[3:],
                              strict=True):
            assert a.shape == b.shape, name
            _close(a, b)
        _close(sparse[2], dense[2] * masks.masks["weight"])       # weight gradient at the mask only
        assert not sparse[2][~masks.masks["weight"]].any()
        assert sparse[0].is_contiguous(memory_format=memory_format)
        execution.set_dense_weight_grad(True)                      # an update step: the dense gradient
        _close(_run(conv, x, spikes)[2], dense[2])
        assert counts.calls["forward"] == 2
    assert "forward" not in conv.__dict__


def check_linear_contract(kernel: str, spikes: bool) -> None:
    """The contract on a linear layer ([N, F] as [F, 1, 1, N] maps)."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    masks = _masked_layer(linear, 0.2, 2)
    x = torch.rand(16, 40)
    x = (x < 0.2).float() if spikes else x
    dense = _run(linear, x, spikes)
    with SparseExecution(linear, masks, "on", "cpu") as execution:
        execution.available = (kernel,)
        assert execution.rebuild() == {"weight": kernel}
        counts = _counting(execution)
        sparse = _run(linear, x, spikes)
        # the kernel ran (a silent dense fallback computes the same numbers and would pass the rest)
        assert execution.layers["weight"].calls == 1
        assert counts.calls["forward"] == counts.calls["input_grad"] == counts.calls["weight_grad"] == 1
        for a, b in zip(sparse[:2] + sparse[3:], dense[:2] + dense[3:], strict=True):
            _close(a, b)
        _close(sparse[2], dense[2] * masks.masks["weight"])
        execution.set_dense_weight_grad(True)
        _close(_run(linear, x, spikes)[2], dense[2])
        assert counts.calls["forward"] == 2
    assert "forward" not in linear.__dict__


@pytest.mark.parametrize("kernel", REGISTERED)
@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize(("memory_format", "spikes"), [(torch.channels_last, True), (torch.contiguous_format, False)])
def test_sparse_conv_matches_masked_dense(kernel, case, memory_format, spikes) -> None:
    check_conv_contract(kernel, case, memory_format, spikes)


@pytest.mark.parametrize("kernel", REGISTERED)
@pytest.mark.parametrize("spikes", [True, False])
def test_sparse_linear_matches_masked_dense(kernel, spikes) -> None:
    check_linear_contract(kernel, spikes)


@pytest.mark.parametrize(("kernel_size", "pad"), [((3, 3), 1), ((5, 3), 2), ((1, 1), 0), ((3, 3), 0)])
def test_the_per_tap_dense_weight_gradient_equals_torchs(kernel_size: tuple[int, int], pad: int) -> None:
    """The update steps' dense weight gradient of a stride-1 conv, one GEMM per tap on the batch-last maps,
    equals torch's `conv2d_weight` on the same real numbers (fp32 sums in another order)."""
    from ndsnn_cli.kernels.execution import _tap_weight_grad

    generator = torch.Generator().manual_seed(4)
    x_bl = (torch.rand(6, 9, 8, 10, generator=generator) < 0.3).to(torch.uint8)       # (Ci, H, W, N) spikes
    height_out, width_out = 9 + 2 * pad - kernel_size[0] + 1, 8 + 2 * pad - kernel_size[1] + 1
    gy = torch.randn(7, height_out, width_out, 10, generator=generator)                 # (Co, Ho, Wo, N)
    expected = torch.nn.grad.conv2d_weight(x_bl.float().permute(3, 0, 1, 2).contiguous(), (7, 6, *kernel_size),
                                           gy.permute(3, 0, 1, 2).contiguous(), padding=pad)
    torch.testing.assert_close(_tap_weight_grad(gy, x_bl, kernel_size, pad), expected, rtol=1e-5, atol=1e-5)


class ToyKernel:
    """A whole kernel in a few lines (the weight scattered to dense, torch's convs on the batch-last maps):
    registered by one `KernelInfo` line below, it runs through the contract like the shipped ones."""

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        dst.copy_(src)

    def forward(self, x, values, bias, layout, stride: int, pad: int, out) -> None:  # noqa: ANN001
        weight = values.new_zeros(layout.shape)
        weight[_taps(layout)] = values
        out.copy_(F.conv2d(x.float().permute(3, 0, 1, 2), weight, bias, stride, pad).permute(1, 2, 3, 0))

    def input_grad(self, grad_out, values, layout, stride: int, pad: int, grad_in) -> None:  # noqa: ANN001
        weight = values.new_zeros(layout.shape)
        weight[_taps(layout)] = values
        grad = torch.nn.grad.conv2d_input((grad_in.shape[3], *grad_in.shape[:3]), weight,
                                          grad_out.permute(3, 0, 1, 2), stride, pad)
        grad_in.copy_(grad.permute(1, 2, 3, 0))

    def weight_grad(self, grad_out, x, layout, stride: int, pad: int) -> torch.Tensor:  # noqa: ANN001
        grad = torch.nn.grad.conv2d_weight(x.float().permute(3, 0, 1, 2), layout.shape,
                                           grad_out.permute(3, 0, 1, 2), stride, pad)
        return grad[_taps(layout)].contiguous()


def _taps(layout) -> tuple[torch.Tensor, ...]:  # noqa: ANN001
    """The taps' 4-d coordinates (a linear layer's index has two)."""
    return (layout.tap_out.long(), layout.tap_in.long(), layout.tap_kh.long(), layout.tap_kw.long())


def test_a_new_kernel_is_one_class_and_one_registry_line(monkeypatch) -> None:
    monkeypatch.setitem(KERNELS, "toy", KernelInfo("toy", f"{__name__}:ToyKernel", ("cpu",), None, 0.0, False))
    assert "toy" in available_kernels() and isinstance(create_kernel("toy"), SparseKernel)
    assert choose("on", 0.1, "cpu", ("toy",)) == "toy" and choose("on", 0.1, "cuda", ("toy",)) == DENSE
    for case in CONVS:
        check_conv_contract("toy", case, torch.channels_last, True)
    check_linear_contract("toy", False)


def test_an_incomplete_or_unknown_kernel_is_refused(monkeypatch) -> None:
    with pytest.raises(ValueError, match="unknown sparse kernel 'nope'"):
        create_kernel("nope")
    monkeypatch.setitem(KERNELS, "half", KernelInfo("half", "collections:OrderedDict", ("cpu",), None, 0.0, False))
    with pytest.raises(TypeError, match="lacks a SparseKernel method"):
        create_kernel("half")


def test_the_forwards_are_restored_when_the_block_raises() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with pytest.raises(RuntimeError, match="boom"), SparseExecution(conv, _masked_layer(conv, 0.5, 0), "on", "cpu"):
        assert "forward" in conv.__dict__
        raise RuntimeError("boom")
    assert "forward" not in conv.__dict__


def test_a_run_that_raises_leaves_no_patched_layer(tiny_recipe, tmp_path, monkeypatch) -> None:
    """The trainer swaps the forwards for the run only: a run that fails mid-epoch gives them back."""
    import ndsnn_cli.trainer as trainer
    from ndsnn_cli.train import train

    models, build = [], trainer.build_training_model
    monkeypatch.setattr(trainer, "build_training_model", lambda *args: models.append(build(*args)) or models[-1])

    class Fails(trainer.TrainCallbacks):
        def on_step(self, step: int, epoch: int, loss: float, accuracy: float) -> None:
            assert any("forward" in m.__dict__ for m in models[0].modules())  # patched while training
            raise RuntimeError("interrupted")

    recipe = tiny_recipe(sparsity={"method": "static", "final": 0.9}, train={"sparse_kernels": "on"})
    with pytest.raises(RuntimeError, match="interrupted"):
        train(recipe, tmp_path / "run", callbacks=Fails())
    assert models and not [name for name, m in models[0].named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_bf16_autocast_runs_the_kernel_and_matches_the_dense_autocast_path(kernel, install) -> None:
    """Under CPU bf16 autocast the kernel computes in fp32 and returns bf16, as autocast's conv does:
    output and gradients equal the dense autocast path's within bf16 rounding (oneDNN rounds the
    weights to bf16 too; the kernel does not), and the gradients reach fp32 parameters."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1).to(memory_format=torch.channels_last)
    masks = _masked_layer(conv, 0.3, 4)
    x = (torch.rand(10, 8, 9, 9) < 0.3).float().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(10, 12, 9, 9)

    def run() -> tuple[torch.Tensor, ...]:
        conv.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), saving_spikes_as_bool():
            out = conv(mark_spikes(inputs.to(torch.bfloat16)))
        out.backward(grad.to(out.dtype))
        return out.detach(), inputs.grad, conv.weight.grad.clone(), conv.bias.grad.clone()

    dense = run()
    execution = install(SparseExecution(conv, masks, "on", "cpu"))
    execution.available = (kernel,)
    execution.rebuild()
    sparse = run()
    assert execution.layers["weight"].calls == 1
    assert sparse[0].dtype == torch.bfloat16 and sparse[1].dtype == torch.float32
    for name, a, b in zip(("out", "grad_x", "grad_b"), sparse[:2] + sparse[3:], dense[:2] + dense[3:], strict=True):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max(), name
    expected_w = dense[2] * masks.masks["weight"]
    assert (sparse[2] - expected_w).abs().max() <= 2e-2 * expected_w.abs().max()
    assert not sparse[2][~masks.masks["weight"]].any()


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_a_forward_without_autograd_runs_in_chunks_with_the_same_numbers(kernel, layer, monkeypatch, install) -> None:
    """Evaluation (no autograd) runs the batch in chunks written into the result: bit-identical to the
    training forward (each output sums its taps in the same order), in the input's memory format."""
    import ndsnn_cli.kernels.execution as execution_module

    torch.manual_seed(0)
    module = nn.Conv2d(6, 16, 3, stride=2, padding=1) if layer == "conv" else nn.Linear(30, 7)
    masks = _masked_layer(module, 0.3, 5)
    x = torch.rand(10, 6, 9, 9).contiguous(memory_format=torch.channels_last) if layer == "conv" else torch.rand(10, 30)
    execution = install(SparseExecution(module, masks, "on", "cpu"))
    execution.available = (kernel,)
    execution.rebuild()
    trained = module(x)
    monkeypatch.setattr(execution_module, "INFERENCE_CHUNK", 3)  # 10 samples: chunks of 3, 3, 3, 1
    with torch.no_grad():
        evaluated = module(x)
    assert torch.equal(evaluated, trained.detach()) and execution.layers["weight"].calls == 2
    assert evaluated.stride() == trained.stride()


@pytest.mark.parametrize("path", [DENSE, *KERNEL_NAMES])
def test_a_layer_is_clocked_forward_and_backward_on_its_path(path, monkeypatch, install) -> None:
    """Training calls add their forward and backward time to the path they took: a sparse kernel's
    autograd Function clocks both directions; on the dense path, clocks on the output and the weight
    time the layer's backward node (started when the output's gradient arrives, stopped at the weight's).
    Evaluation is not clocked."""
    import ndsnn_cli.kernels.execution as execution_module

    conv = nn.Conv2d(3, 4, 3, padding=1)
    execution = install(SparseExecution(conv, _masked_layer(conv, 0.5, 0), "off" if path == DENSE else "on",
                                        "cpu"))
    execution.available = () if path == DENSE else (path,)
    execution.rebuild()
    layer = execution.layers["weight"]
    ticks = iter(range(100))
    monkeypatch.setattr(execution_module.time, "perf_counter", lambda: float(next(ticks)))
    clocked, other = ("dense_s", "sparse_s") if path == DENSE else ("sparse_s", "dense_s")
    out = conv(torch.rand(2, 3, 5, 5))
    assert getattr(layer, clocked) == 1.0                            # forward: ticks 0 -> 1
    out.sum().backward()
    assert getattr(layer, clocked) == 2.0 and getattr(layer, other) == 0.0   # backward: ticks 2 -> 3
    assert layer._clock == 0.0 and conv.weight.grad is not None
    with torch.no_grad():
        conv(torch.rand(2, 3, 5, 5))
    assert getattr(layer, clocked) == 2.0 and layer.calls == (0 if path == DENSE else 2)


@pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "linear", "strided"])
def test_layout_transposes_round_trip_bit_exactly(layout) -> None:
    """to_batch_last / from_batch_last (numba's contiguous fast path for NHWC, NCHW and [N, F]; the
    strided fallback for anything else) give exactly `x.permute(1, 2, 3, 0)` and back, spikes as uint8."""
    from ndsnn_cli.kernels.execution import from_batch_last, to_batch_last

    kernel = create_kernel("numba")
    generator = torch.Generator().manual_seed(3)
    if layout == "linear":
        x = torch.randn(37, 19, generator=generator)
        expected = x.t().reshape(19, 1, 1, 37)
    else:
        x = torch.randn(37, 5, 6, 7, generator=generator)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":
            x = torch.randn(37, 5, 12, 7, generator=generator)[:, :, ::2]  # neither NCHW nor NHWC contiguous
        expected = x.permute(1, 2, 3, 0)
    y = to_batch_last(x, kernel)
    assert y.is_contiguous() and torch.equal(y, expected)
    back = from_batch_last(y, x, kernel)
    assert torch.equal(back, x) and back.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    with saving_spikes_as_bool():
        spikes = mark_spikes((x > 0).float())
        spikes_bl = to_batch_last(spikes, kernel)
    assert spikes_bl.dtype == torch.uint8 and torch.equal(spikes_bl, (expected > 0).to(torch.uint8))


@pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
@pytest.mark.parametrize(("kernel_size", "stride", "pad", "size", "spikes"), [
    (3, 1, 1, 20, True), (3, 1, 1, 20, False), (3, 2, 1, 33, True), (3, 1, 0, 18, False), (5, 1, 2, 17, False),
    (1, 1, 0, 16, True)])
def test_the_row_kernels_equal_the_plane_kernels_bit_for_bit(kernel_size, stride, pad, size, spikes) -> None:
    """Four taps per pass over an output row add each element's taps in the same order with the same
    roundings as one tap per pass over the plane: forward and (stride 1) input gradient identical, on a real
    layout, spike (uint8) and float inputs, groups of four and the remainders, edge columns included; the
    weight gradient, summed row by row, equal within fp32 rounding."""
    from ndsnn_cli.kernels import numba_cpu

    generator = torch.Generator().manual_seed(5)
    c_in, c_out, batch = 7, 9, 13
    mask = torch.rand(c_out, c_in, kernel_size, kernel_size, generator=generator) < 0.45
    layout = build_layout(mask)
    values = torch.randn(layout.nnz, generator=generator)
    x = torch.rand(c_in, size, size, batch, generator=generator)
    x = (x < 0.3).to(torch.uint8) if spikes else x * 2 - 1
    size_out = (size + 2 * pad - kernel_size) // stride + 1
    assert size_out >= numba_cpu.ROW_KERNEL_MIN_WIDTH
    bias = torch.randn(c_out, generator=generator)
    taps = [t.numpy() for t in (layout.rowptr, layout.tap_in, layout.tap_kh, layout.tap_kw)]
    by_plane, by_row = (torch.empty(c_out, size_out, size_out, batch) for _ in range(2))
    numba_cpu.conv_forward(x.numpy(), by_plane.numpy(), bias.numpy(), *taps, values.numpy(), stride, pad)
    numba_cpu.conv_forward_rows(x.numpy(), by_row.numpy(), bias.numpy(), *taps, values.numpy(), stride, pad)
    assert torch.equal(by_row, by_plane)
    expected = F.conv2d(x.permute(3, 0, 1, 2).float(), torch.zeros(mask.shape).index_put_(
        torch.nonzero(mask, as_tuple=True), values), bias, stride, pad).permute(1, 2, 3, 0)
    _close(by_row, expected)
    grad_out = torch.randn(c_out, size_out, size_out, batch, generator=generator)
    grads = torch.empty(layout.nnz), torch.empty(layout.nnz)
    numba_cpu.conv_weight_grad(grad_out.numpy(), x.numpy(), grads[0].numpy(), *taps, stride, pad)
    numba_cpu.conv_weight_grad_rows(grad_out.numpy(), x.numpy(), grads[1].numpy(), *taps, stride, pad)
    _close(grads[1], grads[0])  # summed in another order (row by row)
    assert grads[1].abs().min() > 0
    if stride == 1:
        columns = [t.numpy() for t in (layout.colptr, layout.col_out, layout.col_kh, layout.col_kw)]
        col_values = values[layout.by_input].contiguous().numpy()
        by_plane, by_row = (torch.empty(c_in, size, size, batch) for _ in range(2))
        numba_cpu.conv_input_grad(grad_out.numpy(), by_plane.numpy(), *columns, col_values, 1, pad)
        numba_cpu.conv_input_grad_rows(grad_out.numpy(), by_row.numpy(), *columns, col_values, pad)
        assert torch.equal(by_row, by_plane) and by_row.abs().sum() > 0


NUMBA_ENTRY_POINTS = {  # each one, the first numba call of a fresh process
    "sparse-kernel": "from ndsnn_cli.kernels.execution import create_kernel, to_batch_last\n"
                     "to_batch_last(torch.rand(4, 3, 5, 5), create_kernel('numba'))",
    "bn-lif-channels-last": "from ndsnn_cli.kernels.bn_lif import after_batch_norm, channels_last_fits\n"
                            "from ndsnn_cli.snn.neuron import LIF\n"
                            "y = torch.rand(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)\n"
                            "y.requires_grad_(True)\n"
                            "bn, lif = torch.nn.BatchNorm2d(3), LIF(2)\n"
                            "assert channels_last_fits(lif, y, bn, None)\n"
                            "after_batch_norm(lif, y, bn).sum().backward()",
    "bn-lif-batch-last": "from ndsnn_cli.kernels.bn_lif import batch_norm_lif\n"
                         "from ndsnn_cli.snn.neuron import LIF\n"
                         "batch_norm_lif(torch.rand(3, 5, 5, 4), torch.nn.BatchNorm2d(3), LIF(2), impl='numba')",
    "spike-max-pool": "from ndsnn_cli.kernels.batch_last import _SpikeMaxPool2x2\n"
                      "_SpikeMaxPool2x2.apply((torch.rand(3, 4, 4, 4) > 0.5).float(), 'numba')",
}


@pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
@pytest.mark.parametrize("entry", NUMBA_ENTRY_POINTS)
def test_the_first_numba_call_keeps_torchs_thread_count(entry: str) -> None:
    """A fresh process set to 1 torch thread still has 1 after its first numba kernel starts numba's thread
    pool (which shares libgomp with torch and used to raise torch to every core: a run set to 1 thread then
    trained its first steps on 1 and the rest on all, and differed in bits from one started later)."""
    import subprocess
    import sys

    code = f"import torch; torch.set_num_threads(1)\n{NUMBA_ENTRY_POINTS[entry]}\nprint(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split()[-1] == "1"


def _spiking_model_step(model: nn.Module, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                          dict[str, torch.Tensor]]:
    """Spikes of every LIF layer, the logits, and every parameter's gradient of one training step."""
    spikes: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, _i, out, name=name: spikes.__setitem__(name, out.detach().clone()))
             for name, m in model.named_modules() if type(m).__name__ == "LIF"]
    model.zero_grad()
    logits = model(images)
    logits.square().mean().backward()
    for hook in hooks:
        hook.remove()
    return spikes, logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_spiking_cnn_spikes_and_gradients_match_layer_by_layer(kernel, install) -> None:
    from ndsnn_cli.snn.models import NeuronConfig, create_model
    from ndsnn_cli.sparse.masks import random_mask, sparse_parameter_names

    torch.manual_seed(0)
    model = create_model("scnn", num_classes=10, in_channels=1, image_size=16, neuron=NeuronConfig(timesteps=3))
    model = model.to(memory_format=torch.channels_last).train()
    params = dict(model.named_parameters())
    names = sparse_parameter_names(model)
    generator = torch.Generator().manual_seed(0)
    masks = Masks({n: params[n] for n in names},
                  {n: random_mask(params[n].shape, params[n].numel() // 4, generator) for n in names})
    masks.apply()
    images = torch.rand(8, 1, 16, 16)
    dense = _spiking_model_step(model, images)
    execution = install(SparseExecution(model, masks, "on", "cpu"))
    execution.available = (kernel,)
    assert set(execution.rebuild().values()) == {kernel}
    sparse = _spiking_model_step(model, images)
    assert all(layer.calls == 1 for layer in execution.layers.values())
    assert dense[0].keys() == sparse[0].keys() and len(dense[0]) == 3
    for name in dense[0]:
        assert torch.equal(dense[0][name], sparse[0][name]), name   # spikes: identical
    _close(sparse[1], dense[1])
    for name, grad in dense[2].items():
        expected = grad * masks.masks[name] if name in masks.masks else grad
        _close(sparse[2][name], expected)


@pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
@pytest.mark.parametrize(("layout", "weight_tol"), [("per-layer", 1e-6), ("batch-last", 1e-5)])
def test_the_first_update_on_sparse_kernels_equals_the_dense_paths_to_rounding(tiny_recipe, tmp_path, layout,
                                                                              weight_tol) -> None:
    """Two steps, the second an NDSNN update that ranks the dense gradient: from the same start, the kernel
    path and the dense path end with the same masks (ties within fp32 rounding aside) and the same weights
    within `weight_tol` (a weight gradient 1.3x too large on the kernel path moves them by 3.5e-5 to 1.5e-4).
    Per-layer: the kernels' sums are the dense ones, measured 1.5e-8 (also under ATEN_CPU_CAPABILITY=default).
    Batch-last: BatchNorm sums over [C, H, W, N] in another order, so an H within rounding of the threshold
    may fire on one path only: on this seed one spike of 802816 in step 1 (body.3), which moves the next
    linear layer's weights by 2.8e-6. Before any update can amplify a rounding difference."""
    from ndsnn_cli.checkpoint import load_checkpoint
    from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics
    from ndsnn_cli.train import train

    sparsity = {"method": "ndsnn", "initial": 0.5, "final": 0.9, "update_every_steps": 2,
                "ramp_end_epoch": 1.0, "update_end_epoch": 1.0}
    ends = {}
    for mode in ("off", "on"):
        recipe = tiny_recipe(model={"arch": "scnn"}, data={"train_limit": 128}, sparsity=sparsity,
                             train={"epochs": 1, "sparse_kernels": mode, "sparse_layout": layout})
        summary = train(recipe, tmp_path / mode)
        updates = [r["step"] for r in read_metrics(tmp_path / mode) if r["kind"] == "mask_update"]
        assert summary["steps"] == 2 and updates == [2]
        ends[mode] = load_checkpoint(tmp_path / mode / RUN_CHECKPOINT)
    assert summary["sparse_kernels"]["sparse_layers"] == 4  # the "on" run trained every sparse layer on numba
    off, on = ends["off"], ends["on"]
    for name, mask in off.masks.items():
        assert int((mask != on.masks[name]).sum()) <= 0.001 * int(mask.sum()) + 2, name
        both = mask & on.masks[name]
        assert (off.model_state[name] - on.model_state[name])[both].abs().max() <= weight_tol, name
    assert summary["sparse_kernels"]["layout"] == layout
    for name, tensor in off.model_state.items():  # biases, BN affine and running statistics (~1, sums of 16k)
        if name not in off.masks and tensor.is_floating_point():
            assert ((tensor - on.model_state[name]).abs() <= 1e-6 + 1e-5 * tensor.abs()).all(), name


@pytest.mark.skipif("numba" not in KERNEL_NAMES, reason="numba not installed")
def test_ndsnn_run_on_sparse_kernels_matches_the_dense_run(tiny_recipe, tmp_path) -> None:
    """The same masks after the updates (drop-and-grow ranks the dense gradient at update steps; near-ties
    aside) and loss curves within 1e-4, with the numba kernel on every sparse layer."""
    from ndsnn_cli.checkpoint import load_checkpoint
    from ndsnn_cli.rundir import RUN_CHECKPOINT, read_metrics
    from ndsnn_cli.train import train

    # updates after steps 2 and 4 (dense weight gradients there), sampled weight gradients at 1, 3, 5-8
    sparsity = {"method": "ndsnn", "initial": 0.5, "final": 0.9, "update_every_steps": 2,
                "ramp_end_epoch": 1.0, "update_end_epoch": 1.5}
    runs = {}
    for mode in ("off", "on"):
        recipe = tiny_recipe(model={"arch": "scnn"}, sparsity=sparsity, train={"sparse_kernels": mode})
        summary = train(recipe, tmp_path / mode)
        runs[mode] = (summary, read_metrics(tmp_path / mode), load_checkpoint(tmp_path / mode / RUN_CHECKPOINT))
    (s_off, m_off, c_off), (s_on, m_on, c_on) = runs["off"], runs["on"]
    assert s_off["sparse_kernels"]["sparse_layers"] == 0
    assert s_on["sparse_kernels"]["sparse_layers"] == 4 and s_on["sparse_kernels"]["rebuilds"] == 3
    # where the time went: every training call on the dense path (off) or on the kernels (on, all layers)
    assert s_off["sparse_kernels"]["sparse_layers_s"] == 0 and s_off["sparse_kernels"]["dense_layers_s"] > 0
    assert s_on["sparse_kernels"]["dense_layers_s"] == 0 and s_on["sparse_kernels"]["sparse_layers_s"] > 0
    for summary in (s_off, s_on):
        kernels, per_layer = summary["sparse_kernels"], summary["sparse_kernels"]["layer_s"].values()
        assert sum(t["sparse"] for t in per_layer) == pytest.approx(kernels["sparse_layers_s"])
        assert sum(t["dense"] for t in per_layer) == pytest.approx(kernels["dense_layers_s"])
        assert all(t["sparse"] + t["dense"] > 0 for t in per_layer)
        assert kernels["sparse_layers_s"] + kernels["dense_layers_s"] < summary["wall_time_s"]
    assert set(m_on[0]["kernels"].values()) == {"numba"}
    updates_off = [r["layers"] for r in m_off if r["kind"] == "mask_update"]
    updates_on = [r["layers"] for r in m_on if r["kind"] == "mask_update"]
    assert len(updates_off) == len(updates_on) == 2
    # The two paths compute the same gradients and weights to fp32 rounding (~1e-7), which can swap magnitudes
    # or gradients tied within rounding at the drop/grow boundary (seen under ATEN_CPU_CAPABILITY=default: one
    # position of 2368 at the first update). From such a swap on, the runs follow two trajectories that differ
    # by rounding-sized amounts, which later updates turn into more swaps (26 of body.1's 594 final positions
    # there). What must hold on any host: the per-layer active counts at every update exactly (the schedule's),
    # the first update's drops and grows within such ties, the final masks mostly the same, and the losses.
    assert [{n: c["active"] for n, c in u.items()} for u in updates_on] == [
        {n: c["active"] for n, c in u.items()} for u in updates_off]
    for name, layer in updates_off[0].items():
        tie_allowance = 0.001 * layer["active"] + 2
        assert abs(updates_on[0][name]["dropped"] - layer["dropped"]) <= tie_allowance, name
        assert abs(updates_on[0][name]["grown"] - layer["grown"]) <= tie_allowance, name
    for name in c_off.masks:
        differ = int((c_off.masks[name] != c_on.masks[name]).sum())
        assert differ <= 0.1 * int(c_off.masks[name].sum()) + 4, name
    for off, on in zip([r for r in m_off if r["kind"] == "epoch"], [r for r in m_on if r["kind"] == "epoch"],
                       strict=True):
        assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-3)  # 3e-5 apart where masks swapped
        assert on["test_loss"] == pytest.approx(off["test_loss"], rel=1e-3)


def test_a_dense_planned_layer_keeps_the_models_memory_format() -> None:
    """A layer left dense (density above the crossover) runs the module's forward through the backward clock.
    With Ci = 1 a channels-last [Co, 1, k, k] weight is ambiguous; the clock's alias re-derived its strides as
    contiguous, so oneDNN wrote the output in NCHW and every later layer of the sparse run left channels-last
    (the scnn's first layer: pooling and BN + LIF 1.2-5x slower than in the dense run)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 16, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    masks = _masked_layer(conv, 0.5, 0)
    x = torch.rand(8, 1, 12, 12, requires_grad=True)
    reference = conv(x)
    (grad_x_ref,) = torch.autograd.grad(reference.square().sum(), x)
    with SparseExecution(conv, masks, "auto", "cpu") as execution:
        assert execution.rebuild() == {"weight": "dense"}
        out = conv(x)
        (grad_x,) = torch.autograd.grad(out.square().sum(), x)
    assert reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous()
    assert out.stride() == reference.stride()
    assert torch.equal(out, reference) and torch.equal(grad_x, grad_x_ref)
