"""The documentation cannot rot: the site builds in strict mode, every public name
has an API entry, and every python block of every page runs and prints what the
page says it prints.

Conventions of the pages under docs/:

- the fenced ``python`` blocks of a page run in order in one namespace, like
  the cells of a notebook (a page may open with a setup block the others use);
- a line ``<!-- not-run: <reason> -->`` right before a block marks it as shown
  but not run (it needs torchrun, a GPU...); it must still compile and shows
  no Output block;
- a fenced ``text title="Output"`` block right after a python block is what
  that block prints, and a block that prints must have one. Printed numbers
  must agree to the last digit shown; numbers below 1e-6 in magnitude are
  rounding noise (they differ between machines) and only need to be below 1e-6
  on both sides.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

import truebatch as tb
import truebatch.integrations

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
# Pages in the nav of mkdocs.yml, in order ("Title: path.md" entries).
NAV = re.findall(r"^\s*- [^:\n]+: (\S+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.MULTILINE)
NOISE = 1e-6
OPTIONAL = {"transformers", "lightning", "accelerate", "sklearn", "matplotlib"}

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>.*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


@dataclass(frozen=True)
class Block:
    """One fenced python block of a page, with its marker and its expected output."""

    page: Path
    line: int
    code: str
    not_run: str | None
    output: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def _fences(page: Path) -> list[tuple[int, int, str, str]]:
    """``(first line, last line, info, body)`` of every fenced block, 1-based lines."""
    lines = page.read_text().splitlines()
    found, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = index + 1
        while end < len(lines) and lines[end].strip() != fence:
            end += 1
        body = "\n".join(line.removeprefix(indent) for line in lines[index + 1 : end])
        found.append((index + 1, end + 1, opening["info"].strip(), body))
        index = end + 1
    return found


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    fences = _fences(page)
    blocks = []
    for position, (first, last, info, body) in enumerate(fences):
        if info.split(" ")[0] != "python":
            continue
        before = next((line for line in reversed(lines[: first - 1]) if line.strip()), "")
        marker = NOT_RUN.match(before)
        output = None
        if position + 1 < len(fences):
            next_first, _, next_info, next_body = fences[position + 1]
            between = lines[last : next_first - 1]
            if next_info == 'text title="Output"' and not any(s.strip() for s in between):
                output = next_body
        blocks.append(Block(page, first, body, marker["reason"] if marker else None, output))
    return blocks


BLOCKS = {page: _blocks(page) for page in PAGES}
PAGES_WITH_PYTHON = [p for p in PAGES if BLOCKS[p]]


def _decimals_unit(text: str) -> float:
    """One unit of the last digit printed: '0.315' -> 0.001, '3.2e-01' -> 0.01, '12' -> 0."""
    mantissa, _, exponent = text.lower().partition("e")
    digits = len(mantissa.partition(".")[2])
    if not digits and not exponent:
        return 0.0
    return 10.0 ** (int(exponent or 0) - digits)


def _numbers_agree(actual: str, expected: str) -> bool:
    a, e = float(actual), float(expected)
    if abs(a) < NOISE and abs(e) < NOISE:
        return True
    return abs(a - e) <= _decimals_unit(expected) * (1 + 1e-9)


def output_mismatch(actual: str, expected: str) -> str | None:
    """Why ``actual`` does not print what ``expected`` shows, or None if it does."""
    got, want = actual.strip().splitlines(), expected.strip().splitlines()
    if len(got) != len(want):
        return f"{len(got)} lines printed, the page shows {len(want)}"
    for number, (line, shown) in enumerate(zip(got, want, strict=True), 1):
        if NUMBER.split(line.rstrip()) != NUMBER.split(shown.rstrip()):
            return f"line {number}: printed {line!r}, the page shows {shown!r}"
        pairs = zip(NUMBER.findall(line), NUMBER.findall(shown), strict=True)
        for value, page_value in pairs:
            if not _numbers_agree(value, page_value):
                return f"line {number}: printed {value}, the page shows {page_value}"
    return None


@pytest.mark.parametrize(
    ("actual", "expected", "agree"),
    [
        ("wrong: 3.2e-01\ntruebatch: 1.1e-16", "wrong: 3.2e-01\ntruebatch: 4.4e-16", True),
        ("wrong: 3.3e-01", "wrong: 3.2e-01", True),
        ("wrong: 3.4e-01", "wrong: 3.2e-01", False),
        ("steps: 12", "steps: 13", False),
        ("lr 0.0729", "lr 0.0729", True),
        ("truebatch: 2.0e-05", "truebatch: 1.1e-16", False),
        ("loss 1.5", "loss: 1.5", False),
        ("a\nb", "a", False),
    ],
)
def test_output_comparison(actual, expected, agree):
    assert (output_mismatch(actual, expected) is None) == agree


def _sections(page: Path) -> list[tuple[str, int, int]]:
    """``(title, first line, last line)`` of every ``## `` section of a page."""
    lines = page.read_text().splitlines()
    starts = [n for n, line in enumerate(lines, 1) if line.startswith("## ")]
    ends = [*(n - 1 for n in starts[1:]), len(lines)]
    return [(lines[a - 1][3:].strip(), a, b) for a, b in zip(starts, ends, strict=True)]


