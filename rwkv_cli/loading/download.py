"""A resumable, checksum-verified download of one Hub file into the Hugging Face cache.

Files are stored in the cache in its usual layout (``blobs/``, ``snapshots/``, ``refs/``), so
``huggingface_hub`` and ``hf cache`` see them too. Which file to fetch is
:mod:`rwkv_cli.loading.hub`'s job; this module only fetches it (:func:`download_to_cache`).

Downloads resume. huggingface_hub 2.4 retries a dropped connection inside one call, but it writes
to a temporary file whose name is unique to the process and deletes that file when the call fails.
After a Ctrl-C, a crash or too many retries, the next run starts from zero. This module downloads
into ``blobs/<etag>.incomplete`` instead, a name that stays the same between runs, and continues
it with an HTTP ``Range`` request. Each file is checked against the Hub's ETag: the sha256 for LFS
files, the git blob hash for small files.

The cache folder, endpoint, timeouts and ``HF_HUB_DISABLE_PROGRESS_BARS`` are read from
``huggingface_hub.constants`` on every call; ``HF_TOKEN`` is read again for each request.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import urlsplit

import httpx2
from huggingface_hub import constants
from huggingface_hub.utils import WeakFileLock, build_hf_headers, get_session

from rwkv_cli.errors import (
    ChecksumMismatchError,
    DiskFullError,
    HubUnreachableError,
    WriteError,
)
from rwkv_cli.fileio import check_free_space, format_size, held_elsewhere
from rwkv_cli.textio import interactive
from rwkv_cli.version import __version__

if TYPE_CHECKING:
    from rich.console import Console

RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)
"""Waits before each retry of a dropped download. The count starts again once bytes arrive."""
LIBRARY = {"library_name": "rwkv-cli", "library_version": __version__}
"""How rwkv-cli names itself in the user agent of its Hub requests."""
GIT_SHA1 = re.compile(r"[0-9a-f]{40}")
"""A git commit or blob id."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_BLOCK_BYTES = 8 << 20  # reading back a partial download to hash it
_SPACE_HINT = "free some space, or set HF_HOME (or HF_HUB_CACHE) to a disk with more room"


@dataclass(frozen=True)
class RemoteFile:
    """A file on the Hub, pinned to a commit, and where to fetch its bytes."""

    repo_id: str
    filename: str
    revision: str | None  # as the user gave it; its ref in the cache is pointed at ``commit``
    commit: str
    etag: str  # names the blob in the cache, and is its checksum
    size: int | None
    url: str

    @property
    def label(self) -> str:
        return f"{self.repo_id}:{self.filename}"


def download_to_cache(
    remote: RemoteFile, *, progress: bool | None, console: Console, again: bool = False
) -> Path:
    """The cached file for ``remote`` (``snapshots/<commit>/<filename>``), downloaded if need be
    (``again``: even if cached, replacing a damaged copy once the new one is verified).

    ``progress``: ``None`` shows a bar when ``console`` is a terminal, unless
    ``HF_HUB_DISABLE_PROGRESS_BARS`` is set; ``True`` shows it on a terminal regardless; ``False``
    never shows it. A one-line notice goes to ``console`` before any download.
    """
    storage = repo_folder(remote.repo_id)
    pointer = storage / "snapshots" / remote.commit / remote.filename
    try:
        if again or not pointer.exists():
            blob = storage / "blobs" / remote.etag
            lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{remote.etag}.lock"
            blob.parent.mkdir(parents=True, exist_ok=True)
            lock.parent.mkdir(parents=True, exist_ok=True)
            if held_elsewhere(lock):  # huggingface_hub's lock: its downloads count too
                notice(console, f"Waiting for another download of {remote.label} to finish")
            with WeakFileLock(lock):
                if again or not blob.exists():
                    _download(remote, blob, progress, console)
                _link(blob, pointer)
        _write_ref(storage, remote.revision or constants.DEFAULT_REVISION, remote.commit)
    except OSError as error:  # a full disk is a DiskFullError by now
        raise _cache_error(f"{error.strerror or error} ({error.filename})") from error
    return pointer


