"""LIF neurons: surrogate gradients equal their formulas; the fused BPTT equals the reference autograd loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from ndsnn_cli.snn.neuron import (
    LIF,
    is_spikes,
    lif_reference,
    saving_spikes_as_bool,
    spike,
    spike_max_pool2d,
    surrogate_grad,
)

TAU, V_TH = 4.0 / 3.0, 1.0
# The fused backward sums the same terms as autograd in another order: float32 rounding only.
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-6


def primitive(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """The smooth function whose derivative each surrogate is (SpikingJelly's definitions)."""
    if surrogate == "atan":
        return torch.atan(math.pi / 2 * alpha * x) / math.pi + 0.5
    return torch.sigmoid(alpha * x)


@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
@pytest.mark.parametrize("alpha", [2.0, 4.0])
def test_surrogate_gradient_equals_autograd_of_its_formula(surrogate: str, alpha: float) -> None:
    x = torch.linspace(-3, 3, 601, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(primitive(x, surrogate, alpha).sum(), x)
    got = surrogate_grad(x.detach(), surrogate, alpha)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # Through the spike function: Heaviside forward, the same derivative backward.
    xs = x.detach().clone().requires_grad_()
    out = spike(xs, surrogate, alpha)
    assert torch.equal(out, (xs >= 0).double())
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(xs.grad, expected, rtol=1e-12, atol=1e-14)


def test_surrogate_grad_leaves_its_input_unchanged() -> None:
    x = torch.randn(50)
    before = x.clone()
    surrogate_grad(x, "atan", 2.0)
    surrogate_grad(x, "sigmoid", 2.0)
    assert torch.equal(x, before)


def test_atan_peak_is_alpha_over_two() -> None:
    assert surrogate_grad(torch.zeros(1), "atan", 2.0).item() == 1.0
    assert surrogate_grad(torch.zeros(1), "sigmoid", 4.0).item() == 1.0


def hand_written_lif(x_seq: torch.Tensor) -> torch.Tensor:
    """DESIGN §3 written out with Python floats, element by element."""
    out = torch.zeros_like(x_seq)
    flat_x, flat_out = x_seq.reshape(x_seq.shape[0], -1), out.reshape(x_seq.shape[0], -1)
    for j in range(flat_x.shape[1]):
        v = torch.zeros((), dtype=x_seq.dtype)
        for t in range(flat_x.shape[0]):
            h = v + (flat_x[t, j] - v) / TAU
            s = 1.0 if h >= V_TH else 0.0
            flat_out[t, j] = s
            v = h * (1 - s)
    return out


@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_fused_lif_spikes_equal_reference_and_gradients_match(steps: int, surrogate: str) -> None:
    generator = torch.Generator().manual_seed(steps)
    batch, features = 4, (3, 5, 5)
    x = (torch.randn(steps * batch, *features, generator=generator) * 1.5 + 0.8)
    x_seq = x.reshape(steps, batch, *features)
    upstream = torch.randn(steps * batch, *features, generator=generator)

    fused = LIF(steps, TAU, V_TH, surrogate, 2.0, backend="fused")
    x_fused = x.clone().requires_grad_()
    out_fused = fused(x_fused)
    out_fused.backward(upstream)

    x_ref = x_seq.clone().requires_grad_()
    out_ref = lif_reference(x_ref, TAU, V_TH, surrogate, 2.0)
    out_ref.backward(upstream.reshape(out_ref.shape))

    assert torch.equal(out_fused, out_ref.reshape(out_fused.shape))
    assert torch.equal(out_fused, hand_written_lif(x_seq).reshape(out_fused.shape))
    spike_share = out_fused.mean().item()
    assert 0.05 < spike_share < 0.95  # both branches (spike / no spike) are exercised
    torch.testing.assert_close(x_fused.grad, x_ref.grad.reshape(x_fused.shape), rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert x_fused.grad.abs().sum() > 0


def test_reference_backend_module_equals_fused_module() -> None:
    x = torch.randn(3 * 2, 7) + 1
    a, b = LIF(3, backend="fused"), LIF(3, backend="reference")
    assert torch.equal(a(x), b(x))


def test_lif_accepts_bf16_and_matches_reference_in_bf16() -> None:
    x = (torch.randn(3 * 4, 16) + 1).to(torch.bfloat16)
    x_fused = x.clone().requires_grad_()
    out = LIF(3)(x_fused)
    assert out.dtype == torch.bfloat16
    x_ref = x.reshape(3, 4, 16).clone().requires_grad_()
    ref = lif_reference(x_ref, TAU, V_TH, "atan", 2.0)
    assert torch.equal(out, ref.reshape(out.shape))
    upstream = torch.randn(3 * 4, 16).to(torch.bfloat16)
    out.backward(upstream)
    ref.backward(upstream.reshape(ref.shape))
    assert x_fused.grad.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits; the two summation orders differ by a few ulps at most.
    torch.testing.assert_close(x_fused.grad.float(), x_ref.grad.reshape(x.shape).float(), rtol=2e-2, atol=2e-2)


def test_lif_under_cpu_autocast_trains_a_conv_layer() -> None:
    conv = torch.nn.Conv2d(2, 4, 3, padding=1)
    lif = LIF(2)
    x = torch.randn(2 * 3, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        spikes = lif(conv(x) + 1)
    assert spikes.dtype == torch.bfloat16
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    spikes.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The memory-lean training path: fused BN+LIF, repeated-input LIF, spike max-pool, 1-byte spikes


@pytest.mark.parametrize("residual", [None, "analog", "spikes"])
def test_batchnorm_lif_fused_equals_batchnorm_module_then_reference_lif(residual: str | None) -> None:
    generator = torch.Generator().manual_seed(3)
    steps, batch = 4, 3
    y = torch.randn(steps * batch, 5, 6, 6, generator=generator) * 2 + 0.5
    extra = {None: None, "analog": torch.randn(y.shape, generator=generator),
             "spikes": (torch.rand(y.shape, generator=generator) < 0.3).float()}[residual]
    upstream = torch.randn(y.shape, generator=generator)
    bns = [torch.nn.BatchNorm2d(5), torch.nn.BatchNorm2d(5)]
    for bn in bns:
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 1.5, 5))
            bn.bias.copy_(torch.linspace(-0.2, 0.3, 5))
    results = []
    for bn, backend in zip(bns, ("fused", "reference"), strict=True):
        lif = LIF(steps, TAU, V_TH, "atan", 2.0, backend=backend)
        y_in = y.clone().requires_grad_()
        r_in = None if extra is None else extra.clone().requires_grad_()
        out = lif.after_batch_norm(y_in, bn, r_in)
        out.backward(upstream)
        results.append((out.detach(), y_in.grad, bn.weight.grad, bn.bias.grad, None if r_in is None else r_in.grad))
    (fused, *fused_grads), (ref, *ref_grads) = results
    assert torch.equal(fused, ref)
    assert 0.05 < fused.mean().item() < 0.95
    for a, b in zip(fused_grads, ref_grads, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert torch.equal(bns[0].running_mean, bns[1].running_mean)
    assert torch.equal(bns[0].running_var, bns[1].running_var)
    assert int(bns[0].num_batches_tracked) == int(bns[1].num_batches_tracked) == 1


def test_fused_batchnorm_lif_runs_forward_hooks_with_its_spikes() -> None:
    lif, bn = LIF(2), torch.nn.BatchNorm2d(3)
    seen: list[torch.Tensor] = []
    lif.register_forward_hook(lambda _m, _i, out: seen.append(out))
    out = lif.after_batch_norm(torch.randn(4, 3, 5, 5, requires_grad=True), bn)
    assert len(seen) == 1 and seen[0] is out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_repeated_input_lif_equals_repeat_then_lif(memory_format: torch.memory_format) -> None:
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 7, 7, generator=generator) * 1.5 + 0.7).contiguous(memory_format=memory_format)
    upstream = torch.randn(5 * 3, 4, 7, 7, generator=generator)
    fused_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = LIF(5).repeated(fused_in)
    ref = LIF(5, backend="reference")(ref_in.unsqueeze(0).expand(5, *x.shape).reshape(-1, 4, 7, 7))
    fused.backward(upstream)
    ref.backward(upstream)
    assert torch.equal(fused, ref)
    torch.testing.assert_close(fused_in.grad, ref_in.grad, rtol=GRAD_RTOL, atol=GRAD_ATOL)
    assert fused.is_contiguous(memory_format=memory_format)  # the layout carries over to the spikes


def test_spike_max_pool_gradient_equals_max_pool_module() -> None:
    generator = torch.Generator().manual_seed(6)
    spikes = (torch.rand(6, 3, 9, 9, generator=generator) < 0.4).float()  # ties in most windows
    upstream = torch.randn(6, 3, 5, 5, generator=generator)
    pool = torch.nn.MaxPool2d(2, 2, ceil_mode=True)
    lean_in, plain_in = spikes.clone().requires_grad_(), spikes.clone().requires_grad_()
    lean = spike_max_pool2d(lean_in, pool)
    plain = pool(plain_in)
    lean.backward(upstream)
    plain.backward(upstream)
    assert torch.equal(lean, plain)
    assert torch.equal(lean_in.grad, plain_in.grad)


def test_spikes_saved_for_backward_as_one_byte_and_shared() -> None:
    conv_a, conv_b = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 2, 1)
    x = torch.randn(6, 4, 8, 8, requires_grad=True)
    context = saving_spikes_as_bool()
    with context:
        spikes = LIF(2)(x * 3)
        assert is_spikes(spikes) and not is_spikes(x)
        out = conv_a(spikes).sum() + conv_b(spikes).sum()  # two convs save the same spike map
    packed = [bits for _, _, saved in context.registry.values() for bits in saved]
    assert len(packed) == 1 and packed[0].dtype == torch.bool and packed[0].shape == spikes.shape
    assert torch.equal(packed[0].float(), spikes.detach())
    assert not is_spikes(spikes)  # only inside the context
    out.backward()
    reference_x = x.detach().clone().requires_grad_()
    conv_a2, conv_b2 = copy.deepcopy(conv_a), copy.deepcopy(conv_b)
    for p in (*conv_a2.parameters(), *conv_b2.parameters()):
        p.grad = None
    ref_spikes = LIF(2)(reference_x * 3)
    (conv_a2(ref_spikes).sum() + conv_b2(ref_spikes).sum()).backward()
    assert torch.equal(conv_a.weight.grad, conv_a2.weight.grad)
    torch.testing.assert_close(x.grad, reference_x.grad)


def test_fused_batchnorm_lif_under_cpu_bf16_autocast_matches_plain_modules() -> None:
    """Mixed precision as AMP runs it: bf16 conv output and residual, fp32 BN parameters."""
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
    images = torch.randn(3 * 4, 3, 6, 6)
    residual = (torch.rand(3 * 4, 6, 6, 6) < 0.3).float()
    results = []
    for backend in ("fused", "reference"):
        c, b = copy.deepcopy(conv), copy.deepcopy(bn)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = LIF(3, backend=backend).after_batch_norm(c(images) * 3, b, residual.bfloat16())
        out.float().sum().backward()
        results.append((out, c.weight.grad, b.weight.grad, b.bias.grad, b.running_var))
    (fused, *fused_rest), (plain, *plain_rest) = results
    assert fused.dtype == torch.bfloat16 and torch.equal(fused, plain) and 0.05 < fused.float().mean() < 0.95
    for a, b in zip(fused_rest, plain_rest, strict=True):
        assert a.dtype == torch.float32
        # bf16 keeps 8 significant bits; the two backward passes round in different places
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2 * b.abs().max().item())
