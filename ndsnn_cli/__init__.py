"""ndsnn: train sparse spiking neural networks from scratch (NDSNN and baselines) and ship them."""

__version__ = "0.1.0"
