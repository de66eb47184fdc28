"""The demo's figure: training loss and parameter divergence per optimizer step.

One column per compared run, so that no curve can hide another: on top, the
run's loss over its reference's (the reference a wide pale band, the run a thin
line with markers on it, so both show even where they coincide); below, the
run's distance from its reference on a log scale shared by all columns, with
the contract's tolerance as a dashed line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from truebatch.demos.demo import Row

# Divergences of exactly 0 cannot sit on a log axis; they are drawn at this floor.
ZERO_FLOOR = 1e-18
REFERENCE_COLOR = "0.55"
MARKERS = 12  # markers per curve: enough to tell a line from a band, few enough to read it


def plot_runs(rows: list[Row], title: str, path: Path, tolerance: float = 1e-12) -> Path:
    """Save :func:`figure` as a PNG at ``path`` (parent folders are created); return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure(rows, title, tolerance).savefig(path, dpi=100)
    return path


def figure(rows: list[Row], title: str, tolerance: float = 1e-12) -> Figure:
    """One column per compared row (a row with a reference).

    Top of each column: the row's training loss per optimizer step (the mean
    over the window's items) over its reference's. Bottom: the row's maximum
    relative parameter difference from its reference per step (log scale,
    shared by the columns), with ``tolerance`` as a dashed line.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    by_label = {row.spec.label: row for row in rows}
    compared = [row for row in rows if row.spec.reference is not None]
    result = Figure(figsize=(4.1 * len(compared) + 0.6, 7.4))
    axes = result.subplots(2, len(compared), sharex=True, sharey="row", squeeze=False)
    for column, row in enumerate(compared):
        reference = by_label[row.spec.reference]
        color = f"C{column + 1}"
        steps = range(1, len(row.run.losses) + 1)
        every = max(1, len(steps) // MARKERS)
        losses, divergence = axes[0][column], axes[1][column]
        losses.plot(
            steps,
            reference.run.losses,
            color=REFERENCE_COLOR,
            linewidth=5,
            alpha=0.45,
            solid_capstyle="butt",
            label=f"{reference.spec.label}: {reference.spec.method_text}",
        )
        # The run: a thin line with markers, the same in both panels of its column.
        line = dict(color=color, linewidth=1.1, marker="o", markersize=3.5, markevery=every)
        losses.plot(
            steps, row.run.losses, **line, label=f"{row.spec.label}: {row.spec.method_text}"
        )
        losses.set_title(f"row {row.spec.label}: {row.spec.shows}", fontsize="medium")
        losses.legend(fontsize="small", loc="upper right")
        values = [max(value, ZERO_FLOOR) for value in row.run.divergence]
        divergence.plot(
            steps, values, **line, label=f"row {row.spec.label} vs row {reference.spec.label}"
        )
        divergence.axhline(
            tolerance,
            color="black",
            linestyle="--",
            linewidth=0.9,
            label=f"contract: {tolerance:g}",
        )
        divergence.set(xlabel="optimizer step", yscale="log")
        divergence.legend(fontsize="small", loc="center right")
    axes[0][0].set_ylabel("training loss (window mean)")
    axes[1][0].set_ylabel("max relative parameter difference\nfrom the reference")
    bottom, top = axes[1][0].get_ylim()
    axes[1][0].set_ylim(min(bottom, tolerance / 1e4), max(top, 10.0))
    result.suptitle(title, fontsize="medium", wrap=True)
    result.tight_layout()
    return result
