"""What :func:`truebatch.check` returns: :class:`Report`, :class:`Finding`, and their text.

``print(report)`` groups four or more findings of one kind and one fix into
one row ("20 BatchNorm layers (conv1.bn1, layer1.0.bn1, … 18 more)") and prints
the fix once; ``report.format(verbose=True)`` and ``report.to_dict()`` list every
finding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["FIXES", "Finding", "Kind", "Report"]

Kind = Literal[
    "batchnorm",
    "dropout",
    "random_op",
    "mixes_samples",
    "loss_mixes_samples",
    "loss_not_additive",
    "buffer_mismatch",
]

FIXES: dict[str, str] = {
    "batchnorm": (
        "tb.nn.convert_batchnorm(model, ghost_batch_size=g) with g dividing your micro-batch "
        "size, or tb.nn.freeze_batchnorm(model) to normalize with running statistics"
    ),
    "ghost_batchnorm": "use micro-batch sizes that are multiples of its ghost_batch_size",
    "dropout": "tb.nn.convert_dropout(model): masks drawn per sample, the same for any split",
    "random_op": (
        "draw its randomness per sample from the sample's global index, as "
        "tb.nn.SplitInvariantDropout does, or keep it out of the training forward"
    ),
    "attention_dropout": (
        "its attention dropout is functional (F.dropout or scaled_dot_product_attention("
        "dropout_p=...)), so tb.nn.convert_dropout cannot reach it: set the attention dropout "
        "probability to 0 (config.attention_probs_dropout_prob, config.attention_dropout or "
        "config.attn_pdrop), or truebatch.integrations.transformers."
        "convert_attention_dropout(model) for split-invariant attention dropout"
    ),
    "mixes_samples": (
        "compute it per sample (LayerNorm/GroupNorm instead of batch statistics, attention "
        "over the sequence, not the batch), or per fixed chunk as tb.nn.GhostBatchNorm1d does"
    ),
    "loss_mixes_samples": (
        "the loss compares samples with each other (in-batch negatives, batch statistics of "
        "the outputs): acc.step_cached(micro_batches, encode_fn, loss_fn) computes it on the "
        "whole window's outputs, exactly"
    ),
    "loss_not_additive": (
        "return the SUM over items (reduction='sum') and let truebatch divide by N, or "
        "return (loss_sum, count)"
    ),
    "buffer_batchnorm": (
        "tb.nn.convert_batchnorm(model, ghost_batch_size=g) updates running statistics "
        "the same for any split whose sizes are multiples of g; or tb.nn.freeze_batchnorm(model)"
    ),
    "buffer_mismatch": (
        "update the buffer from each sample independently, or once per window from the whole "
        "effective batch, not once per forward call"
    ),
}

# How a group of findings of one kind is named in print(report).
_GROUPS: dict[str, str] = {
    "batchnorm": "{n} BatchNorm layers",
    "dropout": "{n} dropout layers",
    "random_op": "{n} modules drawing random numbers",
    "mixes_samples": "{n} modules mixing samples",
    "buffer_mismatch": "buffers of {n} modules",
}
_NAMES_SHOWN = 2
_GROUP_FROM = 4  # findings of one kind and fix that share a row in print(report)


@dataclass(frozen=True)
class Finding:
    """One reason accumulation differs from the big batch.

    Attributes:
        module: module path as in ``model.named_modules()`` (the model itself by
            its class name; ``"loss_fn"`` for the loss).
        kind: ``batchnorm``, ``dropout``, ``random_op``, ``mixes_samples``
            (inside the model), ``loss_mixes_samples`` (the loss compares the
            model's outputs across samples), ``loss_not_additive`` or
            ``buffer_mismatch``.
        effect: size of the effect, a relative difference described by ``measure``.
        measure: what ``effect`` measures, and on which split.
        fix: one line naming the truebatch tool that removes the cause.
    """

    module: str
    kind: Kind
    effect: float
    measure: str
    fix: str


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`truebatch.check`.

    Attributes:
        equivalent: every split's gradient matches the full batch's within
            ``tolerance`` (relative, per parameter tensor) and there is no
            finding. A finding is a cause of difference even when this run
            happened to agree (e.g. a lone dropout drawing, on the CPU
            generator, the same numbers whole or split).
        tolerance: 1e-12 in float64, 1e-5 in float32.
        dtype: the dtype the check ran in, e.g. ``"float64"``.
        batch_size: samples in the checked batch.
        max_relative_difference: micro-batch size -> the largest relative
            gradient difference over parameter tensors
            (:func:`truebatch.max_relative_difference`).
        worst_parameters: up to five ``(name, relative difference)``, largest first,
            each the maximum over splits.
        findings: the culprits found, in forward order.

    Examples:
        >>> print(report)                  # findings of one kind and fix grouped
        >>> print(report.format(verbose=True))  # every finding on its own row
    """

    equivalent: bool
    tolerance: float
    dtype: str
    batch_size: int
    max_relative_difference: dict[int, float]
    worst_parameters: list[tuple[str, float]]
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict with every finding; non-finite numbers become
        the strings ``"inf"``/``"nan"``."""
        return {
            "equivalent": self.equivalent,
            "tolerance": self.tolerance,
            "dtype": self.dtype,
            "batch_size": self.batch_size,
            "max_relative_difference": {
                str(size): _json_number(value)
                for size, value in self.max_relative_difference.items()
            },
            "worst_parameters": [
                {"name": name, "relative_difference": _json_number(value)}
                for name, value in self.worst_parameters
            ],
            "findings": [
                {**asdict(finding), "effect": _json_number(finding.effect)}
                for finding in self.findings
            ],
        }

    def format(self, *, verbose: bool = False) -> str:
        """The report as text: the splits, the worst parameters and the findings.

        Args:
            verbose: list every finding on its own row with its fix; by default
                four or more findings of one kind and one fix share a row that
                names the first two modules and how many more, with the fix once.

        Returns:
            the text ``print(report)`` shows (with ``verbose=False``).
        """
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        lines = [
            f"truebatch check: {verdict} (batch of {self.batch_size}, {self.dtype}, "
            f"tolerance {self.tolerance:.0e} relative per tensor)",
            "",
        ]
        lines += _table(
            ["micro-batch size", "micro-batches", "max relative gradient difference", ""],
            [
                [
                    str(size),
                    str(math.ceil(self.batch_size / size)),
                    f"{value:.2e}",
                    "ok" if value <= self.tolerance else "FAIL",
                ]
                for size, value in self.max_relative_difference.items()
            ],
            right=(0, 1, 2),
        )
        lines += [""]
        lines += _table(
            ["worst parameters", "max relative difference"],
            [[name, f"{value:.2e}"] for name, value in self.worst_parameters],
            right=(1,),
        )
        lines += [""]
        if not self.findings:
            lines.append("findings: none")
            return "\n".join(lines)
        groups = [[f] for f in self.findings] if verbose else _grouped(self.findings)
        rows = [_row(group) for group in groups]
        table = _table(["findings", "kind", "effect", "measured as"], [r[:4] for r in rows])
        lines.append(table[0])
        indent = " " * (len(table[0]) - len(table[0].lstrip()) + 2)
        for line, row in zip(table[1:], rows, strict=True):
            lines += [line, f"{indent}fix: {row[4]}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _grouped(findings: list[Finding]) -> list[list[Finding]]:
    """Findings in order, those of one kind and fix together where there are at least
    ``_GROUP_FROM`` of them (fewer read as well one per row), at the first one's place."""
    groups: dict[tuple[str, str], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.kind, finding.fix), []).append(finding)
    rows: list[list[Finding]] = []
    for finding in findings:
        group = groups[finding.kind, finding.fix]
        if len(group) < _GROUP_FROM:
            rows.append([finding])
        elif finding is group[0]:
            rows.append(group)
    return rows


def _row(group: list[Finding]) -> list[str]:
    worst = max(group, key=lambda f: f.effect)
    if len(group) == 1 or worst.kind not in _GROUPS:
        name = ", ".join(f.module for f in group)
    else:
        shown = [f.module for f in group]
        if len(shown) > _NAMES_SHOWN + 1:
            shown = [*shown[:_NAMES_SHOWN], f"… {len(group) - _NAMES_SHOWN} more"]
        label = _GROUPS[worst.kind]
        if worst.fix == FIXES["buffer_batchnorm"]:
            label = "buffers of {n} BatchNorm layers"
        name = f"{label.format(n=len(group))} ({', '.join(shown)})"
    measure = worst.measure if len(group) == 1 else f"largest: {worst.measure}"
    return [name, worst.kind, f"{worst.effect:.2e}", measure, worst.fix]


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _table(header: list[str], rows: list[list[str]], right: tuple[int, ...] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return ("  " + "  ".join(padded)).rstrip()

    return [line(header), *(line(r) for r in rows)]
