"""Model specs -> local checkpoint files, downloaded from the Hugging Face Hub when needed.

A *spec* is what users pass as ``-m SPEC``. The forms are tried in this order:

1. a path to an existing local file;
2. ``OWNER/NAME:FILENAME``, one file of a Hub repo;
3. ``OWNER/NAME``, a repo: its newest checkpoint by the 8-digit date in the file names;
4. an alias such as ``rwkv7-g1-0.1b``: a repo plus a file-name pattern. The newest match wins, so
   new releases are picked up without a code change.

Files are stored in the Hugging Face cache in its usual layout (``blobs/``, ``snapshots/``,
``refs/``), so ``huggingface_hub`` and ``hf cache`` see them too.

Downloads resume. huggingface_hub 2.4 retries a dropped connection inside one call, but it writes
to a temporary file whose name is unique to the process and deletes that file when the call fails.
After a Ctrl-C, a crash or too many retries, the next run starts from zero. This module downloads
into ``blobs/<etag>.incomplete`` instead, a name that stays the same between runs, and continues
it with an HTTP ``Range`` request. Each file is checked against the Hub's ETag: the sha256 for LFS
files, the git blob hash for small files.

Settings: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
and ``HF_HUB_DISABLE_PROGRESS_BARS`` once, when it is first imported. This module reads the results
from ``huggingface_hub.constants`` on every call, so set the variables before that import, or
patch the constants. ``HF_TOKEN`` is read again for each request.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, scan_cache_dir
from huggingface_hub.errors import (
    CacheNotFound,
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import WeakFileLock, build_hf_headers, get_session

from rwkv_cli import __version__
from rwkv_cli.errors import (
    ChecksumMismatchError,
    DiskFullError,
    HubAccessError,
    HubUnreachableError,
    InvalidInputError,
    ModelNotFoundError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RwkvCliError,
)

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_MODEL = "rwkv7-g1-0.1b"
"""The model ``chat`` and ``generate`` use without ``-m``: the smallest RWKV-7 G1 (about 380 MB)."""

CHECKPOINT_SUFFIXES = (".pth", ".safetensors")
RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 15.0)
"""Waits before each retry of a dropped download. The count starts again once bytes arrive."""
_HASH_BLOCK_BYTES = 8 << 20  # reading back a partial download to hash it
_HINT_LIST_LIMIT = 8  # file names shown in a hint before "... and N more"
_LIBRARY = {"library_name": "rwkv-cli", "library_version": __version__}

# Alias families: (alias prefix, repo, file-name stem, sizes as written in file names). A file
# matches if its name is the stem, an optional version ("-v2.8", "-v1-fixed"), "-YYYYMMDD", anything
# after a "-", then .pth or .safetensors (case-insensitive). Aliases spell sizes in lower case with
# a point ("1B5" -> "1.5b"). "{size}" in a repo is the size as written, in lower case: RWKV-4 Pile
# has one repo per size.
_FAMILIES = (
    ("rwkv7-g1", "BlinkDL/rwkv7-g1", "rwkv7-g1[a-z]*-{size}", "0.1b 0.4b 1.5b 2.9b"),
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
_SHA1 = re.compile(r"[0-9a-f]{40}")  # a git commit or blob id
_SAFE_ETAG = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*")  # it names a file in blobs/
_SHA256 = re.compile(r"[0-9a-f]{64}")
_EXPERIMENTAL = ("rwkv7a-", "rwkv7b-")
_STATE_FILE = re.compile(r"(?:^|[-_.])state(?:[-_.]|$)", re.IGNORECASE)

_OFFLINE_HINT = (
    "check your connection and HF_ENDPOINT; set HF_HUB_OFFLINE=1 to use only cached models, "
    "or pass the path of a local checkpoint"
)
_TOKEN_HINT = (
    "check the name; for a private or gated repo, set HF_TOKEN to a token that can read it "
    "(https://huggingface.co/settings/tokens)"
)
_SPACE_HINT = "free some space, or set HF_HOME (or HF_HUB_CACHE) to a disk with more room"


@dataclass(frozen=True)
class Alias:
    """A short model name: the newest file in ``repo_id`` whose name fully matches ``pattern``."""

    name: str
    repo_id: str
    pattern: str

    def matches(self, filename: str) -> bool:
        return re.fullmatch(self.pattern, _basename(filename), re.IGNORECASE) is not None


@dataclass(frozen=True)
class ResolvedModel:
    """Where a spec led: a local file and, for Hub models, the repo, file and commit behind it."""

    spec: str
    path: Path
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None  # the commit sha; None for local files

    @property
    def resolved(self) -> str:
        """``repo:file@commit`` for Hub models, the absolute path for local files (for metadata)."""
        if self.repo_id is None:
            return str(self.path)
        return f"{self.repo_id}:{self.filename}@{self.revision}"


@dataclass(frozen=True)
class CachedModel:
    """A checkpoint file in the local Hugging Face cache."""

    repo_id: str
    filename: str
    size: int
    path: Path
    revision: str  # the commit sha of the snapshot holding it


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


def cached_models() -> list[CachedModel]:
    """The checkpoint files (.pth, .safetensors) in the Hugging Face cache, by repo and name."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    found: dict[tuple[str, str, Path], CachedModel] = {}
    for repo in info.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            for file in revision.files:
                name = file.file_path.relative_to(revision.snapshot_path).as_posix()
                if _is_checkpoint(name):
                    key = (repo.repo_id, name, file.blob_path)
                    found.setdefault(
                        key,
                        CachedModel(
                            repo.repo_id,
                            name,
                            file.size_on_disk,
                            file.file_path,
                            revision.commit_hash,
                        ),
                    )
    return sorted(found.values(), key=lambda m: (m.repo_id.lower(), m.filename))


