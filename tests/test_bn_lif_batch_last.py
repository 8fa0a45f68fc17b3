"""The batch-last fused BN + LIF (`kernels.bn_lif`) against the dense reference: `nn.BatchNorm2d` then the
LIF on `[T*B, C, H, W]`, the same data permuted to `[C, H, W, T*B]`.

Tolerances: spikes may differ only where the two paths' fp32 sums put H on the other side of the
threshold; we allow 1e-4 of them (measured: 0 of 57 M over 6 seeds and VGG-like shapes, both
implementations). Input and residual gradients: rtol 1e-4 (measured max 8e-7 of the largest).
BN weight/bias gradients are sums over P*N terms that cancel: atol 1e-4 of the largest (torch
accumulates in fp32, the numba kernel in fp64; measured 7e-4 relative to the element, 1e-5 of the
largest). Running statistics: 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ndsnn_cli.kernels.bn_lif import BN_LIF_IMPLEMENTATIONS, batch_norm_lif
from ndsnn_cli.snn.neuron import LIF

IMPLS = [pytest.param(name, marks=pytest.mark.skipif(
    name == "numba" and __import__("importlib").util.find_spec("numba") is None, reason="numba not installed"))
    for name in BN_LIF_IMPLEMENTATIONS]
SPIKE_MISMATCH = 1e-4


def to_bl(t: torch.Tensor) -> torch.Tensor:
    return t.permute(1, 2, 3, 0).contiguous()        # (N, C, H, W) -> (C, H, W, N)


def from_bl(t: torch.Tensor) -> torch.Tensor:
    return t.permute(3, 0, 1, 2)


def conv_output(timesteps: int, batch: int, c_in: int, channels: int, height: int, width: int,
                seed: int) -> torch.Tensor:
    """A real pre-BN activation: a 3x3 conv over a 20%-rate spike map, [T*B, C, H, W]."""
    gen = torch.Generator().manual_seed(seed)
    spikes = (torch.rand(timesteps * batch, c_in, height, width, generator=gen) < 0.2).float()
    conv = nn.Conv2d(c_in, channels, 3, padding=1)
    with torch.no_grad():
        conv.weight.normal_(0, (2 / (9 * c_in)) ** 0.5, generator=gen)
        conv.bias.normal_(0, 0.1, generator=gen)
        return conv(spikes)


def make_bn(channels: int, seed: int, momentum: float | None = 0.1) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """Two equal BNs (affine parameters away from 1/0, running stats away from 0/1)."""
    gen = torch.Generator().manual_seed(seed + 1)
    ref = nn.BatchNorm2d(channels, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0, generator=gen)
        ref.bias.uniform_(-0.3, 1.0, generator=gen)
        ref.running_mean.normal_(0, 0.5, generator=gen)
        ref.running_var.uniform_(0.5, 2.0, generator=gen)
    fused = nn.BatchNorm2d(channels, momentum=momentum)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def run_both(impl: str, *, timesteps: int, batch: int, channels: int, height: int, width: int,
             surrogate: str = "atan", residual: bool = False, train: bool = True, seed: int = 0,
             momentum: float | None = 0.1, steps: int = 1):
    """Forward + backward (a random upstream gradient) through both paths; returns both sides' results."""
    lif = LIF(timesteps, surrogate=surrogate)
    bn_ref, bn = make_bn(channels, seed, momentum)
    bn_ref.train(train)
    bn.train(train)
    for step in range(steps):
        y = conv_output(timesteps, batch, 3, channels, height, width, seed + step).requires_grad_()
        gen = torch.Generator().manual_seed(seed + 100 + step)
        r = ((torch.rand(y.shape, generator=gen) < 0.3).float().requires_grad_() if residual else None)
        y_bl = to_bl(y.detach()).requires_grad_()
        r_bl = to_bl(r.detach()).requires_grad_() if residual else None
        ref = lif(bn_ref(y) + r) if residual else lif(bn_ref(y))
        out = batch_norm_lif(y_bl, bn, lif, r_bl, impl=impl)
        grad = torch.randn(ref.shape, generator=gen)
        ref.backward(grad)
        out.backward(to_bl(grad))
    return {"ref": (ref, y.grad, r.grad if residual else None, bn_ref),
            "new": (from_bl(out), from_bl(y_bl.grad), from_bl(r_bl.grad) if residual else None, bn)}


