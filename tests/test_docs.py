"""The manual (docs/, mkdocs.yml) and the README: the site builds with --strict, the outputs
reference (docs/outputs.md) names every column of every CSV file a real run writes, and the
README stays a short front page without history."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = ROOT / "docs" / "outputs.md"
README = ROOT / "README.md"

# CSV files docs/outputs.md documents that the tiny run of tests/conftest.py does not write, each
# with the reason. Empty: the tiny experiment writes every one of them (the statistics tables with
# at least their header, even without interventions or a static control).
OPTIONAL_CSV: dict[str, str] = {}

README_LIMIT = 15_000  # bytes
HISTORY = ("(Before", "Earlier,", "was called", "issue 1", "issue 2", "in progress")


def test_docs_build_strictly(tmp_path):
    """`mkdocs build --strict`: every page, link, anchor, CLI command and docstring renders."""
    site = tmp_path / "site"
    mkdocs = Path(sys.executable).with_name("mkdocs")
    proc = subprocess.run(
        [str(mkdocs), "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    for page in ("index.html", "cli/index.html", "outputs/index.html", "api/index.html"):
        assert (site / page).is_file(), f"{page} missing from the built site"


def csv_sections(text: str) -> dict[str, str]:
    """``{file name: its section}`` for every ``### `<name>.csv``` heading of outputs.md: the text
    from the heading to the next heading (fenced code blocks are not headings)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("#"):
            m = re.fullmatch(r"### `([^`]+\.csv)`\s*", line)
            current = sections.setdefault(m.group(1), []) if m else None
            continue
        if current is not None:
            current.append(line)
    return {name: "\n".join(lines) for name, lines in sections.items()}


def csv_columns(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    return [c for c in header if c.strip()]


def test_outputs_reference_names_every_column_of_every_exported_file(tiny_run):
    """Every CSV file of a finished run has a section in docs/outputs.md naming each of its
    columns as `column`; every CSV the page documents is written by the run (or listed in
    OPTIONAL_CSV with the reason it is not)."""
    _spec, out_dir, _result = tiny_run
    sections = csv_sections(OUTPUTS.read_text(encoding="utf-8"))
    written = sorted(p.name for p in Path(out_dir).glob("*.csv"))
    assert written, f"the tiny run wrote no CSV file into {out_dir}"
    problems = []
    for name in written:
        if name not in sections:
            problems.append(f"{name}: no '### `{name}`' section in docs/outputs.md")
            continue
        missing = [c for c in csv_columns(Path(out_dir) / name) if f"`{c}`" not in sections[name]]
        if missing:
            problems.append(f"{name}: columns not described in its section: {', '.join(missing)}")
    for name in sorted(set(sections) - set(written)):
        if name not in OPTIONAL_CSV:
            problems.append(f"{name}: documented in docs/outputs.md but not written by the run (OPTIONAL_CSV?)")
    assert not problems, "\n".join(problems)


def test_readme_is_short_and_has_no_history():
    """The README is a front page: the two set-up commands, under 15,000 bytes, no history."""
    raw = README.read_bytes()
    assert len(raw) <= README_LIMIT, f"README.md is {len(raw):,} bytes (limit {README_LIMIT:,}): move text to docs/"
    text = raw.decode("utf-8")
    assert "make demo" in text and "make test" in text
    found = [phrase for phrase in HISTORY if phrase in text]
    assert not found, f"README.md holds history or process narration: {found}"
