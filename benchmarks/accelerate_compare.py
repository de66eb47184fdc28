"""Accelerate's gradient accumulation vs truebatch: now a part of ``truebatch bench``.

``truebatch bench`` (:mod:`truebatch.demos.bench`) measures Accelerate's
``accumulate()`` loop and its variable-size recipe next to truebatch, a
correct hand-written loop, the user reports' loops and Lightning, in one
table. This script keeps the old command working::

    python benchmarks/accelerate_compare.py [--quick]
"""

from __future__ import annotations

import sys

from truebatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
