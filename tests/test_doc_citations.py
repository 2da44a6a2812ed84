"""Every document the repository cites exists in it, and every cited section exists there.

Code, configs, docs and ``--help`` texts cite documents by name ("docs/method.md", "README") and
sometimes a section in quotes (README "Stage one: saliency proposals"). A citation of a file the
repository does not hold, or of a section that is not in the cited file, sends a reader nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("pipeline", "trainer", "tests", "bench", "configs", "docs")
SUFFIXES = {".py", ".toml", ".md"}
# A markdown file named in text: word characters, dots, slashes and dashes ending in ".md".
CITED_FILE = re.compile(r"(?<![\w/.-])([\w./-]*[A-Za-z]\w*\.md)\b")
# A section in quotes right after the document: README "Title" or docs/x.md "Title".
CITED_SECTION = re.compile(r"\b(README|[\w./-]+\.md)\"?,? \"([^\"]{3,80})\"")
# Files the commands write at run time (compare and study write results.md into their folder).
WRITTEN_AT_RUN_TIME = {"results.md"}


def _texts() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "data" / "README.md"]
    for folder in SCANNED:
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in files if p.is_file() and p.name != Path(__file__).name]


def _exists(name: str, citing: Path) -> bool:
    if Path(name).name in WRITTEN_AT_RUN_TIME:
        return True
    return (ROOT / name).is_file() or (citing.parent / name).is_file()


def test_every_cited_document_exists():
    missing = []
    for path in _texts():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in CITED_FILE.findall(line):
                if not _exists(name, path):
                    missing.append(f"{path.relative_to(ROOT)}:{n} cites {name}")
    assert not missing, "\n".join(missing)


def test_every_cited_section_exists():
    missing = []
    for path in _texts():
        text = path.read_text(errors="replace")
        for doc, section in CITED_SECTION.findall(" ".join(text.split())):
            target = ROOT / ("README.md" if doc == "README" else doc)
            if not target.is_file():
                continue  # reported by the test above
            if section.lower() not in " ".join(target.read_text().split()).lower():
                missing.append(f'{path.relative_to(ROOT)} cites {doc} "{section}"')
    assert not missing, "\n".join(missing)


def test_the_patterns_catch_a_missing_document_and_section(tmp_path):
    line = 'see NOTES.md and README "A section nobody wrote"'
    assert CITED_FILE.findall(line) == ["NOTES.md"]
    assert not _exists("NOTES.md", tmp_path / "x.py")
    assert CITED_SECTION.findall(line) == [("README", "A section nobody wrote")]