def require_cache_folder() -> None:
    """Raise WriteError now, before any request, if the Hugging Face cache folder cannot exist
    (a file where a folder should be). A read-only cache is fine while nothing new is needed."""
    try:
        Path(constants.HF_HUB_CACHE).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _cache_error(error.strerror or str(error)) from error


def _cache_error(reason: str) -> WriteError:
    return WriteError(
        f"cannot write to the Hugging Face cache {constants.HF_HUB_CACHE}: {reason}",
        hint="set HF_HOME (or HF_HUB_CACHE) to a writable directory",
    )


# --- the cache layout --------------------------------------------------------------------------


def repo_folder(repo_id: str) -> Path:
    """The repo's folder in the Hugging Face cache (``models--OWNER--NAME``)."""
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _link(blob: Path, pointer: Path) -> None:
    """Point the snapshot entry at the blob, as huggingface_hub does (moved where no symlinks)."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if pointer.is_symlink():
        pointer.unlink()  # a link to a blob that was deleted
    try:
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    except OSError:
        os.replace(blob, pointer)


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    ref = storage / "refs" / revision
    if revision == commit or (ref.is_file() and ref.read_text().strip() == commit):
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    temporary = ref.with_name(ref.name + ".tmp")
    temporary.write_text(commit)
    os.replace(temporary, ref)


# --- downloading -------------------------------------------------------------------------------


class _Checksum:
    """The Hub's ETag as a checksum: sha256 for LFS files, the git blob sha1 for small files."""

    def __init__(self, etag: str, size: int | None) -> None:
        self.expected = etag.lower()
        self.kind: str | None = None
        if _SHA256.fullmatch(self.expected):
            self.kind = "sha256"
        elif GIT_SHA1.fullmatch(self.expected) and size is not None:
            self.kind = "git blob sha1"
        self._size = size
        self.reset()

    def reset(self) -> None:
        if self.kind == "sha256":
            self._hash = hashlib.sha256()
        elif self.kind is not None:
            self._hash = hashlib.sha1(b"blob %d\0" % self._size)  # git hashes a header first

    def update(self, data: bytes) -> None:
        if self.kind is not None:
            self._hash.update(data)

    def actual(self) -> str | None:
        return self._hash.hexdigest() if self.kind is not None else None


class _Dropped(Exception):
    """A transfer that broke off in a way worth retrying (network trouble, HTTP 5xx or 429)."""


def _download(remote: RemoteFile, blob: Path, progress: bool | None, console: Console) -> None:
    """Download into ``<blob>.incomplete`` (continuing what is there), verify, move into place."""
    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if have and (remote.size is None or have > remote.size):
        partial.unlink()  # cannot be the start of this file
        have = 0
    if remote.size is not None:
        check_free_space(blob.parent, remote.size - have, _SPACE_HINT, remote.label)
    checksum = _Checksum(remote.etag, remote.size)
    if have:
        _hash_file(partial, checksum)
        done, total = format_size(have), format_size(remote.size)
        notice(console, f"Resuming {remote.label} ({done} of {total} already here)")
    else:
        notice(console, f"Downloading {remote.label} ({format_size(remote.size)})")
    show = progress is not False and interactive(console)
    show = show and (progress is True or not constants.HF_HUB_DISABLE_PROGRESS_BARS)
    name = remote.filename.rsplit("/", 1)[-1]  # the bar names the file, not its folders
    try:
        with (
            partial.open("ab") as out,
            _progress_bar(console, name, remote.size, have, show) as report,
        ):
            _transfer(remote, out, checksum, report)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        partial.unlink(missing_ok=True)
        raise DiskFullError(
            f"the disk is full: could not save {remote.label} in {blob.parent}", hint=_SPACE_HINT
        ) from error
    _verify(remote, partial, checksum)
    os.replace(partial, blob)


