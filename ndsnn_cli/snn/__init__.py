"""Spiking neurons and models. The names below are the registries' keys, kept torch-free so recipes
validate before torch is imported; `snn.neuron` builds its implementations from them."""

SURROGATE_NAMES = ("atan", "sigmoid")  # snn.neuron.SURROGATES, in this order
LIF_BACKENDS = ("fused", "reference")  # fused: custom autograd, one saved tensor; reference: plain loop
