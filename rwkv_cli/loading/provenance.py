"""Where a model's weights were found, as fields, and how a state file records them."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# State-file metadata keys, one a field; "model_resolved" holds the form people read, which
# rwkv-cli before these keys also read back (see ``from_metadata``).
_KEYS = {"path": "model_path", "repo_id": "model_repo", "filename": "model_file"}
_REVISION_KEY = "model_revision"
RESOLVED_KEY = "model_resolved"
# How rwkv-cli before the fields wrote a Hub file: OWNER/NAME:FILE@COMMIT.
_PINNED_HUB_FILE = re.compile(r"^(?P<repo>[^@:]+):(?P<file>[^@]+)@(?P<commit>[0-9a-f]{40})$")


@dataclass(frozen=True)
class Provenance:
    """A model's file: where it is on this machine and, for a Hub file, its repo, its name in
    the repo and the commit it was found at. ``path`` is None only when read back from a state
    file that names a Hub file without the local path (files made before the fields existed)."""

    path: Path | None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None  # the commit sha; None for local files

    @property
    def hub_spec(self) -> str | None:
        """``repo:file``, the spec that names this file on the Hub; None for a local file."""
        return None if self.repo_id is None else f"{self.repo_id}:{self.filename}"

    @property
    def resolved(self) -> str:
        """``repo:file@commit`` for a Hub file, else the absolute path: to show, not to parse."""
        if self.repo_id is None:
            return str(self.path)
        return f"{self.hub_spec}@{self.revision}"

    def to_metadata(self) -> dict[str, str]:
        """The fields as state-file metadata, with the ``resolved`` form beside them."""
        values = {key: getattr(self, name) for name, key in _KEYS.items()}
        values[_REVISION_KEY] = self.revision
        values[RESOLVED_KEY] = self.resolved
        return {key: str(value) for key, value in values.items() if value is not None}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], spec: str) -> Provenance:
        """The provenance a state file records; for files without the fields (format 1, and 2
        before them), read from its ``model_resolved`` string, or else the ``spec`` it was made
        with, as rwkv-cli then did."""
        if any(key in metadata for key in _KEYS.values()):
            path = metadata.get(_KEYS["path"])
            return cls(
                Path(path) if path is not None else None,
                metadata.get(_KEYS["repo_id"]),
                metadata.get(_KEYS["filename"]),
                metadata.get(_REVISION_KEY),
            )
        resolved = metadata.get(RESOLVED_KEY, spec)
        pinned = _PINNED_HUB_FILE.match(resolved)
        if pinned:
            return cls(None, pinned["repo"], pinned["file"], pinned["commit"])
        return cls(Path(resolved))