def _transfer(
    remote: RemoteFile, out: IO[bytes], checksum: _Checksum, report: Callable[[int], None]
) -> None:
    """Fetch the rest of the file into ``out``, resuming after each drop, up to the retry limit."""
    retries_left = len(RETRY_DELAYS_S)
    while True:
        start = out.tell()
        try:
            _get(remote, out, checksum, report)
            return
        except (_Dropped, httpx2.TransportError) as error:
            if out.tell() > start:
                retries_left = len(RETRY_DELAYS_S)  # it was moving: a fresh set of retries
            if retries_left == 0:
                raise HubUnreachableError(
                    f"download of {remote.label} broke off at {format_size(out.tell())} "
                    f"of {format_size(remote.size)} ({error_reason(error)})",
                    hint="run the same command again: the download resumes where it stopped",
                ) from error
            time.sleep(RETRY_DELAYS_S[len(RETRY_DELAYS_S) - retries_left])
            retries_left -= 1


def _get(
    remote: RemoteFile, out: IO[bytes], checksum: _Checksum, report: Callable[[int], None]
) -> None:
    """One GET of the bytes from ``out.tell()`` onwards, appended to ``out``."""
    have = out.tell()
    headers = build_hf_headers(**LIBRARY)
    if _origin(remote.url) != _origin(constants.ENDPOINT):
        headers.pop("authorization", None)  # a signed CDN URL: the token stays on the Hub
    headers["Accept-Encoding"] = "identity"
    if have:
        headers["Range"] = f"bytes={have}-"
    session = get_session()
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    with session.stream("GET", remote.url, headers=headers, timeout=timeout) as response:
        status = response.status_code
        if have and status in (200, 416):  # the server ignored or refused the range: start over
            out.seek(0)
            out.truncate()
            checksum.reset()
            report(0)
            if status == 416:
                raise _Dropped("the server refused to resume (HTTP 416)")
            have = 0
        elif status >= 500 or status == 429:
            raise _Dropped(f"HTTP {status}")
        elif status not in (200, 206):
            raise HubUnreachableError(
                f"download of {remote.label} failed: HTTP {status}",
                hint="run the same command again; if it persists, check HF_ENDPOINT and HF_TOKEN",
            )
        for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing received
            _write_chunk(out, chunk)
            checksum.update(chunk)
            have += len(chunk)
            report(have)


def _write_chunk(out: IO[bytes], chunk: bytes) -> None:
    out.write(chunk)


def _verify(remote: RemoteFile, partial: Path, checksum: _Checksum) -> None:
    """Delete the download and raise if its size or checksum is not the Hub's."""
    size = partial.stat().st_size
    actual = checksum.actual()
    if remote.size is not None and size != remote.size:
        problem = f"{format_size(size)} instead of {format_size(remote.size)}"
    elif actual is not None and actual != checksum.expected:
        problem = f"{checksum.kind} {actual[:12]}… instead of {checksum.expected[:12]}…"
    else:
        return
    partial.unlink(missing_ok=True)
    raise ChecksumMismatchError(
        f"the download of {remote.label} is corrupt ({problem}) and was deleted",
        hint="run the command again; if it happens again, check HF_ENDPOINT and any proxy",
    )


def _hash_file(path: Path, checksum: _Checksum) -> None:
    with path.open("rb") as file:
        while block := file.read(_HASH_BLOCK_BYTES):
            checksum.update(block)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


# --- output (notice and error_reason serve hub.py too) ---------------------


@contextmanager
def _progress_bar(
    console: Console, description: str, total: int | None, done: int, show: bool
) -> Iterator[Callable[[int], None]]:
    """A download bar on ``console`` when ``show``; yields a function taking the bytes done."""
    if not show:
        yield lambda _done: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, completed=done)
        yield lambda now: bar.update(task, completed=now)


def notice(console: Console, text: str) -> None:
    """Print ``text`` on ``console`` as one plain line: no markup, never wrapped."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def error_reason(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
