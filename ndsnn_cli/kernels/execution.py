"""Run a model's conv and linear layers on sparse kernels: an autograd Function and the per-model plan.

`with SparseExecution(model, masks, mode, device_type):` replaces the `forward` of every sparse layer
(state_dict and parameters unchanged) by one that runs the kernel `choose` picked for it, or the
module's own dense forward, and restores them on any exit. Kernels are found in the registry
(`kernels.KERNELS`) and follow `protocol.SparseKernel`; buffers, autocast and layouts follow the
input's and the weight's device. `rebuild()` re-decides and rebuilds the layouts (after every mask update,
never per step); `dense_weight_grad` asks for the dense weight gradient (drop-and-grow update steps).
While training on the CPU it also clocks each layer's forward + backward, by the path it took
(`summary()["sparse_layers_s"]` / `["dense_layers_s"]`): where a sparse run's wall time goes.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ndsnn_cli.kernels import BATCH_LAST, CALIBRATE, DENSE, KERNELS, SPARSE_LAYOUTS, available_kernels, choose
from ndsnn_cli.kernels.calibration import Calibrator, calibration_record
from ndsnn_cli.kernels.layout import TapLayout, build_layout
from ndsnn_cli.kernels.protocol import SparseKernel
from ndsnn_cli.snn.neuron import is_spikes, mark_spikes


def create_kernel(name: str) -> SparseKernel:
    """A new instance of the kernel registered under `name`, its module imported on first use
    (`KernelInfo.factory`).

    Torch's thread count is restored after construction: numba's OpenMP pool shares libgomp with torch,
    and launching it (the numba kernel does, sizing it to torch's count) sets the process's OpenMP thread
    count to NUMBA_NUM_THREADS (all cores), which torch then uses too. Without this a run set to 1 thread
    trains on 2 from its first sparse layer on (other sums, other bits)."""
    info = KERNELS.get(name)
    if info is None:
        raise ValueError(f"unknown sparse kernel {name!r} (known: {', '.join(KERNELS)})")
    module_name, _, class_name = info.factory.partition(":")
    threads = torch.get_num_threads()
    kernel = getattr(importlib.import_module(module_name), class_name)()
    torch.set_num_threads(threads)
    if not isinstance(kernel, SparseKernel):
        raise TypeError(f"sparse kernel {name!r}: {info.factory} lacks a SparseKernel method")
    return kernel


@dataclass
class SparseLayer:
    """One conv/linear layer's plan: its kernel (or "dense"), layout, geometry, gradient request."""

    name: str
    module: nn.Conv2d | nn.Linear
    kernel_name: str = DENSE     # the plan's choice
    kernel: SparseKernel | None = None
    built: str = DENSE           # the kernel `kernel` and `layout` are for (a calibration probe's, if dense)
    layout: TapLayout | None = None
    stride: int = 1
    pad: int = 0
    dense_weight_grad: bool = False
    density: float = 1.0
    use_kernel: bool = True  # False: a calibration probe's dense step (kernel and layout stay built)
    calls: int = field(default=0)
    sparse_s: float = 0.0    # forward + backward time of the training calls, on the sparse kernel
    dense_s: float = 0.0     # ... and on the dense path
    _clock: float = 0.0      # a dense backward's start (set by `_BackwardClock` on the output)

    @property
    def active(self) -> bool:
        return self.kernel is not None and self.layout is not None and self.use_kernel


def supported(module: nn.Module) -> bool:
    """Shapes the kernels implement: Linear, and Conv2d with square stride/padding, no dilation/groups."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.padding_mode != "zeros":
        return False
    pad = module.padding
    return (module.dilation == (1, 1) and module.stride[0] == module.stride[1] and not isinstance(pad, str)
            and pad[0] == pad[1])


def _as_cpn(t: torch.Tensor) -> torch.Tensor:
    """A [C, P, N] view (P = H*W, or 1 for [N, F]) of an [N, C, H, W] (any memory format) or [N, F] tensor."""
    if t.dim() == 2:
        return t.t().unsqueeze(1)
    return t.permute(1, 2, 3, 0).reshape(t.shape[1], t.shape[2] * t.shape[3], t.shape[0])  # a view here


def to_batch_last(x: torch.Tensor, kernel: SparseKernel, spikes: bool | None = None) -> torch.Tensor:
    """[N, C, H, W] (any memory format) or [N, F] -> contiguous [C, H, W, N] ([F, 1, 1, N]); spike maps
    (`spikes`, by default `is_spikes(x)`) as uint8 (0/1 exactly: the kernels then read 1 byte per input
    and backward keeps 1 byte)."""
    dtype = torch.uint8 if (is_spikes(x) if spikes is None else spikes) else torch.float32
    shape = (x.shape[1], 1, 1, x.shape[0]) if x.dim() == 2 else (x.shape[1], x.shape[2], x.shape[3], x.shape[0])
    y = torch.empty(shape, dtype=dtype, device=x.device)
    kernel.copy(_as_cpn(x), y.view(shape[0], shape[1] * shape[2], shape[3]))
    return y


def memory_format_of(t: torch.Tensor) -> torch.memory_format | None:
    """What a layer result copies from its input: channels-last or contiguous for [N, C, H, W], None for [N, F]."""
    if t.dim() == 2:
        return None
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _empty_result(fmt: torch.memory_format | None, channels: int, height: int, width: int,
                  batch: int, device: torch.device) -> torch.Tensor:
    """An empty layer result `[N, C, H, W]` in `fmt` (`[N, C]` for a linear layer: fmt None)."""
    if fmt is None:
        return torch.empty(batch, channels, device=device)
    return torch.empty(batch, channels, height, width, memory_format=fmt, device=device)


def from_batch_last(y: torch.Tensor, like: torch.Tensor | torch.memory_format | None,
                    kernel: SparseKernel) -> torch.Tensor:
    """Inverse of `to_batch_last` for a result, in the memory format of `like` (the layer's input, or its
    `memory_format_of`)."""
    out = _empty_result(memory_format_of(like) if isinstance(like, torch.Tensor) else like, *y.shape, y.device)
    kernel.copy(y.view(y.shape[0], y.shape[1] * y.shape[2], y.shape[3]), _as_cpn(out))
    return out


SPARSE_LAYER_ATTR = "_ndsnn_sparse_layer"  # a module's plan while a batch-last `SparseExecution` runs

INFERENCE_CHUNK = 256  # samples per kernel call without autograd: bounds the layout copies' extra memory


def _forward_batch_last(layer: SparseLayer, x_bl: torch.Tensor, values: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's forward on a batch-last input: a new batch-last result `[Co, Ho, Wo, N]`."""
    layout = layer.layout
    h_out = (x_bl.shape[1] + 2 * layer.pad - layout.shape[2]) // layer.stride + 1
    w_out = (x_bl.shape[2] + 2 * layer.pad - layout.shape[3]) // layer.stride + 1
    out = torch.empty(layout.shape[0], h_out, w_out, x_bl.shape[3], device=x_bl.device)
    bias_values = (bias.detach().float().contiguous() if bias is not None
                   else torch.zeros(layout.shape[0], device=x_bl.device))
    layer.kernel.forward(x_bl, values, bias_values, layout, layer.stride, layer.pad, out)
    return out


def _sparse_inference(layer: SparseLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The forward alone (no autograd: evaluation), in chunks of the batch, each written straight into
    its slice of the result: the batch-last copies then cost a chunk's memory, not a second copy of an
    evaluation batch's activations (512 x T images) next to the dense-layout result."""
    spikes = is_spikes(x)
    values = layer.layout.values(layer.module.weight)
    out = None
    for start in range(0, x.shape[0], INFERENCE_CHUNK):
        out_bl = _forward_batch_last(layer, to_batch_last(x[start:start + INFERENCE_CHUNK], layer.kernel, spikes),
                                     values, bias)
        if out is None:
            out = _empty_result(memory_format_of(x), *out_bl.shape[:3], x.shape[0], x.device)
        layer.kernel.copy(out_bl.view(out_bl.shape[0], -1, out_bl.shape[3]),
                          _as_cpn(out[start:start + out_bl.shape[3]]))
    return out


def _batch_last_grad_dense(grad_bl: torch.Tensor, linear: bool) -> torch.Tensor:
    """A [N, C, H, W] (linear: [N, F]) view of a batch-last gradient, for the dense weight gradient."""
    return grad_bl.view(grad_bl.shape[0], grad_bl.shape[3]).t() if linear else grad_bl.permute(3, 0, 1, 2)


class _SparseLayerFunction(torch.autograd.Function):
    """Forward at the active weights, input gradient through the transposed sparse weight, weight
    gradient at the mask's positions (dense, by torch, when `layer.dense_weight_grad`). Used for the
    training calls only (`sparse_forward`), so both directions are clocked into `layer.sparse_s`.

    `spikes` None: x is a dense-layout map, transposed in (to uint8 when it is a spike map). Else x is
    already batch-last `[Ci, H, W, N]` (`kernels.batch_last`), `spikes` saying whether it holds 0/1 only
    (then the kernel and the saved copy read 1 byte). `out_format` is the result's: `BATCH_LAST`, or a
    dense memory format (`memory_format_of`); gradients come back in the layouts that went in."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                layer: SparseLayer, spikes: bool | None, out_format: object) -> torch.Tensor:
        started = time.perf_counter()
        if spikes is None:
            x_bl = to_batch_last(x, layer.kernel)                                # (Ci, H, W, N)
        else:
            x_bl = x.detach().to(torch.uint8) if spikes else x.detach()
        values = layer.layout.values(weight)
        out = _forward_batch_last(layer, x_bl, values, bias)                     # (Co, Ho, Wo, N)
        ctx.save_for_backward(x_bl, values)
        ctx.layer, ctx.x_format = layer, memory_format_of(x) if spikes is None else BATCH_LAST
        ctx.out_format = out_format
        ctx.weight_meta, ctx.has_bias = weight, bias is not None
        if out_format != BATCH_LAST:
            out = from_batch_last(out, out_format, layer.kernel)
        layer.sparse_s += time.perf_counter() - started
        return out

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        started = time.perf_counter()
        x_bl, values = ctx.saved_tensors
        layer, layout = ctx.layer, ctx.layer.layout
        linear = isinstance(layer.module, nn.Linear)
        if ctx.out_format == BATCH_LAST:
            gy = grad_output.float().contiguous()                                # (Co, Ho, Wo, N)
            grad_dense = _batch_last_grad_dense(gy, linear)
        else:
            gy, grad_dense = to_batch_last(grad_output.float(), layer.kernel), grad_output
        grad_x = grad_w = grad_b = None
        # Weight and bias gradients first, so gy is freed before the input gradient's layout copy: three
        # activation-sized tensors live at once (grad_output, grad_bl, grad_x), as in a dense backward + 1.
        if ctx.needs_input_grad[1]:
            weight = ctx.weight_meta
            if layer.dense_weight_grad:
                grad_w = _dense_weight_grad(layer, grad_dense, gy, x_bl, weight)
            else:
                grad_w = torch.zeros_like(weight)
                grad_w[layout.index] = layer.kernel.weight_grad(gy, x_bl, layout, layer.stride, layer.pad).to(
                    weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum((1, 2, 3))
        if ctx.needs_input_grad[0]:
            grad_bl = torch.empty(x_bl.shape, dtype=torch.float32, device=x_bl.device)
            layer.kernel.input_grad(gy, values, layout, layer.stride, layer.pad, grad_bl)
            del gy, grad_dense
            grad_x = grad_bl if ctx.x_format == BATCH_LAST else from_batch_last(grad_bl, ctx.x_format, layer.kernel)
        layer.sparse_s += time.perf_counter() - started
        return grad_x, grad_w, grad_b, None, None, None


class _BackwardClock(torch.autograd.Function):
    """Identity; in backward it starts (`start=True`, on a dense layer's output) or stops (on its weight,
    whose gradient the layer's backward node computes last) the layer's dense backward clock."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, layer: SparseLayer, start: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.layer, ctx.start = layer, start
        # an alias with t's own strides: view_as re-derives them, and a [Co, 1, k, k] channels-last weight
        # (ambiguous with Ci = 1) came back contiguous, so oneDNN wrote the layer's output, and every layer
        # after it, in NCHW where the dense run stays channels-last (pooling 5x slower, BN + LIF slower)
        return t.as_strided(t.size(), t.stride(), t.storage_offset())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        layer = ctx.layer
        if ctx.start:
            layer._clock = time.perf_counter()
        elif layer._clock:
            layer.dense_s += time.perf_counter() - layer._clock
            layer._clock = 0.0
        return grad, None, None


def _timed_dense_forward(layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
    """The module's dense forward, its forward and backward time added to `layer.dense_s`."""
    module = layer.module
    started = time.perf_counter()
    weight = _BackwardClock.apply(module.weight, layer, False)
    if isinstance(module, nn.Conv2d):
        out = module._conv_forward(x, weight, module.bias)
    else:
        out = F.linear(x, weight, module.bias)
    out = _BackwardClock.apply(out, layer, True)
    layer.dense_s += time.perf_counter() - started
    return out


def _tap_weight_grad(gy: torch.Tensor, x_bl: torch.Tensor, kernel: tuple[int, int], pad: int) -> torch.Tensor:
    """dL/dW of a stride-1 conv from batch-last maps, one batched GEMM per tap: W[:, :, i, j] is the sum over
    output rows of gy's `[Co, Wo*N]` row times the `[Ci, Wo*N]` input row shifted by (i, j), both views of
    the padded batch-last memory (no im2col). 0.61x oneDNN's `conv2d_weight` over VGG-16's shapes at N = 160
    on the 2-core host (its transposes to NCHW included), 0.32x on the 2x2 maps."""
    channels_out, height_out, width_out, batch = gy.shape
    x = F.pad(x_bl.float(), (0, 0, pad, pad, pad, pad))            # (Ci, Hp, Wp, N)
    rows = gy.view(channels_out, height_out, width_out * batch).transpose(0, 1)           # (Ho, Co, Wo*N)
    grad = torch.empty(channels_out, x.shape[0], *kernel, device=gy.device)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            shifted = x[:, i:i + height_out, j:j + width_out].flatten(2).transpose(0, 1)  # (Ho, Ci, Wo*N)
            grad[:, :, i, j] = torch.bmm(rows, shifted.transpose(1, 2)).sum(0)
    return grad


def _dense_weight_grad(layer: SparseLayer, grad_output: torch.Tensor, gy: torch.Tensor, x_bl: torch.Tensor,
                       weight: torch.Tensor) -> torch.Tensor:
    """The full weight gradient (every position: growth ranks the inactive ones): per-tap GEMMs on the
    batch-last maps (`_tap_weight_grad`) for a stride-1 conv, else torch's dense kernels on `grad_output`
    (the dense-layout gradient)."""
    if isinstance(layer.module, nn.Linear):
        x = x_bl.float().view(x_bl.shape[0], x_bl.shape[3]).t()      # (N, F)
        return (grad_output.float().t() @ x).to(weight.dtype)
    if layer.stride == 1:
        grad = _tap_weight_grad(gy, x_bl, tuple(weight.shape[2:]), layer.pad)
    else:
        # Both operands NCHW: torch 2.14's CPU (oneDNN) backward of a channels-last 1x1 stride-2 conv with few
        # channels (6 -> 8) returns wrong weight gradients and corrupts the heap (seen in 15 of 20 trials;
        # never at 16 channels or more, nor with NCHW operands). NCHW costs a copy here, at update steps only.
        grad = torch.nn.grad.conv2d_weight(x_bl.float().permute(3, 0, 1, 2).contiguous(), weight.shape,
                                           grad_output.float().contiguous(), stride=layer.stride, padding=layer.pad)
    return grad.to(weight.dtype).contiguous(memory_format=torch.channels_last if weight.is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format)


def _fits(layer: SparseLayer, x: torch.Tensor) -> bool:
    """The call can run on the layer's kernel: one is planned, the input is on a device its registry entry
    lists (the layout was built on the weight's device), fp32 or bf16, and the weight is fp32."""
    return (layer.active and x.device.type in KERNELS[layer.built].devices
            and x.device == layer.layout.device and x.dtype in (torch.float32, torch.bfloat16)
            and layer.module.weight.dtype == torch.float32)


def sparse_forward(layer: SparseLayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward: its sparse kernel when one is planned and the call fits it (`_fits`), else the
    module's own dense forward. Under autocast on the input's device the kernel computes in fp32 from the
    same values (spikes are exact in bf16) and returns the autocast dtype, as the dense op would.
    Training calls on the CPU are clocked (`SparseLayer.sparse_s` / `dense_s`)."""
    module = layer.module
    if not _fits(layer, x):
        if x.device.type == "cpu" and torch.is_grad_enabled() and module.weight.requires_grad:
            return _timed_dense_forward(layer, x)
        return type(module).forward(module, x)
    layer.calls += 1
    if x.dim() > 2 and isinstance(module, nn.Linear):  # [..., F]: the kernel takes [N, F]
        return sparse_forward(layer, x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if x.dtype != torch.float32:
        x = mark_spikes(x.float()) if is_spikes(x) else x.float()
    with torch.autocast(device, enabled=False):  # the torch-sparse kernel's ops must not run in bf16
        if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
            out = _SparseLayerFunction.apply(x, module.weight, module.bias, layer, None, memory_format_of(x))
        else:
            out = _sparse_inference(layer, x, module.bias)
    return out.to(autocast) if autocast is not None else out


def batch_last_fits(layer: SparseLayer, x: torch.Tensor) -> bool:
    """`sparse_forward` would run the kernel on this call (x: dense or batch-last, fp32), and the result may
    stay batch-last: no autocast on the device (under autocast the dense path keeps its dtype contract)."""
    return _fits(layer, x) and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)


def sparse_forward_batch_last(layer: SparseLayer, x: torch.Tensor, spikes: bool | None) -> torch.Tensor:
    """The layer's kernel forward with a batch-last result `[Co, Ho, Wo, N]` (`[F, 1, 1, N]` for a linear
    layer): x is dense (`spikes` None) or batch-last. Callers check `batch_last_fits` first."""
    layer.calls += 1
    module = layer.module
    if torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad):
        return _SparseLayerFunction.apply(x, module.weight, module.bias, layer, spikes, BATCH_LAST)
    with torch.no_grad():
        x_bl = to_batch_last(x, layer.kernel) if spikes is None else (x.to(torch.uint8) if spikes else x)
        return _forward_batch_last(layer, x_bl, layer.layout.values(module.weight), module.bias)


class SparseExecution:
    """The sparse-kernel plan of one model: which layers run which kernel, rebuilt at mask updates.

    The layers' forwards are swapped only inside `with execution:`, which gives every
    module its own forward back on any exit, a raise included: a failed run leaves no patched model."""

    def __init__(self, model: nn.Module, masks: Any, mode: str, device_type: str,
                 layout: str = BATCH_LAST) -> None:
        if layout not in SPARSE_LAYOUTS:
            raise ValueError(f"unknown sparse layout {layout!r} (known: {', '.join(SPARSE_LAYOUTS)})")
        self.masks, self.mode, self.device_type, self.layout = masks, mode, device_type, layout
        self.available = available_kernels()
        self.rebuild_s = 0.0
        self.rebuilds = 0
        self.layers: dict[str, SparseLayer] = {}
        self._kernels: dict[str, SparseKernel] = {}
        self.calibrator = Calibrator() if mode == CALIBRATE else None
        params = masks.params if masks is not None else {}
        for name in params:
            module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if name.endswith("weight") and supported(module):
                layer = SparseLayer(name, module)
                if isinstance(module, nn.Conv2d):
                    layer.stride, layer.pad = module.stride[0], int(module.padding[0])
                self.layers[name] = layer

    def __enter__(self) -> SparseExecution:
        """Every planned layer's forward runs `sparse_forward` until the block exits; in the batch-last layout
        the layer also carries its plan (`SPARSE_LAYER_ATTR`), so the models' batch-last path
        (`kernels.batch_last`) can hand it batch-last maps."""
        for layer in self.layers.values():
            layer.module.forward = lambda x, layer=layer: sparse_forward(layer, x)
            if self.layout == BATCH_LAST:
                layer.module.__dict__[SPARSE_LAYER_ATTR] = layer
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def rebuild(self) -> dict[str, str]:
        """Choose each layer's kernel at its current density and build the layouts; {param: kernel}."""
        started = time.perf_counter()
        probes = []
        for name, layer in self.layers.items():
            mask = self.masks.masks[name]
            layer.density = float(mask.sum()) / mask.numel()
            kernel_name, probe = self._decide(layer)
            layer.kernel_name = kernel_name
            layer.built = built = kernel_name if kernel_name != DENSE else self._candidate() if probe else DENSE
            if built == DENSE:
                layer.kernel, layer.layout = None, None
                continue
            if probe:
                probes.append(name)
            if built not in self._kernels:
                self._kernels[built] = create_kernel(built)
            layer.kernel, layer.layout = self._kernels[built], build_layout(mask)
            layer.use_kernel = kernel_name != DENSE
        if self.calibrator is not None:
            self.calibrator.start(probes)
        self.rebuild_s += time.perf_counter() - started
        self.rebuilds += 1
        return self.assignment()

    def _candidate(self) -> str:
        """The kernel auto/calibrate would run a fully sparse layer on here, or "dense"."""
        return choose("auto", 0.0, self.device_type, self.available)

    def _decide(self, layer: SparseLayer) -> tuple[str, bool]:
        """(the layer's kernel now, whether a calibration probe times it both ways)."""
        if self.calibrator is None:
            return choose(self.mode, layer.density, self.device_type, self.available), False
        candidate = self._candidate()
        if candidate == DENSE:
            return DENSE, False
        use, probe = self.calibrator.decide(layer.name, layer.density, KERNELS[candidate].crossover_density)
        return (candidate if use else DENSE), probe

    def before_step(self) -> None:
        """Calibration: the probed layers take this step's path (kernel or dense) and their clocks are read."""
        if self.calibrator is None or not self.calibrator.probing:
            return
        dense = self.calibrator.probe_dense()
        for name in self.calibrator.probing:
            self.layers[name].use_kernel = not dense
        self.calibrator.before_step(self.layers)

    def after_step(self, step: int) -> dict[str, Any] | None:
        """Calibration: sample the step; when a probe ends, decide its layers and return the metrics record
        ("kernel_calibration"), else None. Steps with dense weight gradients are not sampled."""
        if self.calibrator is None or not self.calibrator.probing:
            return None
        probed = list(self.calibrator.probing)
        sampled = not any(layer.dense_weight_grad for layer in self.layers.values())
        done = self.calibrator.after_step(self.layers, sampled, {n: self.layers[n].density for n in probed})
        if done is None:
            return None
        for name in probed:
            layer = self.layers[name]
            if name in done:
                layer.kernel_name = self._candidate() if done[name].kernel_wins else DENSE
            layer.use_kernel = layer.kernel_name != DENSE
            if not layer.use_kernel:
                layer.kernel, layer.layout, layer.built = None, None, DENSE
        return calibration_record(step, done, self.assignment())

    def assignment(self) -> dict[str, str]:
        return {name: layer.kernel_name for name, layer in self.layers.items()}

    def set_dense_weight_grad(self, dense: bool) -> None:
        for layer in self.layers.values():
            layer.dense_weight_grad = dense

    def remove(self) -> None:
        """Give every layer its own forward back (the plan and its clocks stay: `summary` after a run)."""
        for layer in self.layers.values():
            layer.module.__dict__.pop("forward", None)
            layer.module.__dict__.pop(SPARSE_LAYER_ATTR, None)

    def summary(self) -> dict[str, Any]:
        kernels = self.assignment()
        return {"mode": self.mode, "layout": self.layout, "available": list(self.available), "layers": kernels,
                "sparse_layers": sum(k != DENSE for k in kernels.values()), "rebuilds": self.rebuilds,
                "rebuild_s": self.rebuild_s,
                "sparse_layers_s": sum(layer.sparse_s for layer in self.layers.values()),
                "dense_layers_s": sum(layer.dense_s for layer in self.layers.values()),
                "layer_s": {name: {"sparse": layer.sparse_s, "dense": layer.dense_s}
                            for name, layer in self.layers.items()},
                **({"calibration": {name: m.to_record() for name, m in self.calibrator.measured.items()}}
                   if self.calibrator is not None else {})}
