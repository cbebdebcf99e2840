"""Documents that exist: every repository path the code, config and docs cite is there, every section they cite by
anchor or title has its heading, and every link resolves.

A citation is a token such as ``core/bundle.py``, ``edge/sinks/`` or ``config/station.yaml`` in a Python
comment, docstring or string, in a config file (.yaml, .cfg, Makefile, deploy/*) or in a Markdown page. A bare
``DESIGN.md`` cites ``docs/DESIGN.md``. Nothing may point at a checkout's ``shared/`` folder, which is not part
of the project.
"""

from __future__ import annotations

import io
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The repository's top-level folders whose paths the scanner checks.
CITED_ROOTS = ("core", "edge", "trainer", "config", "docs", "tests", "benchmarks", "scripts", "deploy", "engines")
# Where citations are looked for: the project's own files, never the venv, caches or build outputs.
SCANNED_DIRS = ("core", "edge", "trainer", "tests", "benchmarks", "scripts", "config", "deploy", "docs", "engines")
SCANNED_TOP_FILES = ("README.md", "Makefile", "setup.cfg", "pyproject.toml")
SCANNED_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".cfg", ".toml", ".service", ".timer", ".conf", ".example"}
SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
# This file names missing paths on purpose (the planted case below), so it is not scanned itself.
THIS_FILE = Path(__file__).resolve()

_PATH_CHARS = r"[\w.\-/<>{}*…]"
PATH_TOKEN = re.compile(rf"(?<![\w./\-])((?:{'|'.join(CITED_ROOTS)})/{_PATH_CHARS}*)")
BARE_DESIGN = re.compile(r"(?<![\w/.\-])DESIGN\.md")
SHARED = re.compile(r"\.\./shared\b|(?<![\w\-])shared/")
PLACEHOLDER = re.compile(r"[<>{}*…]")
# A path right after the name of another repository is that repository's file, not ours: trainer/tensorrt_ops.py
# cites onnx-tensorrt's own docs/operators.md, the operator matrix it copies.
OTHER_REPOSITORY = re.compile(r"onnx-tensorrt\W{0,4}$")


@dataclass(frozen=True)
class Citation:
    file: Path
    line: int
    token: str

    def __str__(self) -> str:
        where = self.file.relative_to(ROOT) if self.file.is_relative_to(ROOT) else self.file
        return f"{where}:{self.line} → {self.token}"


def scanned_files(root: Path = ROOT) -> list[Path]:
    """The project's source, config and documentation files."""
    files = [root / name for name in SCANNED_TOP_FILES if (root / name).is_file()]
    for top in SCANNED_DIRS:
        for path in sorted((root / top).rglob("*")):
            if not path.is_file() or SKIPPED_PARTS.intersection(path.parts) or path.resolve() == THIS_FILE:
                continue
            if path.suffix in SCANNED_SUFFIXES or path.parent.name == "deploy":
                files.append(path)
    return files


def _cited_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) pieces of a file where citations can stand: for Python its comments and strings only."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".py":
        return list(enumerate(text.splitlines(), start=1))
    wanted = {tokenize.COMMENT, tokenize.STRING}
    fstring_middle = getattr(tokenize, "FSTRING_MIDDLE", None)  # Python 3.12 splits f-strings into pieces
    if fstring_middle is not None:
        wanted.add(fstring_middle)
    pieces: list[tuple[int, str]] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in wanted:
                for offset, line in enumerate(tok.string.splitlines()):
                    pieces.append((tok.start[0] + offset, line))
    except (tokenize.TokenError, SyntaxError):
        return list(enumerate(text.splitlines(), start=1))
    return pieces


def _clean(token: str) -> str:
    """Drop what ends a sentence or a Markdown construct after a path."""
    token = token.rstrip(".,:;")
    while token.endswith(("-", "'")):
        token = token[:-1]
    return token