def test_every_written_page_outside_the_api_reference_runs_code():
    written = [p for p in PAGES if p.relative_to(DOCS).parts[0] != "api"]
    without = [_page_id(p) for p in written if all(b.not_run for b in BLOCKS[p])]
    assert not without, f"these pages show no python block that runs: {without}"


def test_every_troubleshooting_entry_shows_the_difference_it_explains():
    """Each entry (a ``##`` section after the setup) has a run block with its Output,
    and the symptom table at the top of the page links to it."""
    markdown = pytest.importorskip("markdown.extensions.toc")
    page = DOCS / "troubleshooting.md"
    text = page.read_text()
    entries = [s for s in _sections(page) if s[0] != "Setup for the snippets"]
    assert len(entries) >= 12
    for title, first, last in entries:
        shown = [b for b in BLOCKS[page] if first < b.line < last and b.output is not None]
        assert shown, f"troubleshooting entry {title!r} has no python block with an Output"
        anchor = markdown.slugify(title, "-")
        assert f"](#{anchor})" in text, f"the symptom table does not link to {title!r}"


@pytest.fixture
def isolated():
    """A block may seed, change defaults or start a process group: undo it afterwards."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _skip_missing_optional(code: str) -> None:
    for node in ast.walk(ast.parse(code)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for top in {name.split(".")[0] for name in names} & OPTIONAL:
            if importlib.util.find_spec(top) is None:
                pytest.skip(f"optional dependency {top} is not installed")


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


@pytest.mark.parametrize("page", PAGES_WITH_PYTHON, ids=_page_id)
def test_page_runs_and_prints_what_it_shows(page, isolated, capsys):
    for block in BLOCKS[page]:
        if block.not_run is not None:
            compile(block.code, block.id, "exec")
            assert block.output is None, f"{block.id} is not run, so it cannot show an Output"
    blocks = [b for b in BLOCKS[page] if b.not_run is None]
    for block in blocks:
        _skip_missing_optional(block.code)
    namespace = {"__name__": "__main__"}
    for block in blocks:
        exec(compile(block.code, str(page.relative_to(ROOT)) + f":{block.line}", "exec"), namespace)
        printed = capsys.readouterr().out
        if block.output is None:
            assert not printed, f"{block.id} prints, but the page shows no Output block after it"
        else:
            mismatch = output_mismatch(printed, block.output)
            assert mismatch is None, f"{block.id}: {mismatch}\n--- printed ---\n{printed}"
    assert not (dist.is_available() and dist.is_initialized()), (
        f"{_page_id(page)} leaves a process group: end it with dist.destroy_process_group()"
    )


def _public_modules() -> list[ModuleType]:
    """truebatch, its public submodules, and every module of truebatch.integrations."""
    integrations = pkgutil.iter_modules(truebatch.integrations.__path__, "truebatch.integrations.")
    return [tb, tb.nn, tb.testing, *(importlib.import_module(m.name) for m in integrations)]


def test_api_pages_document_every_public_name():
    """Every name in the ``__all__`` of a public module has a ``::: module.name``
    entry in docs/api/ (a public submodule instead has its own names checked)."""
    entries = set(re.findall(r"^::: (\S+)\s*$", _api_text(), re.MULTILINE))
    modules = _public_modules()
    missing = [
        f"{module.__name__}.{name}"
        for module in modules
        for name in module.__all__
        if getattr(module, name) not in modules and f"{module.__name__}.{name}" not in entries
    ]
    assert not missing, f"docs/api/*.md lacks a '::: <name>' entry for {missing}"


def _api_text() -> str:
    return "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.md")))


def _unwritten_nav_pages() -> list[str]:
    return [page for page in NAV if not (DOCS / page).is_file()]


def test_every_page_of_the_nav_is_written():
    assert len(NAV) >= 18
    missing = _unwritten_nav_pages()
    assert not missing, f"mkdocs.yml lists pages that are not in docs/ yet: {missing}"


def test_site_builds_in_strict_mode(tmp_path):
    """``mkdocs build --strict`` on a copy of the project's docs, where a page of
    the nav that is not written yet (the test above names it) is a placeholder,
    so that the build checks every page that exists: links, anchors, the API."""
    pytest.importorskip("mkdocs")
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    (tmp_path / "src").symlink_to(ROOT / "src")  # mkdocstrings reads src/ next to mkdocs.yml
    for page in _unwritten_nav_pages():
        (tmp_path / "docs" / page).write_text(f"# {page}\n\nNot written yet.\n")
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    api = (site / "api" / "index.html").read_text()
    assert "windows_per_epoch" in api and "ceil(length / size)" in api
    assert "convert_batchnorm" in (site / "api" / "nn" / "index.html").read_text()
    assert (site / "img" / "lr_scaling.png").read_bytes().startswith(b"\x89PNG")
