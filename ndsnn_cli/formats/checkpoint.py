"""The checkpoint format: one safetensors file whose `__metadata__["ndsnn"]` is JSON (format, version,
recipe TOML, step/epoch, the optimizer's non-tensor state) and whose tensors are keyed:

`model::<name>` (state dict), `mask::<param>` (bool/uint8 0/1), `optim::<param index>::<state key>`,
`method::generator` and `rng::torch` / `rng::cuda::<i>` (RNG states as 1-D uint8), `method::pending_update`.
"""

from __future__ import annotations

import re

FORMAT = "ndsnn-checkpoint"
VERSION = 1
METADATA_KEY = "ndsnn"  # the `__metadata__` entry holding the JSON

MODEL = "model::"
MASK = "mask::"
OPTIM = "optim::"
RNG = "rng::"
RNG_TORCH = "rng::torch"
RNG_CUDA = "rng::cuda::"
METHOD_GENERATOR = "method::generator"
PENDING_UPDATE = "method::pending_update"  # one bool: a mask update postponed by an AMP-skipped step

RNG_KEY = re.compile(r"rng::torch|rng::cuda::\d{1,4}")

OPTIM_KEY = re.compile(r"optim::(\d{1,6})::(\w+)")  # optim::<parameter index>::<state name>
OPTIM_SCALAR_KEY = re.compile(r"(\d{1,6})::(\w+)")  # metadata optimizer.scalars: <parameter index>::<state name>
