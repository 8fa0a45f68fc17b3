"""A reference runtime for `ndsnn-csr` artefacts: sparse kernels, no training code.

The network is rebuilt from the artefact's metadata (`graph`: an ordered op list, `timesteps`,
neuron constants). Linear layers run a CSR x dense product (`torch.addmm`) on the CSR weight;
convolutions run im2col (one strided copy of the whole `[T*B]` batch per layer) followed by the
same product. Layers denser than `DENSE_ABOVE` run the dense kernels instead. Gap-coded column indices
and int8 values (version 3) are decoded and dequantised once, at load (`csr.decoded`). The LIF arithmetic
matches the training neuron exactly: `h = v + (x - v) / tau`, spike `h >= v_th`, hard reset
`v = h * (1 - s)` (same rounding, fewer kernels).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ndsnn_cli import limits as L
from ndsnn_cli.errors import UserError
from ndsnn_cli.export import graph
from ndsnn_cli.export.contract import normalise
from ndsnn_cli.export.csr import decoded, load_raw, split_csr
from ndsnn_cli.validate import check_artefact, sample_elements

# A layer denser than this runs the dense kernel on its weight rebuilt at load time: above ~10%
# density the CSR product plus its patch copy is slower than oneDNN's dense convolution (at 90%
# sparsity the all-CSR runtime took 1.7-2.5x the dense model's time; benchmarks/export_sizes.md).
DENSE_ABOVE = 0.1


class SparseNetwork(graph.GraphBackend):
    """An artefact ready to run: `logits = net(images)` gives per-step logits [T, B, classes].

    Each sparse layer runs the CSR kernel, or the dense one when its density is above `dense_above`
    (1.0: CSR everywhere; 0.0: dense everywhere).
    """

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
                 dense_above: float = DENSE_ABOVE, source: str = "artefact", validated: bool = False) -> None:
        if not validated:  # the kernels below trust every index: never unchecked data (load_raw checked it)
            check_artefact(source, tensors, metadata)
        self.metadata = metadata
        self.timesteps = int(metadata["timesteps"])
        # images per call, so that no tensor of one call exceeds MAX_RUN_ELEMENTS (a small file can ask for
        # large activations: the validator bounds them per image, this bounds them per call)
        self.images_per_call = max(1, L.MAX_RUN_ELEMENTS // sample_elements(source, tensors, metadata))
        self.graph = graph.from_json(metadata["graph"])
        self.contract = metadata["input"]
        sparse, plain = split_csr(tensors)
        self.dense = {k: v.float() if v.is_floating_point() else v for k, v in plain.items()}
        self.sparse: dict[str, tuple[torch.Tensor, list[int]]] = {}
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            for name, stored in sparse.items():
                parts = decoded(stored)  # gap-coded columns decoded, int8 dequantised: once, here
                shape = [int(s) for s in parts["shape"]]
                cols = 1
                for s in shape[1:]:
                    cols *= s
                # check_invariants=False only because check_artefact above proved them (crow monotone
                # from 0 to nnz, 0 <= col < cols, sorted rows); torch's kernels read out of bounds otherwise
                matrix = torch.sparse_csr_tensor(parts["crow_indices"], parts["col_indices"], parts["values"],
                                                 (shape[0], cols), check_invariants=False)
                if parts["values"].numel() > dense_above * shape[0] * cols:
                    self.dense[name] = matrix.to_dense().reshape(shape)
                else:
                    self.sparse[name] = (matrix, shape)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Images as the input contract says (float pixels in [0, 1], NCHW) -> per-step logits; the
        training normalisation is applied here, as training's `Normalize` does (same float ops)."""
        if images.shape[0] > self.images_per_call:
            return torch.cat([self(images[i:i + self.images_per_call])
                              for i in range(0, images.shape[0], self.images_per_call)], dim=1)
        x = self._run(self.graph, normalise(images, self.contract))
        return x.reshape(self.timesteps, images.shape[0], -1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self(images).sum(0).argmax(-1)

    def _run(self, ops: Sequence[graph.Op], x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = self.dispatch(op, x)
        return x

    def _bias(self, op: graph.WeightedOp) -> torch.Tensor | None:
        return self.dense[op.bias] if op.bias else None

    def _conv2d(self, op: graph.Conv2d, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias(op)
        if op.weight not in self.sparse:
            return F.conv2d(x, self.dense[op.weight], bias, op.stride, op.padding, op.dilation, op.groups)
        if op.groups != 1:
            raise UserError(f"{op.weight}: grouped sparse convolution is not supported by this runtime")
        matrix, shape = self.sparse[op.weight]
        batch = x.shape[0]
        columns, out_h, out_w, batch_last = _im2col(x, shape[2:], op.stride, op.padding, op.dilation)
        product = _sparse_mm(matrix, columns)
        if batch_last:
            product = product.view(shape[0], out_h, out_w, batch).permute(3, 0, 1, 2)
        else:
            product = product.view(shape[0], batch, out_h, out_w).transpose(0, 1)
        out = x.new_empty((batch, shape[0], out_h, out_w))  # back to [N, C, H, W] and the bias: one pass
        return torch.add(product, bias.reshape(1, -1, 1, 1), out=out) if bias is not None else out.copy_(product)

    def _linear(self, op: graph.Linear, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias(op)
        if op.weight not in self.sparse:
            return F.linear(x, self.dense[op.weight], bias)
        matrix, _ = self.sparse[op.weight]
        out = _sparse_mm(matrix, x.t().contiguous()).t()
        return out + bias if bias is not None else out

    def _batchnorm(self, op: graph.BatchNorm, x: torch.Tensor) -> torch.Tensor:
        p = op.name
        return F.batch_norm(x, self.dense[f"{p}.running_mean"], self.dense[f"{p}.running_var"],
                            self.dense.get(f"{p}.weight"), self.dense.get(f"{p}.bias"), False, 0.0, op.eps)

    def _lif(self, op: graph.LIF, x: torch.Tensor) -> torch.Tensor:
        """Spikes written step by step into the output; four cheap arithmetic kernels per step.

        Same values as the training neuron: `(x - v) / tau + v` via addcdiv is the same rounding, the
        first step (V = 0) is exactly `x / tau`, and the reset `h - h * s` is exactly `h * (1 - s)`.
        """
        tau, v_threshold = op.tau, op.v_threshold
        spikes = torch.empty_like(x)
        inputs = x.view(self.timesteps, -1, *x.shape[1:]).unbind(0)
        h = torch.div(inputs[0], tau)
        v = torch.empty_like(h)
        tau_tensor = x.new_full((), tau)
        for t, spiked in enumerate(spikes.view(self.timesteps, -1, *x.shape[1:]).unbind(0)):
            if t:
                torch.sub(inputs[t], v, out=h)
                torch.addcdiv(v, h, tau_tensor, out=h)
            torch.ge(h, v_threshold, out=spiked)
            torch.addcmul(h, h, spiked, value=-1, out=v)  # hard reset: V = H (1 - S)
        return spikes

    def _maxpool2d(self, op: graph.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
        """Unpadded windows that tile the map exactly: the elementwise maximum of the kh*kw strided
        window slices (4x faster than `F.max_pool2d` on 2x2 windows here); otherwise the library op."""
        (kh, kw), (sh, sw) = op.kernel, op.stride
        height, width = x.shape[2:]
        if any(op.padding) or (height - kh) % sh or (width - kw) % sw or kh * kw > 16:
            return F.max_pool2d(x, op.kernel, op.stride, op.padding, ceil_mode=op.ceil_mode)
        out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
        out = None
        for i in range(kh):
            for j in range(kw):
                window = x[:, :, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]
                out = window.clone(memory_format=torch.contiguous_format) if out is None else \
                    torch.maximum(out, window, out=out)
        return out

    def _global_avgpool(self, op: graph.GlobalAvgPool, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1)

    def _flatten(self, op: graph.Flatten, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)

    def _repeat_timesteps(self, op: graph.RepeatTimesteps, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.timesteps, *x.shape).reshape(-1, *x.shape[1:])

    def _residual(self, op: graph.Residual, x: torch.Tensor) -> torch.Tensor:
        return self._run(op.main, x) + self._run(op.shortcut, x)


def _sparse_mm(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """CSR x dense into a fresh tensor. `torch.sparse.mm` zero-fills a result, multiplies into a
    temporary and copies it over (about 20% extra on a 64x576 @ 576x5120 product); addmm with
    beta = 0 writes the product straight into `out` (whose contents beta = 0 ignores)."""
    out = dense.new_empty((matrix.shape[0], dense.shape[1]))
    return torch.addmm(out, matrix, dense, beta=0, out=out)


# Below this output width the patch columns are ordered (oh, ow, n) instead of (n, oh, ow): a [T*B]
# batch of 4x4 maps then copies in runs of OW*N values instead of OW (2.5-3x faster at 2x2-8x8).
BATCH_LAST_BELOW_WIDTH = 16


def _im2col(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
            dilation: list[int]) -> tuple[torch.Tensor, int, int, bool]:
    """`[C*kh*kw, N*OH*OW]` patch matrix (unfold's row order) written by one strided copy, and whether
    its columns run batch-last.

    `F.unfold` followed by the transpose to this layout costs two passes over the largest tensor of
    the layer and dominated the runtime's profile; a strided view of the padded input needs one copy.
    """
    batch, channels, height, width = x.shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    batch_last = out_w < BATCH_LAST_BELOW_WIDTH
    # the input, zero-padded and channel-first, in one copy: [C, Hp, Wp, N] or [C, N, Hp, Wp]
    order = (1, 2, 3, 0) if batch_last else (1, 0, 2, 3)
    padded_shape = [channels, height + 2 * padding[0], width + 2 * padding[1]]
    padded_shape.insert(3 if batch_last else 1, batch)
    padded = x.new_zeros(padded_shape) if padding[0] or padding[1] else x.new_empty(padded_shape)
    rows, cols = slice(padding[0], padding[0] + height), slice(padding[1], padding[1] + width)
    interior = padded[:, rows, cols, :] if batch_last else padded[:, :, rows, cols]
    interior.copy_(x.permute(order))
    if batch_last:
        s_c, s_h, s_w, s_n = padded.stride()
        size = (channels, kernel[0], kernel[1], out_h, out_w, batch)
        strides = (s_c, dilation[0] * s_h, dilation[1] * s_w, stride[0] * s_h, stride[1] * s_w, s_n)
    else:
        s_c, s_n, s_h, s_w = padded.stride()
        size = (channels, kernel[0], kernel[1], batch, out_h, out_w)
        strides = (s_c, dilation[0] * s_h, dilation[1] * s_w, s_n, stride[0] * s_h, stride[1] * s_w)
    patches = padded.as_strided(size, strides)
    return patches.reshape(channels * kernel[0] * kernel[1], batch * out_h * out_w), out_h, out_w, batch_last


def load_network(path: str | Path, dense_above: float = DENSE_ABOVE) -> SparseNetwork:
    """Read an `ndsnn-csr` artefact into a runnable network (layers denser than `dense_above` run dense)."""
    tensors, metadata = load_raw(path)
    if "graph" not in metadata:
        raise UserError(f"{path}: artefact has no layer graph in its metadata")
    return SparseNetwork(tensors, metadata, dense_above, source=str(path), validated=True)