def path_exists(token: str, root: Path = ROOT) -> bool:
    """Whether a cited path exists, reading placeholders (``<model>``, ``{prefix}``, ``…``) and globs sensibly.

    A glob must match at least one file. A path with a placeholder is checked up to the folder before its first
    placeholder (``trainer/models/<name>.py`` → ``trainer/models``). Below ``engines/`` live the bundles a run
    writes, never committed, so only what git holds there (``engines/README.md``) is checked by name.
    """
    if token.startswith("engines/") and token not in ("engines/", "engines/README.md"):
        return (root / "engines").is_dir()
    if "*" in token and not re.search(r"[<>{}…]", token):
        return any(root.glob(token.rstrip("/")))
    match = PLACEHOLDER.search(token)
    if match:
        prefix = token[: match.start()]
        prefix = prefix[: prefix.rfind("/") + 1] if "/" in prefix else prefix
        return (root / prefix).exists()
    return (root / token).exists()


def find_citations(path: Path) -> tuple[list[Citation], list[Citation]]:
    """(cited repository paths, pointers at a shared/ folder) in one file."""
    cited: list[Citation] = []
    shared: list[Citation] = []
    for line_no, text in _cited_text(path):
        for match in PATH_TOKEN.finditer(text):
            if OTHER_REPOSITORY.search(text[: match.start()]):
                continue
            cited.append(Citation(path, line_no, _clean(match.group(1))))
        for _ in BARE_DESIGN.finditer(text):
            cited.append(Citation(path, line_no, "docs/DESIGN.md"))
        for match in SHARED.finditer(text):
            shared.append(Citation(path, line_no, match.group(0)))
    return cited, shared


def missing_citations(files: list[Path], root: Path = ROOT) -> list[Citation]:
    missing = []
    for path in files:
        cited, _ = find_citations(path)
        missing += [c for c in cited if not path_exists(c.token, root)]
    return missing


def test_every_cited_repository_path_exists() -> None:
    missing = missing_citations(scanned_files())
    assert not missing, "cited paths that do not exist:\n" + "\n".join(map(str, missing))


def test_nothing_points_at_a_shared_folder() -> None:
    pointers = [c for path in scanned_files() for c in find_citations(path)[1]]
    assert not pointers, "files pointing at a shared/ folder outside the project:\n" + "\n".join(map(str, pointers))


def test_the_scanner_finds_a_planted_missing_path(tmp_path: Path) -> None:
    """The scan can fail: a planted citation of a missing file is found, with its line; real ones are not."""
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""Reads the bundle (core/bundle.py) and the format in DESIGN.md."""\n'
        "x = 1  # the real model lives in core/no_such_module.py\n"
        'PATH = "config/station.yaml"\n'
        'GLOB = "core/schemas/*.json"\n'
        'NO_GLOB = "core/schemas/*.xml"\n'
        'PLACEHOLDER = "trainer/models/<name>.py"\n'
        'RUNTIME = "engines/<model>/<version>/plans/"\n'
        "ratio = core/2  # code, not a citation\n"
        "# see ../shared/NOTES.md\n",
        encoding="utf-8",
    )
    (tmp_path / "core" / "schemas").mkdir(parents=True)
    (tmp_path / "core" / "bundle.py").write_text("", encoding="utf-8")
    (tmp_path / "core" / "schemas" / "event.schema.json").write_text("{}", encoding="utf-8")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "station.yaml").write_text("", encoding="utf-8")
    (tmp_path / "trainer" / "models").mkdir(parents=True)
    (tmp_path / "engines").mkdir()
    missing = [(c.line, c.token) for c in missing_citations([planted], root=tmp_path)]
    assert missing == [(1, "docs/DESIGN.md"), (2, "core/no_such_module.py"), (5, "core/schemas/*.xml")]
    assert [c.line for c in find_citations(planted)[1]] == [9]


# --- Sections a citation names -----------------------------------------------------------------------------------

# A page cited with a section: ``docs/training.md#backbones`` or ``docs/station.md, "On-site calibration"`` (the
# quoted text starts a heading's title). Outside Markdown links, so the link checker below does not see them.
SECTION_CITATION = re.compile(
    rf"(?<![\w./\-])((?:{'|'.join(CITED_ROOTS)})/[\w./\-]*\.md)(?:#([\w\-]+)|,? (?:section )?[\"“]([^\"”]+)[\"”])")


def heading_titles(page: Path) -> list[str]:
    """A Markdown page's heading titles as read: code marks dropped, a link's text kept."""
    titles = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            titles.append(re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2)).replace("`", ""))
    return titles


def broken_sections(files: list[Path], root: Path = ROOT) -> list[str]:
    """Citations of a page's section (anchor or quoted title) that the page has no heading for."""
    problems = []
    for path in files:
        for line_no, text in _cited_text(path):
            for match in SECTION_CITATION.finditer(text):
                page_name, anchor, title = match.groups()
                page = root / page_name
                where = f"{path.relative_to(root) if path.is_relative_to(root) else path}:{line_no}"
                if not page.is_file():
                    continue  # a missing page is test_every_cited_repository_path_exists's finding
                if anchor and anchor not in heading_anchors(page):
                    problems.append(f"{where} → {page_name}#{anchor}: no such heading")
                if title and not any(t.lower().startswith(title.lower()) for t in heading_titles(page)):
                    problems.append(f'{where} → {page_name}, "{title}": no heading starts so')
    return problems


