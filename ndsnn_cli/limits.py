"""Upper bounds on every count a user or a file can give: one home for the recipe, the CLI options and
the file validator, so an absurd value is refused with its bound instead of becoming an allocation.

Torch-free and import-free on purpose: the CLI reads these at start-up. Each bound is far above any
published setting (the paper: T = 5, batch 128, 300 epochs) and far below what would exhaust memory.
"""

from __future__ import annotations

MAX_TIMESTEPS = 1024  # T: SNN papers use 1-100 (DVS data up to ~100)
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
MAX_THREADS = 1024
MAX_STEPS = 1_000_000_000  # any "every N steps" setting, and a run's step count
MAX_SAMPLES = 1_000_000_000  # train/test limits and train sizes (ImageNet-21k has 14 M images)
MAX_PROCESSES = 1024  # --nproc, --jobs, --seeds
MAX_SEED = 2**62  # torch seeds are 64-bit; the generators add small offsets (seed + 7919, + epoch)
# `ndsnn cost` integrates per optimizer step: 50 M steps is 400 MB of float64 per array.
MAX_COST_STEPS = 50_000_000

# Files (the validator): shapes a reader may be asked to build.
MAX_CLASSES = 1_000_000
MAX_CHANNELS = 65_536
MAX_IMAGE_SIZE = 8192
MAX_TENSOR_NUMEL = 2**31 - 1  # one dense tensor rebuilt from a CSR parameter (8 GiB of fp32)
MAX_GRAPH_OPS = 10_000
MAX_KERNEL = 1024
