"""Model specs -> local checkpoint files, downloaded from the Hugging Face Hub when needed.

A *spec* is what users pass as ``-m SPEC`` (parsed by :mod:`rwkv_cli.loading.spec`). The forms
are tried in this order:

1. a path to an existing local file;
2. ``OWNER/NAME:FILENAME``, one file of a Hub repo;
3. ``OWNER/NAME``, a repo: its newest checkpoint by the 8-digit date in the file names;
4. an alias such as ``rwkv7-g1-0.1b``: a repo plus a file-name pattern. The newest match wins, so
   new releases are picked up without a code change;
5. ``demo``: the small demo model shipped with rwkv-cli (:mod:`rwkv_cli.demo`), a local file.

The file is then fetched into the Hugging Face cache by :mod:`rwkv_cli.loading.download`
(resumable, checked against the Hub's checksum). Before asking the Hub, and when it cannot be
reached, the cache is looked in for a file the spec already means. Where the file was found is
returned as a :class:`~rwkv_cli.loading.provenance.Provenance`.

Settings: huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``
and ``HF_HUB_DISABLE_PROGRESS_BARS`` once, when it is first imported. This module and
:mod:`rwkv_cli.loading.download` read the results from ``huggingface_hub.constants`` on every
call, so set the variables before that import, or patch the constants. ``HF_TOKEN`` is read
again for each request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

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

from rwkv_cli.demo import DEMO_SPEC, demo_checkpoint
from rwkv_cli.errors import (
    HubAccessError,
    HubUnreachableError,
    InvalidInputError,
    ModelNotFoundError,
    NotCachedError,
    RemoteFileNotFoundError,
    RepoNotFoundError,
    RwkvCliError,
)
from rwkv_cli.loading.download import (
    GIT_SHA1,
    LIBRARY,
    RemoteFile,
    download_to_cache,
    error_reason,
    notice,
    repo_folder,
    require_cache_folder,
)
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.loading.spec import (
    TRANSFORMERS_WEIGHTS,
    HubSpec,
    checked_filename,
    is_checkpoint,
    is_repo_checkpoint,
    listed,
    parse_spec,
)

if TYPE_CHECKING:
    from rich.console import Console

_SAFE_ETAG = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]*")  # it names a file in blobs/

_OFFLINE_HINT = (
    "check your connection and HF_ENDPOINT; set HF_HUB_OFFLINE=1 to use only cached models, "
    "or pass the path of a local checkpoint"
)
_TOKEN_HINT = (
    "check the name; for a private or gated repo, set HF_TOKEN to a token that can read it "
    "(https://huggingface.co/settings/tokens)"
)


@dataclass(frozen=True)
class CachedModel:
    """A checkpoint file in the local Hugging Face cache."""

    repo_id: str
    filename: str
    size: int
    path: Path
    revision: str  # the commit sha of the snapshot holding it


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
                if is_checkpoint(name):
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
    again: bool = False,
) -> Provenance:
    """Turn a model spec into a local file, downloading it into the Hugging Face cache if needed.

    ``revision`` (a branch, tag or commit) applies to Hub specs. ``progress``: ``None`` shows a bar
    when stderr is a terminal (unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set); ``True`` shows it on
    a terminal regardless of that variable; ``False`` never shows it. A bar is never drawn when
    stderr is not a terminal. A one-line notice goes to ``console`` (default: stderr) before any
    download. With ``HF_HUB_OFFLINE=1`` only the cache is consulted. If the Hub cannot be reached,
    a cached copy is used when there is one. ``again`` downloads a Hub file even if it is cached
    (to replace a damaged copy).
    """
    local = Path(spec).expanduser()
    if local.is_file() or local.is_dir():
        if revision is not None:
            raise InvalidInputError(f"a revision applies to Hub models, not to the file {spec}")
        if local.is_dir():
            return Provenance(_checkpoint_in(local, console or _stderr_console()))
        return Provenance(local.resolve())
    if spec.strip().lower() == DEMO_SPEC:
        if revision is not None:
            raise InvalidInputError("a revision applies to Hub models, not to the demo model")
        return Provenance(demo_checkpoint())
    target = parse_spec(spec.strip())
    offline = constants.is_offline_mode()
    pinned = revision is not None and GIT_SHA1.fullmatch(revision) is not None
    if offline and again:
        raise InvalidInputError(
            f"cannot download {target.label} again: HF_HUB_OFFLINE is set",
            hint="unset HF_HUB_OFFLINE",
        )
    if (offline or pinned) and not again:  # a commit's files never change: a cached copy will do
        cached = _from_cache(target, revision)
        if cached is not None:
            return cached
        if offline:
            at = f" at {revision}" if revision else ""
            raise NotCachedError(
                f"{target.label}{at} is not in the local cache and HF_HUB_OFFLINE is set",
                hint="unset HF_HUB_OFFLINE to download it, or pass the path of a local checkpoint",
            )
    console = console or _stderr_console()
    require_cache_folder()
    try:
        remote = _locate(target, revision)
    except HubUnreachableError as error:
        cached = None if again else _from_cache(target, revision)
        if cached is None:
            raise
        notice(console, f"{error.message}; using the cached {cached.hub_spec}")
        return cached
    path = download_to_cache(remote, progress=progress, console=console, again=again)
    return Provenance(path, remote.repo_id, remote.filename, remote.commit)


def _checkpoint_in(folder: Path, console: Console) -> Path:
    """The checkpoint a local folder holds, chosen like a repo's: the only one, or the newest by
    the date in its name (then a notice says which); else transformers' ``pytorch_model.bin``."""
    names = sorted(path.name for path in folder.iterdir() if path.is_file())
    chosen = HubSpec(str(folder)).choose(names)
    checkpoints = [name for name in names if is_repo_checkpoint(name)]
    if chosen is not None:
        if len(checkpoints) > 1:
            notice(console, f"Using {chosen}, the newest of {len(checkpoints)} in {folder}")
        return (folder / chosen).resolve()
    if not checkpoints and TRANSFORMERS_WEIGHTS in names:
        return (folder / TRANSFORMERS_WEIGHTS).resolve()
    if not checkpoints:
        others = [name for name in names if is_checkpoint(name)]
        if others:
            raise ModelNotFoundError(
                f"the folder {folder} holds no model checkpoint, only {listed(others)}",
                hint="state-tuning files go with --state; experimental RWKV-7 variants (rwkv7a, "
                "rwkv7b) do not run",
            )
        raise ModelNotFoundError(
            f"the folder {folder} holds no checkpoint (.pth, .safetensors or pytorch_model.bin)",
            hint="pass the checkpoint file itself",
        )
    raise ModelNotFoundError(
        f"cannot tell which checkpoint in {folder} to use: {listed(checkpoints)}",
        hint="pass one of them as the file's path",
    )


