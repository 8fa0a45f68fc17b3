"""Conventions every ndsnn figure shares: sparsity drawn as density 1 - s on a log axis, PNG bytes out.

At sparsities 0.9, 0.95, 0.98, 0.99 the densities are 0.1, 0.05, 0.02, 0.01: spread out on a log axis,
crowded into one edge of a linear one. The axis is ticked and labelled with the sparsities themselves and
inverted, so sparsity still grows to the right (or upwards). matplotlib (the `plot` extra) is imported
only when a figure is drawn, never on the CLI's start-up path.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

SPARSITY_AXIS_LABEL = "sparsity (log scale of density 1 − s)"


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_density_axis(ax: Any, which: str, sparsities: Iterable[float], label: str = SPARSITY_AXIS_LABEL) -> None:
    """Make `ax`'s `which` ("x" or "y") axis, on which data are densities 1 - s, a log axis ticked at `sparsities`."""
    from matplotlib.ticker import NullLocator

    ticks = sorted(set(sparsities))
    if not ticks:
        return
    axis = ax.xaxis if which == "x" else ax.yaxis
    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"set_{which}ticks")([1 - s for s in ticks], labels=[f"{s:g}" for s in ticks])
    axis.set_minor_locator(NullLocator())  # log minor ticks would be density values, unlabelled
    getattr(ax, f"set_{which}label")(label)
    if not getattr(ax, f"{which}axis_inverted")():
        getattr(ax, f"invert_{which}axis")()


def spread_ticks(required: Iterable[float], optional: Iterable[float], min_ratio: float = 1.5) -> list[float]:
    """`required` sparsities plus those `optional` ones whose density is at least `min_ratio` away (as a ratio)
    from every tick already chosen, so that no two labels overlap on a log axis."""
    ticks = sorted(set(required))
    for s in optional:
        if all(max(1 - s, 1 - t) / min(1 - s, 1 - t) >= min_ratio for t in ticks):
            ticks.append(s)
    return sorted(ticks)


def png_bytes(fig: Any, dpi: int = 120) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    return buffer.getvalue()
