"""Model specs: what ``-m SPEC`` names, read without touching the disk or the network.

A spec is a local path, ``OWNER/NAME:FILENAME`` (one file of a Hub repo), ``OWNER/NAME`` (a repo's
newest checkpoint by the 8-digit date in its file names), an alias such as ``rwkv7-g1-0.1b`` (a
repo and a file-name pattern; the newest match wins, so new releases are found without a code
change) or ``demo``. This module parses the Hub forms and chooses among a repo's file names;
:mod:`rwkv_cli.loading.hub` turns a spec into a local file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from rwkv_cli.demo import DEMO_SPEC
from rwkv_cli.errors import ModelNotFoundError
from rwkv_cli.settings import DEFAULT_MODEL

CHECKPOINT_SUFFIXES = (".pth", ".safetensors")
TRANSFORMERS_WEIGHTS = "pytorch_model.bin"  # transformers' RWKV-4 weights, in a folder
_HINT_LIST_LIMIT = 8  # file names shown in a hint before "... and N more"

# Alias families: (alias prefix, repo, file-name stem, sizes as written in file names). A file
# matches if its name is the stem, an optional version ("-v2.8", "-v1-fixed"), "-YYYYMMDD", anything
# after a "-", then .pth or .safetensors (case-insensitive). Aliases spell sizes in lower case with
# a point ("1B5" -> "1.5b"). "{size}" in a repo is the size as written, in lower case: RWKV-4 Pile
# has one repo per size.
_FAMILIES = (
    ("rwkv7-g1", "BlinkDL/rwkv7-g1", "rwkv7-g1[a-z0-9]*-{size}", "0.1b 0.4b 1.5b 2.9b 7.2b 13.3b"),
    ("rwkv7-world", "BlinkDL/rwkv-7-world", "RWKV-x070-World-{size}", "0.1B 0.4B 1.5B 2.9B"),
    ("rwkv6-world", "BlinkDL/rwkv-6-world", "RWKV-x060-World-{size}", "1B6 3B 7B 14B"),
    ("rwkv5-world", "BlinkDL/rwkv-5-world", "RWKV-5-World-{size}", "0.1B 0.4B 1B5 3B"),
    ("rwkv5-world", "RWKV/v5-Eagle-7B-pth", "RWKV-v5-Eagle-World-{size}", "7B"),
    ("rwkv4-pile", "BlinkDL/rwkv-4-pile-{size}", "RWKV-4-Pile-{size}", "169M 430M 1B5 3B 7B 14B"),
    ("rwkv4-world", "BlinkDL/rwkv-4-world", "RWKV-4-World-{size}", "0.1B 0.4B 1.5B 3B 7B"),
)
_SIZE_POINT = re.compile(r"^(\d+)b(\d+)$")  # "1b5" -> "1.5b"
_DATED_CHECKPOINT = r"(?:-v[.0-9]+(?:-[a-z]+)?)?-\d{8}(?:-[^/]*)?\.(?:pth|safetensors)"

_REPO_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
_REPO_FILE_SPEC = re.compile(rf"(?P<repo>{_REPO_ID}):(?P<file>[^:]+)")
_REPO_SPEC = re.compile(_REPO_ID)
_DATE = re.compile(r"(?<!\d)\d{8}(?!\d)")
_EXPERIMENTAL = ("rwkv7a-", "rwkv7b-")
_STATE_FILE = re.compile(r"(?:^|[-_.])state(?:[-_.]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class Alias:
    """A short model name: the newest file in ``repo_id`` whose name fully matches ``pattern``."""

    name: str
    repo_id: str
    pattern: str

    def matches(self, filename: str) -> bool:
        return re.fullmatch(self.pattern, _basename(filename), re.IGNORECASE) is not None


def _build_aliases() -> dict[str, Alias]:
    aliases = {}
    for prefix, repo, stem, sizes in _FAMILIES:
        for written in sizes.split():
            name = prefix + "-" + _SIZE_POINT.sub(r"\1.\2b", written.lower())
            pattern = stem.replace("{size}", re.escape(written)) + _DATED_CHECKPOINT
            aliases[name] = Alias(name, repo.replace("{size}", written.lower()), pattern)
    return aliases


ALIASES: dict[str, Alias] = _build_aliases()


def list_aliases() -> list[Alias]:
    """Every alias, in family order."""
    return list(ALIASES.values())


@dataclass(frozen=True)
class HubSpec:
    """A parsed Hub spec: one named file, the newest match of an alias, or a repo's newest file."""

    repo_id: str
    filename: str | None = None
    alias: Alias | None = None

    @property
    def label(self) -> str:
        if self.alias is not None:
            return self.alias.name
        return f"{self.repo_id}:{self.filename}" if self.filename else self.repo_id

    def choose(self, names: Iterable[str]) -> str | None:
        """The file this spec means among ``names``, or None."""
        names = list(names)
        if self.filename is not None:
            return self.filename if self.filename in names else None
        if self.alias is not None:
            return newest([name for name in names if self.alias.matches(name)])
        candidates = [name for name in names if is_repo_checkpoint(name)]
        latest = newest(candidates)
        return candidates[0] if latest is None and len(candidates) == 1 else latest