# --- the Hub: finding the file -----------------------------------------------------------------


def _locate(target: HubSpec, revision: str | None) -> RemoteFile:
    """Ask the Hub which file and commit the spec means; no bytes are downloaded."""
    endpoint = constants.ENDPOINT
    filename, ref = target.filename, revision or constants.DEFAULT_REVISION
    if filename is None:
        names, commit = _list_repo(target.repo_id, revision)
        filename = target.choose(names)
        if filename is None:
            raise _no_such_file(target, names)
        filename, ref = checked_filename(filename), commit or ref
    url = f"{endpoint}/{target.repo_id}/resolve/{quote(ref, safe='')}/{quote(filename)}"
    with _hub_errors(target.repo_id, revision):
        try:
            meta = get_hf_file_metadata(url, timeout=constants.HF_HUB_ETAG_TIMEOUT, **LIBRARY)
        except RemoteEntryNotFoundError:
            meta = None
    if meta is None:
        names, _ = _list_repo(target.repo_id, revision)
        raise _no_such_file(target, names)
    commit, etag = meta.commit_hash or "", meta.etag or ""
    if not GIT_SHA1.fullmatch(commit) or not _SAFE_ETAG.fullmatch(etag):
        raise HubUnreachableError(
            f"{endpoint} does not answer like a Hugging Face Hub (commit or ETag header missing)",
            hint="check HF_ENDPOINT",
        )
    if meta.location == url:  # no redirect: fetch from the commit, not a branch that may move
        url = f"{endpoint}/{target.repo_id}/resolve/{commit}/{quote(filename)}"
    else:
        url = meta.location
    return RemoteFile(target.repo_id, filename, revision, commit, etag, meta.size, url)