def resolve_model(
    spec: str,
    revision: str | None = None,
    progress: bool | None = None,
    *,
    console: Console | None = None,
) -> ResolvedModel:
    """Turn a model spec into a local file, downloading it into the Hugging Face cache if needed.

    ``revision`` (a branch, tag or commit) applies to Hub specs. ``progress``: ``None`` shows a bar
    when stderr is a terminal (unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set); ``True`` shows it on
    a terminal regardless of that variable; ``False`` never shows it. A bar is never drawn when
    stderr is not a terminal. A one-line notice goes to ``console`` (default: stderr) before any
    download. With ``HF_HUB_OFFLINE=1`` only the cache is consulted. If the Hub cannot be reached,
    a cached copy is used when there is one.
    """
    local = Path(spec).expanduser()
    if local.is_file():
        if revision is not None:
            raise InvalidInputError(f"a revision applies to Hub models, not to the file {spec}")
        return ResolvedModel(spec, local.resolve())
    target = _parse_spec(spec.strip())
    offline = constants.is_offline_mode()
    pinned = revision is not None and _SHA1.fullmatch(revision) is not None
    if offline or pinned:  # a commit's files never change: a cached copy is the answer
        cached = _from_cache(spec, target, revision)
        if cached is not None:
            return cached
        if offline:
            raise NotCachedError(
                f"{target.label} is not in the local cache and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it, or pass the path of a local checkpoint",
            )
    console = console or _stderr_console()
    try:
        remote = _locate(target, revision)
    except HubUnreachableError as error:
        cached = _from_cache(spec, target, revision)
        if cached is None:
            raise
        _say(console, f"{error.message}; using the cached {cached.repo_id}:{cached.filename}")
        return cached
    path = _fetch(remote, progress, console)
    return ResolvedModel(spec, path, remote.repo_id, remote.filename, remote.commit)


# --- specs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HubSpec:
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
            return _newest([name for name in names if self.alias.matches(name)])
        candidates = [name for name in names if _is_repo_checkpoint(name)]
        newest = _newest(candidates)
        return candidates[0] if newest is None and len(candidates) == 1 else newest