def check_close(results: dict, *, residual: bool = False, affine_grads: bool = True) -> None:
    spikes_ref, gx_ref, gr_ref, bn_ref = results["ref"]
    spikes, gx, gr, bn = results["new"]
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    mismatches = int((spikes != spikes_ref).sum())
    assert mismatches <= SPIKE_MISMATCH * spikes.numel(), f"{mismatches} of {spikes.numel()} spikes differ"
    assert 0.02 < float(spikes_ref.detach().mean()) < 0.6  # a live layer: both sides of the threshold are exercised
    scale = float(gx_ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4 * scale)
    if residual:
        torch.testing.assert_close(gr, gr_ref, rtol=1e-4, atol=1e-4 * float(gr_ref.abs().max()))
    if affine_grads:
        for name in ("weight", "bias"):
            g, g_ref = getattr(bn, name).grad, getattr(bn_ref, name).grad
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(bn_ref.num_batches_tracked)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("timesteps", [1, 4])
def test_training_matches_dense_bn_then_lif(impl: str, surrogate: str, timesteps: int) -> None:
    check_close(run_both(impl, timesteps=timesteps, batch=6, channels=16, height=8, width=8, surrogate=surrogate))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_residual_add_matches_dense(impl: str, surrogate: str) -> None:
    check_close(run_both(impl, timesteps=4, batch=5, channels=8, height=6, width=6, surrogate=surrogate,
                         residual=True), residual=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_odd_sizes(impl: str) -> None:
    """Channels, map and batch sizes off every vector width (5 channels, 7x3 map, B = 3, T = 3)."""
    check_close(run_both(impl, timesteps=3, batch=3, channels=5, height=7, width=3, residual=True), residual=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_over_steps(impl: str, momentum: float | None) -> None:
    """Three training steps: running mean/var follow BatchNorm2d's update (momentum, or the cumulative
    average when None), and the last step's gradients still match."""
    results = run_both(impl, timesteps=2, batch=4, channels=6, height=5, width=5, momentum=momentum, steps=3)
    check_close(results, affine_grads=False)  # .grad accumulated over 3 steps on each side: compared below
    for name in ("weight", "bias"):
        g, g_ref = getattr(results["new"][3], name).grad, getattr(results["ref"][3], name).grad
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4 * float(g_ref.abs().max()))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("residual", [False, True])
def test_eval_mode_uses_running_statistics(impl: str, residual: bool) -> None:
    """Evaluation: running statistics, left unchanged; spikes identical, gradients too (a frozen BN)."""
    results = run_both(impl, timesteps=4, batch=4, channels=8, height=6, width=6, residual=residual, train=False)
    spikes_ref, spikes = results["ref"][0], results["new"][0]
    assert torch.equal(spikes, spikes_ref)
    check_close(results, residual=residual)
    assert int(results["new"][3].num_batches_tracked) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_inference_without_grad_matches(impl: str) -> None:
    lif = LIF(4)
    bn_ref, bn = make_bn(8, 3)
    y = conv_output(4, 4, 3, 8, 6, 6, 3)
    with torch.no_grad():
        ref = lif(bn_ref(y))
        out = batch_norm_lif(to_bl(y), bn, lif, impl=impl)
    assert int((from_bl(out) != ref).sum()) <= SPIKE_MISMATCH * ref.numel()
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-6)


def test_numba_and_torch_implementations_agree() -> None:
    """The two twins on one input: the same spikes, gradients to fp32 summation order."""
    pytest.importorskip("numba")
    a = run_both("numba", timesteps=4, batch=8, channels=12, height=9, width=9, residual=True, seed=7)["new"]
    b = run_both("torch", timesteps=4, batch=8, channels=12, height=9, width=9, residual=True, seed=7)["new"]
    assert torch.equal(a[0], b[0])
    for x, y in ((a[1], b[1]), (a[2], b[2]), (a[3].weight.grad, b[3].weight.grad), (a[3].bias.grad, b[3].bias.grad)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))


def test_unknown_implementation_is_named() -> None:
    with pytest.raises(ValueError, match="unknown BN\\+LIF implementation 'cuda'"):
        batch_norm_lif(torch.zeros(2, 1, 1, 4), nn.BatchNorm2d(2), LIF(2), impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
def test_affine_free_bn_on_flat_positions(impl: str) -> None:
    """`BatchNorm2d(affine=False)` and a [C, P, N] input (H*W flattened): the same spikes and input gradient."""
    lif = LIF(2)
    bn_ref, bn = nn.BatchNorm2d(6, affine=False), nn.BatchNorm2d(6, affine=False)
    y = conv_output(2, 4, 3, 6, 5, 5, 11).requires_grad_()
    y_bl = to_bl(y.detach()).view(6, 25, 8).requires_grad_()
    ref = lif(bn_ref(y))
    out = batch_norm_lif(y_bl, bn, lif, impl=impl)
    assert out.shape == (6, 25, 8)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(12))
    ref.backward(grad)
    out.backward(to_bl(grad).view(6, 25, 8))
    assert int((from_bl(out.view(6, 5, 5, 8)) != ref).sum()) <= SPIKE_MISMATCH * ref.numel()
    torch.testing.assert_close(from_bl(y_bl.grad.view(6, 5, 5, 8)), y.grad, rtol=1e-4,
                               atol=1e-4 * float(y.grad.abs().max()))
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=0, atol=1e-6)
