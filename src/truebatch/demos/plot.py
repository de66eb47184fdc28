"""The demo's figure: training loss and parameter divergence per optimizer step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from truebatch.demos.demo import Row

# Divergences of exactly 0 cannot sit on a log axis; they are drawn at this floor.
ZERO_FLOOR = 1e-18


def plot_runs(rows: list[Row], title: str, path: Path, tolerance: float = 1e-12) -> Path:
    """Save a PNG with two panels and return its path (parent folders are created).

    Left: each run's training loss per optimizer step (the mean over the
    window's items). Right: each compared run's relative parameter difference
    from its reference per step (log scale), with the contract's tolerance as
    a dashed line.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    figure = Figure(figsize=(13, 5.2))
    losses, divergence = figure.subplots(1, 2)
    for index, row in enumerate(rows):
        label = f"{row.spec.label}: {row.spec.method_text}"
        color = f"C{index}"  # the same color for a row in both panels
        style = "--" if row.spec.reference is None else "-"
        steps = range(1, len(row.run.losses) + 1)
        losses.plot(steps, row.run.losses, style, color=color, label=label)
        if row.spec.reference is not None:
            values = [max(value, ZERO_FLOOR) for value in row.run.divergence]
            divergence.plot(steps, values, color=color, label=f"{label} (vs {row.spec.reference})")
    losses.set(xlabel="optimizer step", ylabel="training loss (window mean)", title="Loss")
    losses.legend(fontsize="small")
    divergence.axhline(tolerance, color="black", linestyle="--", linewidth=0.8)
    divergence.annotate(f"contract: {tolerance:g}", (1, tolerance), va="bottom", fontsize="small")
    divergence.set(
        xlabel="optimizer step",
        ylabel="max relative parameter difference",
        title="Distance from the big batch",
        yscale="log",
    )
    divergence.legend(fontsize="small")
    figure.suptitle(title, fontsize="medium", wrap=True)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
