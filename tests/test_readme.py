"""The README's first screen: what a new user sees and copies.

- the virtual-environment line and CI's two commands (the code line after each
  ``<!-- ci:... -->`` marker, which ``.ci/run`` executes) are within the first
  40 lines, the virtual environment first;
- the README stays short (details live in the docs site);
- its Usage block runs and prints what the README shows after it;
- every link into ``docs/`` is a page of the site's nav (with its anchor) or
  an image that exists.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from test_docs import NAV, output_mismatch
from truebatch.demos import failures

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
LINES = TEXT.splitlines()
FIRST_SCREEN = 40
MAX_CHARACTERS = 12_000
VENV = "python3 -m venv .venv && . .venv/bin/activate"
# CI runs these two lines, read from the README; changing them changes CI.
CI_COMMANDS = {
    "install-and-demo": 'pip install -c constraints.txt ".[demo]" && truebatch demo',
    "run-tests": (
        'pip install -c constraints.txt -e ".[dev,hf,trl,lightning,bench,docs]" '
        "&& python -m pytest -n 2"
    ),
}
LINK = re.compile(r"\]\((?P<target>docs/[^)#\s]+)(?:#(?P<anchor>[^)\s]+))?\)")


def _ci_command(marker: str) -> tuple[int, str]:
    """``(line number, command)`` the way ``.ci/run`` reads it: the first non-empty,
    non-fence line after the marker line."""
    start = LINES.index(f"<!-- ci:{marker} -->")
    for number, line in enumerate(LINES[start + 1 :], start + 2):
        if line.startswith("```") or not line.strip():
            continue
        return number, line
    raise AssertionError(f"no command after the ci:{marker} marker")


def test_ci_reads_the_same_lines_from_the_readme() -> None:
    awk = (ROOT / ".ci" / "run").read_text()
    reader = r"awk -v marker=\"<!-- ci:\$1 -->\" '(?P<program>.*?)' README.md"
    program = re.search(reader, awk, re.S)
    assert program, ".ci/run no longer reads the README with the awk program this test mirrors"
    for marker, command in CI_COMMANDS.items():
        read = subprocess.run(
            ["awk", "-v", f"marker=<!-- ci:{marker} -->", program["program"], str(README)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert read == command == _ci_command(marker)[1]


def test_first_screen_has_the_venv_line_then_both_commands() -> None:
    venv = next(n for n, line in enumerate(LINES, 1) if line.strip() == VENV)
    commands = [_ci_command(marker)[0] for marker in CI_COMMANDS]
    assert venv < min(commands), "make the virtual environment before installing"
    assert max(commands) <= FIRST_SCREEN, f"CI's commands at lines {commands}"


def test_first_screen_says_what_truebatch_is_and_shows_the_diff() -> None:
    first = "\n".join(LINES[:FIRST_SCREEN])
    assert re.search(r"\*\*truebatch is [^*]+\.\*\*", first)
    assert "```diff" in first
    diff = first[first.index("```diff") :]
    assert "+acc = tb.Accumulator(" in diff
    assert "+    result = acc.step_window(" in diff
    assert "-    return F.cross_entropy(model(x), y)" in diff


def test_readme_is_short() -> None:
    assert len(TEXT) <= MAX_CHARACTERS, f"{len(TEXT)} characters; move details to docs/"


def _usage() -> tuple[str, str]:
    section = TEXT[TEXT.index("## Usage") :]
    code = re.search(r"```python\n(?P<code>.*?)```\n\n```text\n(?P<out>.*?)```", section, re.S)
    assert code, "the Usage section lacks a python block followed by its text output"
    return code["code"], code["out"]


def test_usage_block_prints_what_the_readme_shows(capsys: pytest.CaptureFixture[str]) -> None:
    code, shown = _usage()
    exec(compile(code, "README.md:Usage", "exec"), {"__name__": "__main__"})
    mismatch = output_mismatch(capsys.readouterr().out, shown)
    assert mismatch is None, mismatch


def _headings(page: Path) -> set[str]:
    markdown = pytest.importorskip("markdown.extensions.toc")
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    titles = re.findall(r"^#{1,6} (.+?)\s*$", text, re.M)
    return {markdown.slugify(title, "-") for title in titles}


def test_every_docs_link_is_a_page_of_the_site() -> None:
    links = [(m["target"], m["anchor"]) for m in LINK.finditer(TEXT)]
    assert len(links) >= 10
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), f"README links to {target}, which does not exist"
        if path.suffix == ".md":
            assert target.removeprefix("docs/") in NAV, f"{target} is not in mkdocs.yml's nav"
            if anchor:
                assert anchor in _headings(path), f"{target} has no heading #{anchor}"
    pages = {target for target, _ in links}
    assert {"docs/getting-started.md", "docs/classic-failures.md"} <= pages


def test_results_table_names_the_classic_failures_the_demo_shows() -> None:
    table = TEXT[TEXT.index("## Results") :]
    table = table[: table.index("\n\n", table.index("| # |"))]
    shown = {row.split("|")[3].strip() for row in table.splitlines()[2:] if row.startswith("|")}
    assert {failures.ZERO_GRAD, failures.SHORT_WINDOW, failures.BATCHNORM_DROPOUT} <= shown
    assert not re.search(r"reports? 0\d\d", TEXT)
