"""The LIF on a repeated input (the encoder's output at every step) on numba (`kernels.bn_lif.repeated_input`):
the same spikes as the torch path, input gradients within a few ulps (the surrogate's transcendental
functions and the reciprocal come from different libraries), in the input's memory format, through a whole
model step."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from ndsnn_cli.kernels import bn_lif
from ndsnn_cli.snn.neuron import LIF

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize(("timesteps", "surrogate"), [(5, "atan"), (1, "sigmoid"), (4, "sigmoid")])
def test_repeated_input_equals_the_torch_path(memory_format: torch.memory_format, timesteps: int,
                                              surrogate: str) -> None:
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(3, 4, 7, 7, generator=generator) * 1.5 + 0.7).contiguous(memory_format=memory_format)
    upstream = torch.randn(timesteps * 3, 4, 7, 7, generator=generator)
    numba_in, torch_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    lif = LIF(timesteps, surrogate=surrogate)
    assert bn_lif.repeated_input_fits(lif, numba_in)
    spikes, expected = bn_lif.repeated_input(lif, numba_in), lif.repeated(torch_in)
    spikes.backward(upstream)
    expected.backward(upstream)
    assert torch.equal(spikes, expected)
    assert 0.05 < float(spikes.detach().mean()) < 0.95                      # neither silent nor saturated
    assert spikes.is_contiguous(memory_format=memory_format)
    assert numba_in.grad.is_contiguous(memory_format=memory_format)
    scale = float(torch_in.grad.abs().max())
    torch.testing.assert_close(numba_in.grad, torch_in.grad, rtol=1e-5, atol=1e-6 * scale)


def test_repeated_input_in_evaluation_and_with_hooks() -> None:
    x = torch.randn(2, 6) * 2 + 1
    lif = LIF(3)
    seen = []
    lif.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.no_grad():
        spikes = bn_lif.repeated_input(lif, x)
    assert torch.equal(spikes, lif(x.unsqueeze(0).expand(3, 2, 6).reshape(6, 6)))
    assert len(seen) == 2 and seen[0] is spikes                     # the kernel's call, then the module's


def test_a_layout_the_kernel_does_not_take_runs_the_torch_path() -> None:
    lif = LIF(2)
    strided = torch.randn(4, 3, 6, 6)[:, :, ::2]                    # not dense in any memory format
    assert not bn_lif.repeated_input_fits(lif, strided)
    assert not bn_lif.repeated_input_fits(LIF(2, backend="reference"), torch.randn(4, 3))
    assert torch.equal(bn_lif.repeated_input(lif, strided), lif.repeated(strided))


def test_a_model_step_with_the_kernel_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from ndsnn_cli.snn.models import NeuronConfig, create_model

    torch.manual_seed(0)
    model = create_model("vgg16", num_classes=10, in_channels=3, image_size=32, neuron=NeuronConfig(timesteps=2))
    model = model.to(memory_format=torch.channels_last).train()
    images = torch.rand(2, 3, 32, 32)

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad()
        logits = model(images)
        logits.square().mean().backward()
        return logits.detach(), model.encoder[0].weight.grad.clone()

    calls = []
    original = bn_lif._RepeatedInputLIFNumba.apply
    monkeypatch.setattr(bn_lif._RepeatedInputLIFNumba, "apply", lambda *a: calls.append(1) or original(*a))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    logits, grad = step()
    assert calls == [1]
    model.load_state_dict(state)
    monkeypatch.setattr(bn_lif, "repeated_input_fits", lambda lif, x: False)
    logits_ref, grad_ref = step()
    torch.testing.assert_close(logits, logits_ref, rtol=1e-4, atol=1e-4 * float(logits_ref.abs().max()))
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-5 * float(grad_ref.abs().max()))
