"""Text output, progress and argument types shared by ``truebatch demo`` and ``truebatch bench``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TextIO

from tqdm import tqdm


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


class Progress:
    """Progress of one stage of long work: a bar on a terminal, one line elsewhere.

    On a terminal the stage shows a live ``tqdm`` bar that disappears when it
    ends. When ``stream`` is not a terminal (a log file, a pipe, CI), a bar's
    redraws would flood the log, so nothing is written until the stage ends and
    then one line: ``"<description>: <n> <unit>s in <t> s"``.

    Use it as a context manager, or call :meth:`close` when the stage ends.

    Example:
        >>> import io
        >>> log = io.StringIO()
        >>> with Progress(3, "training", "step", stream=log) as progress:
        ...     for _ in range(3):
        ...         progress.update()
        >>> log.getvalue().startswith("training: 3 steps in ")
        True
    """

    def __init__(self, total: int, description: str, unit: str, *, stream: TextIO | None = None):
        self.description, self.unit = description, unit
        self.stream = sys.stderr if stream is None else stream
        self.interactive = self.stream.isatty()
        self.done = 0
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            leave=False,
            file=self.stream,
            disable=not self.interactive,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.done += n
        self.bar.update(n)

    def note(self, text: str) -> None:
        """What is running now, shown beside the bar (terminal only)."""
        if self.interactive:
            self.bar.set_postfix_str(text)

    def close(self) -> None:
        """End the stage: the bar disappears, or the one line is written."""
        self.bar.close()
        if not self.interactive:
            seconds = time.perf_counter() - self.started
            unit = self.unit if self.done == 1 else f"{self.unit}s"
            print(f"{self.description}: {self.done} {unit} in {seconds:.1f} s", file=self.stream)
            self.stream.flush()