def listed(names: list[str]) -> str:
    """Up to _HINT_LIST_LIMIT names, then how many more."""
    more = len(names) - _HINT_LIST_LIMIT
    return ", ".join(names[:_HINT_LIST_LIMIT]) + (f" and {more} more" if more > 0 else "")


def parse_spec(spec: str) -> HubSpec:
    if match := _REPO_FILE_SPEC.fullmatch(spec):
        return HubSpec(match["repo"], filename=checked_filename(match["file"]))
    if spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith((".", "/", "~", "\\")):
        raise ModelNotFoundError(
            f"no such file: {spec}",
            hint="check the path; a file on the Hub is written OWNER/NAME:FILENAME",
        )
    if _REPO_SPEC.fullmatch(spec):
        return HubSpec(spec)
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        return HubSpec(alias.repo_id, alias=alias)
    close = difflib.get_close_matches(spec.lower(), [*ALIASES, DEMO_SPEC], n=3)
    suggestion = f"did you mean {' or '.join(close)}? " if close else ""
    raise ModelNotFoundError(
        f"unknown model '{spec}': not a local file, a Hub repo (OWNER/NAME[:FILENAME]) "
        "or a known alias",
        hint=f"{suggestion}'rwkv models' lists the aliases, e.g. {DEFAULT_MODEL}; "
        f"{DEMO_SPEC} is a small model that ships with rwkv-cli",
    )


def checked_filename(filename: str) -> str:
    """A file name inside a repo, refused if it could point outside the cache folder."""
    parts = filename.split("/")
    if filename.startswith("/") or "\\" in filename or any(p in ("", ".", "..") for p in parts):
        raise ModelNotFoundError(
            f"invalid file name in a Hub spec: {filename}",
            hint="write it as in the repo, e.g. OWNER/NAME:folder/model.pth",
        )
    return filename


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def is_checkpoint(name: str) -> bool:
    return name.lower().endswith(CHECKPOINT_SUFFIXES)


def is_repo_checkpoint(name: str) -> bool:
    """A checkpoint a bare repo id may resolve to: not experimental, not a state-tuning file."""
    base = _basename(name)
    return (
        is_checkpoint(base)
        and not base.lower().startswith(_EXPERIMENTAL)
        and _STATE_FILE.search(base.rsplit(".", 1)[0]) is None
    )


def newest(names: list[str]) -> str | None:
    """The name with the latest 8-digit date (ties: the last name in sort order)."""
    dated = [(match.group(), name) for name in names if (match := _DATE.search(_basename(name)))]
    return max(dated)[1] if dated else None
