"""Benchmarks: training-step time and peak memory of ndsnn against SpikingJelly (`python -m benchmarks.train_step`)."""