def _list_repo(repo_id: str, revision: str | None) -> tuple[list[str], str | None]:
    """The repo's file names at ``revision`` and the commit they belong to."""
    api = HfApi(endpoint=constants.ENDPOINT, **LIBRARY)
    with _hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    return [sibling.rfilename for sibling in info.siblings or []], info.sha


def _no_such_file(target: HubSpec, names: list[str]) -> RemoteFileNotFoundError:
    repo = target.repo_id
    if target.filename is not None:
        message = f"{target.filename} is not in {repo}"
    elif target.alias is not None:
        message = f"no file in {repo} matches the alias {target.alias.name}"
    else:
        message = f"cannot tell which checkpoint of {repo} to use"
    checkpoints = sorted(name for name in names if is_checkpoint(name))
    if not checkpoints:
        return RemoteFileNotFoundError(message, hint=f"{repo} has no .pth or .safetensors files")
    return RemoteFileNotFoundError(
        message, hint=f"pick one as {repo}:FILENAME; its checkpoints: {listed(checkpoints)}"
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
        if isinstance(error, RepositoryNotFoundError):  # the Hub says so (X-Error-Code)
            return RepoNotFoundError(
                f"repository {repo_id} not found on {endpoint}",
                hint="check the name; 'rwkv models' lists the known aliases",
            )
        if status == 404:  # without the Hub's error code: a proxy, a portal, a wrong endpoint
            return HubUnreachableError(
                f"{endpoint} answered HTTP 404 without the Hub's error code: it does not look "
                "like a Hugging Face Hub",
                hint=f"check HF_ENDPOINT and any proxy; {_OFFLINE_HINT}",
            )
        return HubUnreachableError(f"{endpoint} answered HTTP {status}", hint=_OFFLINE_HINT)
    if isinstance(error, FileMetadataError):
        return HubUnreachableError(
            f"{endpoint} does not answer like a Hugging Face Hub", hint="check HF_ENDPOINT"
        )
    return HubUnreachableError(
        f"cannot reach {endpoint} ({error_reason(error)})", hint=_OFFLINE_HINT
    )


# --- the cache ---------------------------------------------------------------------------------


def _from_cache(target: HubSpec, revision: str | None) -> Provenance | None:
    """Resolve from what is cached, without the network: the ref's snapshot first."""
    storage = repo_folder(target.repo_id)
    if not (storage / "snapshots").is_dir():
        return None
    for commit in _cached_commits(storage, revision):
        snapshot = storage / "snapshots" / commit
        names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        filename = target.choose(names)
        if filename is not None:
            return Provenance(snapshot / filename, target.repo_id, filename, commit)
    return None


def _cached_commits(storage: Path, revision: str | None) -> list[str]:
    """Snapshots to look in: the commit the revision names; for no revision, then all others."""
    if revision is not None and GIT_SHA1.fullmatch(revision):
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


# --- output ------------------------------------------------------------------------------------


def _stderr_console() -> Console:
    from rwkv_cli.ui import stderr_console  # late: ui imports the generation stack

    return stderr_console()
