"""Text output and argument types shared by ``truebatch demo`` and ``truebatch bench``."""

from __future__ import annotations

import argparse


def table(lines: list[tuple[str, ...]]) -> str:
    """Left-aligned columns, two spaces apart, a rule under the first line (the header)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        for line in lines
    ]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in text)


def positive_int(text: str) -> int:
    """An argparse ``type`` accepting integers >= 1."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}; pass 1 or more")
    return value
