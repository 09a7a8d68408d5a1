"""The demo model's training text: the King James Bible, as Debian's ``bible-kjv`` prints it.

``bible -l 100000 Gen1:1-Rev22:21`` prints the whole text: a ``Genesis 1`` heading before every
chapter, then one verse per line (``  1 In the beginning ...``; the wide ``-l`` keeps each verse
on one line). :func:`parse_bible` reads that into chapters; :func:`split` holds every 50th chapter
out, so the held-out text spans the whole book; :func:`book_texts` lays a book out as the model
reads it: the chapter heading, then each verse without its number, separated by blank lines. A
blank line therefore ends a verse, which is also where ``rwkv chat`` ends a reply.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BIBLE_COMMAND = ["bible", "-l", "100000", "Gen1:1-Rev22:21"]
# SHA-256 of that command's output with bible-kjv 4.38 (Debian 12): 1189 chapters, 31102 verses.
BIBLE_SHA256 = "6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"
HELDOUT_EVERY = 50  # chapters 50, 100, 150, ... (in Bible order) are never trained on

_HEADING = re.compile(r"^(?P<book>\S.*) (?P<chapter>\d+)$")
_VERSE = re.compile(r"^\s+(?P<number>\d+) (?P<text>\S.*)$")


@dataclass(frozen=True)
class Chapter:
    book: str  # "Genesis", "1 Samuel", "Song of Solomon"
    number: int
    verses: tuple[str, ...]

    @property
    def heading(self) -> str:
        return f"{self.book} {self.number}"

    def text(self) -> str:
        """The heading and the verses, each followed by a blank line."""
        return "".join(f"{paragraph}\n\n" for paragraph in (self.heading, *self.verses))


def read_bible(text_file: Path | None = None) -> str:
    """The output of ``bible`` (see BIBLE_COMMAND), or the same text saved in ``text_file``."""
    if text_file is not None:
        return text_file.read_text(encoding="utf-8")
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise SystemExit(
            "the `bible` program is missing: install Debian's bible-kjv package "
            "(apt-get install bible-kjv), or pass --text FILE with its output"
        )
    result = subprocess.run(BIBLE_COMMAND, capture_output=True, check=True, text=True)
    return result.stdout


def is_recorded_text(text: str) -> bool:
    """Whether ``text`` is byte for byte the text the shipped demo model was trained on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest() == BIBLE_SHA256


def parse_bible(text: str) -> list[Chapter]:
    """Chapters in Bible order; fails loudly on any line it does not understand."""
    chapters: list[Chapter] = []
    verses: list[str] = []
    heading: re.Match[str] | None = None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if match := _HEADING.match(line):
            if heading is not None:
                chapters.append(_chapter(heading, verses))
            heading, verses = match, []
        elif (match := _VERSE.match(line)) and heading is not None:
            if int(match["number"]) != len(verses) + 1:
                raise ValueError(f"line {line_number}: verse {match['number']} out of order")
            verses.append(match["text"].strip())
        else:
            raise ValueError(f"line {line_number}: not a heading or a verse: {line[:60]!r}")
    if heading is not None:
        chapters.append(_chapter(heading, verses))
    return chapters


def _chapter(heading: re.Match[str], verses: list[str]) -> Chapter:
    return Chapter(heading["book"], int(heading["chapter"]), tuple(verses))


def split(chapters: list[Chapter]) -> tuple[list[Chapter], list[Chapter]]:
    """(training chapters, held-out chapters): every HELDOUT_EVERY-th chapter is held out."""
    training, heldout = [], []
    for index, chapter in enumerate(chapters, start=1):
        (heldout if index % HELDOUT_EVERY == 0 else training).append(chapter)
    return training, heldout


def book_texts(chapters: list[Chapter]) -> list[str]:
    """One text per book (in order), of the given chapters only."""
    books: dict[str, list[str]] = {}
    for chapter in chapters:
        books.setdefault(chapter.book, []).append(chapter.text())
    return ["".join(parts) for parts in books.values()]