def _parse_spec(spec: str) -> _HubSpec:
    if match := _REPO_FILE_SPEC.fullmatch(spec):
        return _HubSpec(match["repo"], filename=_checked_filename(match["file"]))
    if spec.lower().endswith(CHECKPOINT_SUFFIXES) or spec.startswith((".", "/", "~", "\\")):
        raise ModelNotFoundError(
            f"no such file: {spec}",
            hint="check the path; a file on the Hub is written OWNER/NAME:FILENAME",
        )
    if _REPO_SPEC.fullmatch(spec):
        return _HubSpec(spec)
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        return _HubSpec(alias.repo_id, alias=alias)
    close = difflib.get_close_matches(spec.lower(), ALIASES, n=3)
    suggestion = f"did you mean {' or '.join(close)}? " if close else ""
    raise ModelNotFoundError(
        f"unknown model '{spec}': not a local file, a Hub repo (OWNER/NAME[:FILENAME]) "
        "or a known alias",
        hint=f"{suggestion}'rwkv models' lists the aliases, e.g. {DEFAULT_MODEL}",
    )


def _checked_filename(filename: str) -> str:
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


def _is_checkpoint(name: str) -> bool:
    return name.lower().endswith(CHECKPOINT_SUFFIXES)


def _is_repo_checkpoint(name: str) -> bool:
    """A checkpoint a bare repo id may resolve to: not experimental, not a state-tuning file."""
    base = _basename(name)
    return (
        _is_checkpoint(base)
        and not base.lower().startswith(_EXPERIMENTAL)
        and _STATE_FILE.search(base.rsplit(".", 1)[0]) is None
    )


def _newest(names: list[str]) -> str | None:
    """The name with the latest 8-digit date (ties: the last name in sort order)."""
    dated = [(match.group(), name) for name in names if (match := _DATE.search(_basename(name)))]
    return max(dated)[1] if dated else None


# --- the Hub: finding the file -----------------------------------------------------------------


@dataclass(frozen=True)
class _Remote:
    """A file on the Hub, pinned to a commit, and where to fetch its bytes."""

    repo_id: str
    filename: str
    revision: str | None  # as the user gave it
    commit: str
    etag: str
    size: int | None
    url: str

    @property
    def label(self) -> str:
        return f"{self.repo_id}:{self.filename}"


def _locate(target: _HubSpec, revision: str | None) -> _Remote:
    """Ask the Hub which file and commit the spec means; no bytes are downloaded."""
    endpoint = constants.ENDPOINT
    filename, ref = target.filename, revision or constants.DEFAULT_REVISION
    if filename is None:
        names, commit = _list_repo(target.repo_id, revision)
        filename = target.choose(names)
        if filename is None:
            raise _no_such_file(target, names)
        filename, ref = _checked_filename(filename), commit or ref
    url = f"{endpoint}/{target.repo_id}/resolve/{quote(ref, safe='')}/{quote(filename)}"
    with _hub_errors(target.repo_id, revision):
        try:
            meta = get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, **_LIBRARY)
        except RemoteEntryNotFoundError:
            meta = None
    if meta is None:
        names, _ = _list_repo(target.repo_id, revision)
        raise _no_such_file(target, names)
    commit, etag = meta.commit_hash or "", meta.etag or ""
    if not _SHA1.fullmatch(commit) or not _SAFE_ETAG.fullmatch(etag):
        raise HubUnreachableError(
            f"{endpoint} does not answer like a Hugging Face Hub (commit or ETag header missing)",
            hint="check HF_ENDPOINT",
        )
    if meta.location == url:  # no redirect: fetch from the commit, not a branch that may move
        url = f"{endpoint}/{target.repo_id}/resolve/{commit}/{quote(filename)}"
    else:
        url = meta.location
    return _Remote(target.repo_id, filename, revision, commit, etag, meta.size, url)


def _list_repo(repo_id: str, revision: str | None) -> tuple[list[str], str | None]:
    """The repo's file names at ``revision`` and the commit they belong to."""
    api = HfApi(endpoint=constants.ENDPOINT, **_LIBRARY)
    with _hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    return [sibling.rfilename for sibling in info.siblings or []], info.sha


