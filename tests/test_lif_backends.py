"""ndsnn's models against their SpikingJelly twins (benchmarks/sj_models.py): same spikes, same loss, same gradients.

Skipped when spikingjelly is not installed (it is a benchmark extra, not a test dependency).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("spikingjelly")
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402

from benchmarks.sj_models import record_spikes, sj_twin  # noqa: E402
from ndsnn_cli.evaluation import spiking_loss  # noqa: E402
from ndsnn_cli.snn.models import NeuronConfig, create_model  # noqa: E402
from ndsnn_cli.snn.neuron import LIF  # noqa: E402


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_scnn_spikes_loss_and_gradients_equal_spikingjelly_twin(backend: str) -> None:
    torch.manual_seed(0)
    ours = create_model("scnn", num_classes=10, in_channels=3, image_size=16,
                        neuron=NeuronConfig(timesteps=3, backend=backend))
    theirs = sj_twin(ours)
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 3, 16, 16, generator=generator) * 2, torch.randint(0, 10, (6,), generator=generator)

    our_spikes, their_spikes = record_spikes(ours, LIF), record_spikes(theirs, sj_neuron.LIFNode)
    our_loss = spiking_loss(ours(images), labels)
    their_loss = spiking_loss(theirs(images), labels)
    our_loss.backward()
    their_loss.backward()

    assert len(our_spikes) == len(their_spikes) == 3
    for a, b in zip(our_spikes, their_spikes, strict=True):
        assert torch.equal(a, b)
    rate = torch.cat(our_spikes).mean().item()
    assert 0.02 < rate < 0.9  # spikes and silences both present, so the comparison means something
    assert abs(our_loss.item() - their_loss.item()) <= 1e-5
    their_params = dict(theirs.named_parameters())
    nonzero = 0
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, their_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
        nonzero += int(param.grad.abs().sum() > 0)
    assert nonzero >= len(their_params) // 2  # gradients flowed through most layers, not just zeros compared
