"""Named states kept as state files in one folder: what ``rwkv serve`` offers at ``/v1/states``.

Every state is a state file (rwkv_cli/statefile.py), the format ``rwkv save-state`` writes and
``--state`` reads, named ``<id>.rwkvstate`` in the store's folder: a state moves between the
command line and a server as a plain file, both ways, and a server given a folder of its own
(``--state-dir``) finds its states again after a restart. Without one, the store uses a temporary
folder removed on ``close``. States are read from their files when used, so a store holds many
more of them than fit in memory.

Ids are made by the store (``state-`` and 16 hex digits; ``reply-`` for the states after
replies, of which only the newest ``max_replies`` are kept) or chosen by a client from a small
alphabet (``is_valid_id``): never a path. An uploaded file is written beside the others under a
temporary name, read and checked against the model exactly as ``--state`` checks a file, and only
then renamed into place, so a bad upload never replaces a good state.
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from safetensors import SafetensorError, safe_open

from rwkv_cli.errors import RwkvCliError, StateFileError
from rwkv_cli.fileio import atomic_write_bytes
from rwkv_cli.generation import Session
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.statefile import read_state_file, save_state_file

SUFFIX = ".rwkvstate"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_UPLOAD_PREFIX = ".upload-"  # files being checked; never listed
_REPLY_ID = re.compile(r"reply-[0-9a-f]{16}")
DEFAULT_MAX_STATES = 10_000
# States after replies (every response's ``state_id``) kept at once, the oldest out first: a
# client that continues a conversation by id uses the newest ones; older ones resend history.
DEFAULT_MAX_REPLIES = 100


class UnknownStateError(RwkvCliError):
    """No state has that id (the server answers 404)."""


class StoreFullError(RwkvCliError):
    """The store holds as many states as it may."""


@dataclass(frozen=True)
class StoredState:
    """What the store knows of a state without reading its tensors."""

    id: str
    tokens: int  # tokens the state has read, as its file records
    bytes: int  # the file's size
    created: datetime


def is_valid_id(state_id: str) -> bool:
    """Ids are 1-64 letters, digits, ``-`` and ``_``, starting with a letter or digit."""
    return _ID.fullmatch(state_id) is not None


class StateStore:
    """The states of one model, by id, as files in ``directory`` (a temporary one if None)."""

    def __init__(
        self,
        loaded: LoadedModel,
        directory: Path | None = None,
        max_states: int = DEFAULT_MAX_STATES,
        max_replies: int = DEFAULT_MAX_REPLIES,
    ) -> None:
        self.loaded = loaded
        self.max_states, self.max_replies = max_states, max_replies
        self._temporary = None if directory else tempfile.TemporaryDirectory(prefix="rwkv-states-")
        self.directory = Path(directory or self._temporary.name)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Remove the temporary folder, if the store made one (a given folder stays)."""
        if self._temporary is not None:
            self._temporary.cleanup()

    def add(self, session: Session, state_id: str | None = None, text_tail: str = "") -> str:
        """Keep ``session`` under ``state_id`` (replacing a state of that id) or a new id."""
        state_id = self._checked(state_id) if state_id is not None else _new_id()
        with self._lock:
            self._check_room(state_id)
            save_state_file(self._path(state_id), self.loaded, session, text_tail=text_tail)
        return state_id

    def keep_reply(self, session: Session) -> str:
        """Keep the state after a reply under a new ``reply-`` id; beyond ``max_replies`` such
        states the oldest go (states added by name or by ``add`` never do)."""
        state_id = f"reply-{secrets.token_hex(8)}"
        with self._lock:
            replies = [known for known in self.ids() if _REPLY_ID.fullmatch(known)]
            for old in replies[: max(0, len(replies) + 1 - self.max_replies)]:
                self._path(old).unlink(missing_ok=True)
            self._check_room(state_id)
            save_state_file(self._path(state_id), self.loaded, session)
        return state_id

    def upload(self, state_id: str, data: bytes) -> StoredState:
        """Keep the state file ``data`` under ``state_id`` once it reads as a state file of this
        model; StateFileError (naming no server path) if not."""
        state_id = self._checked(state_id)
        pending = self.directory / f"{_UPLOAD_PREFIX}{secrets.token_hex(8)}{SUFFIX}"
        try:
            atomic_write_bytes(pending, data)
            self._session(pending)
            with self._lock:
                self._check_room(state_id)
                os.replace(pending, self._path(state_id))
        finally:
            pending.unlink(missing_ok=True)
        return self.info(state_id)

    def session(self, state_id: str) -> Session:
        """The session kept under ``state_id``, read from its file and checked against the model."""
        return self._session(self._existing(state_id))

    def file_bytes(self, state_id: str) -> bytes:
        """The state file of ``state_id``, as ``rwkv save-state`` writes them."""
        return self._existing(state_id).read_bytes()

    def info(self, state_id: str) -> StoredState:
        """The state's size and token count, from its file's header alone."""
        path = self._existing(state_id)
        stat = path.stat()
        try:
            with safe_open(path, "pt") as header:
                tokens = int((header.metadata() or {}).get("tokens_consumed", 0))
        except (SafetensorError, OSError, ValueError):
            tokens = 0  # a file that does not read says so when it is used
        created = datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)
        return StoredState(state_id, tokens, stat.st_size, created)

    def delete(self, state_id: str) -> None:
        with self._lock:
            self._existing(state_id).unlink()

    def ids(self) -> list[str]:
        """Every id kept, oldest file first."""
        paths = [path for path in self.directory.glob(f"*{SUFFIX}") if is_valid_id(path.stem)]
        return [path.stem for path in sorted(paths, key=lambda path: path.stat().st_mtime)]

    def _session(self, path: Path) -> Session:
        try:
            saved = read_state_file(path)
            return saved.session_for(self.loaded.model, self.loaded.tokenizer.name)
        except StateFileError as error:
            # Say "the state file", not where the server keeps it.
            message = error.message.replace(f"state file {path}", "the state file")
            message = message.replace(str(path), "the state file")
            raise StateFileError(message, hint=error.hint) from None

    def _existing(self, state_id: str) -> Path:
        path = self._path(state_id) if is_valid_id(state_id) else None
        if path is None or not path.is_file():
            raise UnknownStateError(f"no state with id {state_id!r}")
        return path

    def _check_room(self, state_id: str) -> None:
        if not self._path(state_id).exists() and len(self.ids()) >= self.max_states:
            raise StoreFullError(f"the store holds {self.max_states} states, its most")

    def _checked(self, state_id: str) -> str:
        if not is_valid_id(state_id):
            raise StateFileError(
                f"{state_id!r} is not a state id: use 1-64 letters, digits, '-' and '_'"
            )
        return state_id

    def _path(self, state_id: str) -> Path:
        return self.directory / f"{state_id}{SUFFIX}"


def _new_id() -> str:
    return f"state-{secrets.token_hex(8)}"