def _no_such_file(target: _HubSpec, names: list[str]) -> RemoteFileNotFoundError:
    repo = target.repo_id
    if target.filename is not None:
        message = f"{target.filename} is not in {repo}"
    elif target.alias is not None:
        message = f"no file in {repo} matches the alias {target.alias.name}"
    else:
        message = f"cannot tell which checkpoint of {repo} to use"
    checkpoints = sorted(name for name in names if _is_checkpoint(name))
    if not checkpoints:
        return RemoteFileNotFoundError(message, hint=f"{repo} has no .pth or .safetensors files")
    shown = ", ".join(checkpoints[:_HINT_LIST_LIMIT])
    more = len(checkpoints) - _HINT_LIST_LIMIT
    shown += f" and {more} more" if more > 0 else ""
    return RemoteFileNotFoundError(
        message, hint=f"pick one as {repo}:FILENAME; its checkpoints: {shown}"
    )


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub and transport exceptions into one-line errors with a hint."""
    try:
        yield
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled, FileMetadataError) as e:
        raise _translate(e, repo_id, revision) from e


def _translate(error: Exception, repo_id: str, revision: str | None) -> RwkvCliError:
    endpoint = constants.ENDPOINT
    if isinstance(error, GatedRepoError):
        return HubAccessError(
            f"{repo_id} is gated: its conditions must be accepted before downloading",
            hint=f"accept them at {endpoint}/{repo_id}, then set HF_TOKEN to that account's token",
        )
    if isinstance(error, RevisionNotFoundError):
        return ModelNotFoundError(
            f"revision '{revision}' not found in {repo_id}",
            hint="pass a branch, tag or commit hash that exists in the repo",
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else 0
        if status in (401, 403):
            return HubAccessError(
                f"{endpoint} refused access to {repo_id} (HTTP {status}): "
                "it may be private, gated or misspelt",
                hint=_TOKEN_HINT,
            )
        if isinstance(error, RepositoryNotFoundError) or status == 404:
            return RepoNotFoundError(
                f"repository {repo_id} not found on {endpoint}",
                hint="check the name; 'rwkv models' lists the known aliases",
            )
        return HubUnreachableError(f"{endpoint} answered HTTP {status}", hint=_OFFLINE_HINT)
    if isinstance(error, FileMetadataError):
        return HubUnreachableError(
            f"{endpoint} does not answer like a Hugging Face Hub", hint="check HF_ENDPOINT"
        )
    return HubUnreachableError(f"cannot reach {endpoint} ({_reason(error)})", hint=_OFFLINE_HINT)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- the cache ---------------------------------------------------------------------------------


def _storage(repo_id: str) -> Path:
    """The repo's folder in the Hugging Face cache (``models--OWNER--NAME``)."""
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _from_cache(spec: str, target: _HubSpec, revision: str | None) -> ResolvedModel | None:
    """Resolve from what is cached, without the network: the ref's snapshot first."""
    storage = _storage(target.repo_id)
    if not (storage / "snapshots").is_dir():
        return None
    for commit in _cached_commits(storage, revision):
        snapshot = storage / "snapshots" / commit
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        filename = target.choose(names)
        if filename is not None:
            return ResolvedModel(spec, snapshot / filename, target.repo_id, filename, commit)
    return None


def _cached_commits(storage: Path, revision: str | None) -> list[str]:
    """Snapshots to look in: the commit the revision names; for no revision, then all others."""
    if revision is not None and _SHA1.fullmatch(revision):
        return [revision]
    ref = storage / "refs" / (revision or constants.DEFAULT_REVISION)
    preferred = [ref.read_text().strip()] if ref.is_file() else []
    if revision is not None:
        return preferred
    others = [
        p for p in (storage / "snapshots").iterdir() if p.is_dir() and p.name not in preferred
    ]
    others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return preferred + [p.name for p in others]


