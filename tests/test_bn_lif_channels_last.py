"""The channels-last fused BN + LIF (`kernels.bn_lif.after_batch_norm`, numba on the dense layout's own
`[T, B*H*W, C]` memory) against `nn.BatchNorm2d` / `nn.BatchNorm1d` then the LIF, on the same data.

Tolerances as the batch-last kernel's (tests/test_bn_lif_batch_last.py: spikes within 1e-4 of them, where
the statistics' other summation order puts H across the threshold; gradients rtol 1e-4; running statistics
1e-6). Plus: the statistics do not depend on the thread count (fixed slices, summed in order), and a batch
the kernel does not fit falls back to the LIF's own path with identical results.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from test_bn_lif_batch_last import check_close, conv_output, make_bn
from torch import nn

from ndsnn_cli.kernels.bn_lif import after_batch_norm, channels_last_fits
from ndsnn_cli.snn.neuron import LIF

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")


def run_both(*, timesteps: int, batch: int, channels: int, size: int, surrogate: str = "atan",
             residual: bool = False, seed: int = 0, steps: int = 1) -> dict:
    lif = LIF(timesteps, surrogate=surrogate)
    bn_ref, bn = make_bn(channels, seed)
    for step in range(steps):
        y = conv_output(timesteps, batch, 3, channels, size, size, seed + step)
        y = y.contiguous(memory_format=torch.channels_last).requires_grad_()
        y_new = y.detach().clone(memory_format=torch.channels_last).requires_grad_()
        gen = torch.Generator().manual_seed(seed + 100 + step)
        r = (torch.rand(y.shape, generator=gen) < 0.3).float().contiguous(memory_format=torch.channels_last)
        r_ref, r_new = (r.clone().requires_grad_(), r.clone().requires_grad_()) if residual else (None, None)
        assert channels_last_fits(lif, y_new, bn, r_new)
        ref = lif(bn_ref(y) + r_ref) if residual else lif(bn_ref(y))
        out = after_batch_norm(lif, y_new, bn, r_new)
        assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
        grad = torch.randn(ref.shape, generator=gen)
        ref.backward(grad)
        out.backward(grad)
    return {"ref": (ref, y.grad, r_ref.grad if residual else None, bn_ref),
            "new": (out, y_new.grad, r_new.grad if residual else None, bn)}


@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("timesteps", [1, 4])
def test_channels_last_training_matches_dense_bn_then_lif(surrogate: str, timesteps: int) -> None:
    check_close(run_both(timesteps=timesteps, batch=6, channels=24, size=10, surrogate=surrogate))


def test_channels_last_residual_and_running_statistics_over_steps() -> None:
    check_close(run_both(timesteps=2, batch=4, channels=16, size=8, residual=True, steps=3), residual=True)


def test_flat_batch_norm_1d_matches() -> None:
    timesteps, batch, features = 3, 8, 40
    lif = LIF(timesteps)
    ref_bn, bn = nn.BatchNorm1d(features), nn.BatchNorm1d(features)
    y = torch.randn(timesteps * batch, features, generator=torch.Generator().manual_seed(3)).mul(2).requires_grad_()
    y_new = y.detach().clone().requires_grad_()
    ref, out = lif(ref_bn(y)), after_batch_norm(lif, y_new, bn)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4))
    ref.backward(grad)
    out.backward(grad)
    assert torch.equal(out, ref)
    torch.testing.assert_close(y_new.grad, y.grad, rtol=1e-4, atol=1e-4 * float(y.grad.abs().max()))
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=0, atol=1e-6)


def test_statistics_do_not_depend_on_the_thread_count() -> None:
    import numba

    results = []
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        torch.manual_seed(0)
        results.append(run_both(timesteps=2, batch=4, channels=16, size=8)["new"])
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    (s1, g1, _, bn1), (s2, g2, _, bn2) = results
    assert torch.equal(s1, s2) and torch.equal(g1, g2)
    assert torch.equal(bn1.running_var, bn2.running_var) and torch.equal(bn1.weight.grad, bn2.weight.grad)


def test_batches_the_kernel_does_not_fit_take_the_lif_path() -> None:
    lif = LIF(2)
    bn = nn.BatchNorm2d(8)
    y = torch.randn(4, 8, 6, 6)                                # NCHW: not [T, Q, C] without a copy
    assert not channels_last_fits(lif, y, bn, None)
    assert not channels_last_fits(lif, y.contiguous(memory_format=torch.channels_last), bn.eval(), None)
    assert not channels_last_fits(LIF(2, backend="reference"), y.contiguous(memory_format=torch.channels_last),
                                  bn.train(), None)
    reference_bn = nn.BatchNorm2d(8)
    assert torch.equal(after_batch_norm(lif, y, bn), lif.after_batch_norm(y, reference_bn))


@pytest.mark.parametrize(("name", "size", "channels"), [("vgg16", 32, 3), ("resnet19", 16, 3), ("scnn", 28, 1)])
def test_a_channels_last_model_trains_alike_with_and_without_the_kernel(name, size, channels, monkeypatch) -> None:
    """A whole model's training step (the trainer's channels-last layout): every LIF's spikes, the logits,
    every gradient and running statistic, with the numba kernel against the torch fused path."""
    import copy

    from ndsnn_cli.kernels import bn_lif
    from ndsnn_cli.snn.models import NeuronConfig, create_model

    torch.manual_seed(0)
    base = create_model(name, num_classes=10, in_channels=channels, image_size=size,
                        neuron=NeuronConfig(timesteps=2)).to(memory_format=torch.channels_last).train()
    images = torch.randn(4, channels, size, size)
    results, used = {}, []
    fits = bn_lif.channels_last_fits

    def counted_fits(*args, kernel: bool) -> bool:
        used.append(kernel and fits(*args))
        return used[-1]

    for kernel in (True, False):
        monkeypatch.setattr(bn_lif, "channels_last_fits", lambda *a, kernel=kernel: counted_fits(*a, kernel=kernel))
        model = copy.deepcopy(base)
        spikes: dict[str, torch.Tensor] = {}
        for lif_name, module in model.named_modules():
            if isinstance(module, LIF):
                module.register_forward_hook(
                    lambda _m, _i, out, n=lif_name, seen=spikes: seen.setdefault(n, out.detach()))
        logits = model(images)
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = (spikes, logits.detach(), grads, dict(model.named_buffers()))
    (spikes, logits, grads, buffers), (spikes_ref, logits_ref, grads_ref, buffers_ref) = results[True], results[False]
    assert sum(used) >= 1                                      # the kernel ran BN + LIF in the first model
    assert spikes.keys() == spikes_ref.keys() and len(spikes) > 2 and grads.keys() == grads_ref.keys()
    flipped = sum(int((spikes[n] != spikes_ref[n]).sum()) for n in spikes)
    assert flipped <= 1e-4 * sum(s.numel() for s in spikes.values())
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4 * float(logits_ref.abs().max()))
    scale = max(float(g.abs().max()) for g in grads_ref.values())
    for param, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[param], rtol=1e-3, atol=1e-5 * scale, msg=param)
    for buffer, value in buffers.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, buffers_ref[buffer], rtol=1e-6, atol=1e-6, msg=buffer)