def test_every_cited_section_exists() -> None:
    problems = broken_sections(scanned_files())
    assert not problems, "cited sections that do not exist:\n" + "\n".join(problems)


def test_the_section_check_finds_a_planted_missing_heading(tmp_path: Path) -> None:
    """The check can fail: a planted anchor and a planted title with no heading are found; real ones are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Collecting frames for `retraining`\n", encoding="utf-8")
    planted = tmp_path / "planted.yaml"
    planted.write_text(
        "# how: docs/page.md#collecting-frames-for-retraining and docs/page.md, \"Collecting frames\"\n"
        "# gone: docs/page.md#no-such-section\n"
        "# gone too: docs/page.md, \"Frames we never wrote about\"\n",
        encoding="utf-8",
    )
    problems = broken_sections([planted], root=tmp_path)
    assert [p.split(" → ")[0] for p in problems] == ["planted.yaml:2", "planted.yaml:3"], problems


# --- Markdown links ----------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines of a Markdown page outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (lower case, punctuation dropped, spaces as dashes, -1 on repeats)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(2))  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", title.lower().replace("`", "")).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(page: Path) -> list[str]:
    links = []
    for line in _prose_lines(page.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold examples, not links
        for match in LINK.finditer(line):
            target = match.group(1)
            if not re.match(r"^[a-z][a-z0-9+.\-]*:", target):  # http:, https:, mailto: are not checked here
                links.append(target)
    return links


def broken_link(page: Path, target: str) -> str | None:
    """Why a relative link from ``page`` does not resolve, or None when it does."""
    file_part, _, anchor = target.partition("#")
    dest = (page.parent / file_part).resolve() if file_part else page
    if not dest.exists():
        return f"{page.relative_to(ROOT)}: link to {target}: no such file"
    if not dest.is_relative_to(ROOT):
        return f"{page.relative_to(ROOT)}: link to {target}: outside the repository"
    if anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest):
        return f"{page.relative_to(ROOT)}: link to {target}: no heading #{anchor} in {dest.relative_to(ROOT)}"
    return None


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "engines" / "README.md",
            ROOT / "benchmarks" / "README.md"]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    problems = [why for target in relative_links(page) if (why := broken_link(page, target))]
    assert not problems, "\n".join(problems)


def test_readme_has_a_table_of_contents_that_resolves() -> None:
    readme = ROOT / "README.md"
    lines = _prose_lines(readme.read_text(encoding="utf-8"))
    starts = [i for i, line in enumerate(lines) if re.match(r"^#{2,3}\s+(Contents|Table of contents)\s*$", line)]
    assert starts, "README.md has no '## Contents' heading"
    entries = []
    for line in lines[starts[0] + 1:]:
        if HEADING.match(line):
            break
        entries += [m.group(1) for m in LINK.finditer(line)]
    assert len(entries) >= 8, f"README.md's table of contents has {len(entries)} links; it should cover the docs"
    problems = [why for target in entries if (why := broken_link(readme, target))]
    assert not problems, "\n".join(problems)
    assert {t for t in entries if t.startswith("#")}, "the table of contents links none of the README's own sections"


def test_the_link_checker_finds_a_broken_link(tmp_path: Path) -> None:
    page = ROOT / "docs" / "DESIGN.md"
    assert broken_link(page, "no-such-page.md") is not None
    assert broken_link(page, "#no-such-heading") is not None
    assert broken_link(page, "../README.md") is None
    assert "quick-start" in heading_anchors(ROOT / "README.md")