def _fetch(remote: _Remote, progress: bool | None, console: Console) -> Path:
    """The cached file for ``remote``, downloaded first if it is not there yet."""
    storage = _storage(remote.repo_id)
    pointer = storage / "snapshots" / remote.commit / remote.filename
    try:
        if not pointer.exists():
            blob = storage / "blobs" / remote.etag
            lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{remote.etag}.lock"
            blob.parent.mkdir(parents=True, exist_ok=True)
            lock.parent.mkdir(parents=True, exist_ok=True)
            with WeakFileLock(lock):
                if not blob.exists():
                    _download(remote, blob, progress, console)
                _link(blob, pointer)
        _write_ref(storage, remote.revision or constants.DEFAULT_REVISION, remote.commit)
    except PermissionError as error:
        raise RwkvCliError(
            f"cannot write to the Hugging Face cache: {error}",
            hint="set HF_HOME (or HF_HUB_CACHE) to a writable directory",
        ) from error
    return pointer


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
        elif _SHA1.fullmatch(self.expected) and size is not None:
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


def _download(remote: _Remote, blob: Path, progress: bool | None, console: Console) -> None:
    """Download into ``<blob>.incomplete`` (continuing what is there), verify, move into place."""
    partial = blob.with_name(blob.name + ".incomplete")
    have = partial.stat().st_size if partial.exists() else 0
    if have and (remote.size is None or have > remote.size):
        partial.unlink()  # cannot be the start of this file
        have = 0
    if remote.size is not None:
        _check_space(blob.parent, remote.size - have, remote.label)
    checksum = _Checksum(remote.etag, remote.size)
    if have:
        _hash_file(partial, checksum)
        _say(
            console, f"Resuming {remote.label} ({_size(have)} of {_size(remote.size)} already here)"
        )
    else:
        _say(console, f"Downloading {remote.label} ({_size(remote.size)})")
    show = progress is not False and console.is_terminal
    show = show and (progress is True or not constants.HF_HUB_DISABLE_PROGRESS_BARS)
    try:
        with (
            partial.open("ab") as out,
            _progress_bar(console, _basename(remote.filename), remote.size, have, show) as report,
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
    remote: _Remote, out: IO[bytes], checksum: _Checksum, report: Callable[[int], None]
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
                    f"download of {remote.label} broke off at {_size(out.tell())} "
                    f"of {_size(remote.size)} ({_reason(error)})",
                    hint="run the same command again: the download resumes where it stopped",
                ) from error
            time.sleep(RETRY_DELAYS_S[len(RETRY_DELAYS_S) - retries_left])
            retries_left -= 1


def _get(
    remote: _Remote, out: IO[bytes], checksum: _Checksum, report: Callable[[int], None]
) -> None:
    """One GET of the bytes from ``out.tell()`` onwards, appended to ``out``."""
    have = out.tell()
    headers = build_hf_headers(**_LIBRARY)
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


def _verify(remote: _Remote, partial: Path, checksum: _Checksum) -> None:
    """Delete the download and raise if its size or checksum is not the Hub's."""
    size = partial.stat().st_size
    actual = checksum.actual()
    if remote.size is not None and size != remote.size:
        problem = f"{_size(size)} instead of {_size(remote.size)}"
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


def _check_space(directory: Path, needed: int, label: str) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DiskFullError(
            f"not enough disk space for {label}: {_size(needed)} needed, {_size(free)} free "
            f"in {directory}",
            hint=_SPACE_HINT,
        )


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


# --- output ------------------------------------------------------------------------------------


def _stderr_console() -> Console:
    from rwkv_cli.ui import stderr_console  # late: ui imports the generation stack

    return stderr_console()


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)  # one line, never wrapped


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


def _size(size: int | None) -> str:
    """Bytes in decimal units, as download sizes are usually shown: 382 MB, 1.5 GB."""
    if size is None:
        return "unknown size"
    if size < 1000:
        return f"{size} B"
    units = ["kB", "MB", "GB", "TB"]
    value, unit = size / 1000, units.pop(0)
    while value >= 1000 and units:
        value, unit = value / 1000, units.pop(0)
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
