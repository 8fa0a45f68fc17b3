"""Measured kernel choices (`[train] sparse_kernels = "calibrate"`): each layer timed both ways on the run's
own training steps, instead of one machine's crossover density.

The registry's crossover (`KernelInfo.crossover_density`) was measured on one host and on VGG-16's shapes;
where the dense kernels are faster (oneDNN on a newer CPU) or a layer's shape differs (few channels, large
maps), the density at which the kernel wins moves by several x. A probe runs the layers whose choice is
open on their kernel for one step and dense for the next, `ROUNDS` times each, keeps each layer's fastest
time both ways (forward + backward, `SparseLayer` clocks) and decides on them. The crossover that implies,
d * dense / sparse (a kernel's time ~ its density), decides later rebuilds; a layer left dense is probed
again once its density has fallen to `REPROBE_FACTOR` of the probed one, a layer the kernel won stays on it
(lower density only makes the kernel cheaper). Steps that also compute the dense weight gradient (before a
drop-and-grow update) are not sampled. Every probe's numbers are returned as a "kernel_calibration"
record for metrics.jsonl. On several ranks the times are summed over ranks first, so all decide alike.
Not deterministic across runs: a layer's path (and so the rounding of its sums) follows the host's clocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ndsnn_cli import distributed

ROUNDS = 2               # sparse + dense steps per probe, each; the fastest of each way counts
MAX_DENSITY = 0.5        # layers above this are not probed (the kernels do not win there on any shape seen)
REPROBE_FACTOR = 0.5     # a layer left dense is probed again at this fraction of its last probe's density


@dataclass(frozen=True)
class Measurement:
    """One layer's probe: its density and fastest forward + backward seconds on each path."""

    density: float
    sparse_s: float
    dense_s: float

    @property
    def crossover(self) -> float:
        """The density at which the kernel would match dense, its time taken as proportional to density."""
        return self.density * self.dense_s / self.sparse_s

    @property
    def kernel_wins(self) -> bool:
        return self.sparse_s < self.dense_s

    def to_record(self) -> dict[str, float]:
        return {"density": self.density, "sparse_s": self.sparse_s, "dense_s": self.dense_s,
                "crossover": self.crossover}


class Calibrator:
    """The probes of one `SparseExecution`: which layers to time, the per-step switching, the results."""

    def __init__(self) -> None:
        self.measured: dict[str, Measurement] = {}
        self.probing: list[str] = []
        self._samples: dict[str, tuple[list[float], list[float]]] = {}
        self._phase = 0
        self._before: dict[str, tuple[float, float]] = {}

    def decide(self, name: str, density: float, default_crossover: float) -> tuple[bool, bool]:
        """(run the kernel now, probe this layer) for a layer at `density`."""
        last = self.measured.get(name)
        if last is None:
            return density <= default_crossover, density <= MAX_DENSITY
        if last.kernel_wins:
            return True, False
        return density <= last.crossover, density <= REPROBE_FACTOR * last.density

    def start(self, names: list[str]) -> None:
        """Probe `names` from the next step on (a probe under way is dropped: the layouts changed)."""
        self.probing = list(names)
        self._samples = {name: ([], []) for name in names}
        self._phase = 0

    def probe_dense(self) -> bool:
        """Whether the probed layers run dense on the coming step (sparse first: its JIT warm-up then
        lands in a sample that the second sparse one replaces)."""
        return self._phase % 2 == 1

    def before_step(self, layers: dict[str, Any]) -> None:
        self._before = {name: (layers[name].sparse_s, layers[name].dense_s) for name in self.probing}

    def after_step(self, layers: dict[str, Any], sampled: bool,
                   densities: dict[str, float]) -> dict[str, Measurement] | None:
        """Record the step's per-layer times (unless not `sampled`); the measurements when the probe ends."""
        if not self.probing or not sampled:
            return None
        dense = self.probe_dense()
        for name in self.probing:
            sparse_s, dense_s = layers[name].sparse_s, layers[name].dense_s
            before = self._before[name]
            self._samples[name][1 if dense else 0].append(dense_s - before[1] if dense else sparse_s - before[0])
        self._phase += 1
        if self._phase < 2 * ROUNDS:
            return None
        times = [min(t) for name in self.probing for t in self._samples[name]]
        times = distributed.sum_values(*times)   # every rank decides on the same numbers
        done = {}
        for index, name in enumerate(self.probing):
            sparse_s, dense_s = times[2 * index], times[2 * index + 1]
            if sparse_s > 0 and dense_s > 0:
                done[name] = self.measured[name] = Measurement(densities[name], sparse_s, dense_s)
        self.probing = []
        return done


def calibration_record(step: int, measured: dict[str, Measurement], kernels: dict[str, str]) -> dict[str, Any]:
    """The metrics.jsonl record of one probe: per layer its density, both times, the implied crossover and
    the kernel it runs from now on."""
    return {"kind": "kernel_calibration", "step": step,
            "layers": {name: {**m.to_record(), "kernel": kernels[name]} for name, m in measured.items()}}
