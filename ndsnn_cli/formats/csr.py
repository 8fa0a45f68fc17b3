"""The `ndsnn-csr` artefact format: names, versions, parts, dtypes and the column encodings (DESIGN §6).

Per sparse parameter P (its 2-D view `[out, in*kh*kw]`): `P.crow_indices` (int32/int64) with either
`P.col_indices` (int16 below `COL_INT16_BELOW` columns, else int32) or `P.col_gaps` (a uint8 stream of
within-row gaps, `GAP_ESCAPE` = "add 255 and read on"; version 3), or, in place of all three, `P.flat_gaps`
(the same code over the row-major positions `row * cols + col` of the whole matrix; version 4),
`P.values` (fp32/fp16/bf16, or int8 with per-row `P.scales`: fp32, bf16 from version 4) and `P.shape`
(int64). Metadata entries named in `JSON_KEYS`
are JSON; the rest are plain strings. The writer is `export/csr.py`, the rules are `validate.py`'s.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

CSR_FORMAT = "ndsnn-csr"
# 2: metadata `input` (the input contract) that every reader applies. 3: int8 values with per-row scales, and
# uint8 gap-coded column indices (col_gaps) where they are smaller. 4: flat_gaps (gaps over the row-major
# matrix, no crow_indices) where smaller, and bfloat16 int8 scales. 1 to 3 are still read.
CSR_VERSION = 4
GAPS_SINCE_VERSION = 3  # col_gaps and int8 values
FLAT_SINCE_VERSION = 4  # flat_gaps and bfloat16 scales

# The parts of one sparse parameter: crow_indices, values, shape, one of col_indices / col_gaps (version 3),
# and scales for int8 values; or (version 4) flat_gaps in place of crow_indices and the column indices.
CSR_PARTS = ("crow_indices", "col_indices", "col_gaps", "flat_gaps", "values", "scales", "shape")
VALUE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}
CROW_DTYPES = (torch.int32, torch.int64)
COL_INT16_BELOW = 32768  # col_indices are int16 when a matrix has fewer columns, else int32
GAP_ESCAPE = 255  # in col_gaps: "add 255 and read the next byte"; any other byte ends one entry's gap
INT8_MAX = 127  # int8 values are symmetric: -128 never occurs
# positions: per-row "auto" (the smaller of plain int16/int32 and uint8 gaps, with crow_indices), "plain",
# "gaps", or "flat" (uint8 gaps over the whole matrix, no crow_indices; artefacts only: their "auto" takes
# it where smaller, the C target reads rows)
INDEX_ENCODINGS = ("auto", "plain", "gaps", "flat")

# Metadata values stored as JSON; the rest are plain strings.
JSON_KEYS = ("version", "timesteps", "neuron", "dataset", "input", "sparsity", "graph", "bn_folded", "source")


def dense_dtype(dtype: str) -> torch.dtype:
    """The dtype of an artefact's plain floating tensors (biases, BN): its value dtype, fp32 for int8."""
    return torch.float32 if dtype == "int8" else VALUE_DTYPES[dtype]


def gap_columns(gaps: torch.Tensor, crow: torch.Tensor) -> torch.Tensor:
    """int64 column indices of a `col_gaps` stream that `check_csr` accepted (see `csr.encode_gaps`)."""
    ends = (gaps != GAP_ESCAPE).nonzero().squeeze(1)  # each entry's final byte
    if not ends.numel():
        return ends
    begins = torch.cat([ends.new_zeros(1), ends[:-1] + 1])
    step = (ends - begins) * GAP_ESCAPE + gaps[ends].to(torch.int64) + 1  # col - prev, prev = -1 at a row start
    total = step.cumsum(0)
    crow = crow.to(torch.int64)
    before = torch.cat([total.new_zeros(1), total])[crow[:-1]]  # the running sum where each row starts
    return total - torch.repeat_interleave(before, crow[1:] - crow[:-1]) - 1


def flat_positions(gaps: torch.Tensor) -> torch.Tensor:
    """int64 row-major positions (row * cols + col) of a `flat_gaps` stream that `check_csr` accepted: the
    `col_gaps` code over the whole matrix read as one row (`csr.to_csr(..., "flat")`)."""
    return gap_columns(gaps, torch.tensor([0, int((gaps != GAP_ESCAPE).sum())]))


def split_parameters(
        tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(sparse params: name -> CSR parts, plain tensors). A name with any CSR part is sparse, so a
    parameter that lost one part is reported missing instead of passing as plain tensors."""
    sparse: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition(".")
        if part in CSR_PARTS and name:
            sparse.setdefault(name, {})[part] = tensor
        else:
            plain[key] = tensor
    return sparse, plain
