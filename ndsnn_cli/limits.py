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
# Per image, over all T steps, the largest tensor the reference runtime builds (an activation, or a sparse
# conv's patch matrix): 2^26 elements = 256 MiB of fp32. `run` splits a batch so that one runtime call
# builds at most MAX_RUN_ELEMENTS per tensor (1 GiB of fp32).
MAX_SAMPLE_ELEMENTS = 2**26
MAX_RUN_ELEMENTS = 2**28
# Real-valued recipe constants (lr, weight_decay, tau, v_threshold, ...): float32 numbers, the type the
# optimizer and the neuron compute in (torch refuses an lr of 1e39 as an alpha it cannot convert). 1e30 is far
# above any published setting; an lr that large still reaches the NaN stop (tests use 1e30 to get there).
MAX_REAL = 1e30
# The input contract's per-channel normalisation: std in [1/MAX_INPUT_SCALE, MAX_INPUT_SCALE], |mean| at most
# MAX_INPUT_SCALE (pixels are in [0, 1]; a std of 1e-45 would turn a pixel into inf).
MAX_INPUT_SCALE = 1e3
# NIR's simulation step, in seconds.
MIN_DT = 1e-9
MAX_DT = 1.0

# Text ndsnn parses (JSON, TOML): nesting depth, digits of one integer (Python refuses > 4300 anyway).
MAX_NESTING = 64
MAX_INT_DIGITS = 100
MAX_RECIPE_BYTES = 1 << 20  # a recipe file or an embedded recipe: the shipped ones are ~1 KB
MAX_JSON_FILE_BYTES = 64 << 20  # summary.json, a prune-compare report
MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl: one record per epoch / mask update
MAX_METRICS_LINE_BYTES = 16 << 20  # one metrics record (a mask update of a 10,000-layer model)
# safetensors files (checkpoints, artefacts): the JSON header (tensor table + metadata) and the whole file.
MAX_HEADER_BYTES = 16 << 20
MAX_SAFETENSORS_BYTES = 64 << 30
# Files `run --input` reads: one PNG/JPEG, and a .npy/.pt tensor file; NIR and ONNX files `inspect` reads.
MAX_IMAGE_FILE_BYTES = 64 << 20
MAX_TENSOR_FILE_BYTES = 8 << 30
MAX_NIR_BYTES = 4 << 30  # the sum of a .nir file's datasets, uncompressed
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit
