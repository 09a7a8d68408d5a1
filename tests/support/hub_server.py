"""A small Hugging Face Hub look-alike for download tests, on 127.0.0.1 only.

It answers the requests huggingface_hub 2.4 and ``rwkv_cli.loading.hub`` make, with the Hub's
headers:

- ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info with ``sha`` and
  ``siblings`` (sizes, blob ids and LFS data with ``?blobs=true``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``: small git files are served directly with the
  git blob hash as ``ETag``; LFS files (checkpoints) answer ``302`` to a second "CDN" listener on
  another port, with ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, as
  the real Hub does. Both honour ``Range``.

Faults: a private repo answers 401 without the right ``Authorization`` header; unknown repos,
revisions and files answer 404 with the Hub's ``X-Error-Code``; a file's body can be cut after N
bytes once, or corrupted. Every request is recorded. Threads are daemons, sockets time out, the
number of requests is capped, and ``stop()`` (the fixture's teardown) shuts both listeners down.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".pth", ".safetensors", ".bin")
MAX_REQUESTS = 2000  # a runaway retry loop fails the test instead of spinning forever
SOCKET_TIMEOUT_S = 10
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Request:
    """One request as the server saw it."""

    server: str  # "hub" or "cdn"
    method: str
    path: str  # unquoted, without the query
    query: str
    headers: Mapping[str, str]  # lower-case names

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class _Repo:
    repo_id: str
    token: str | None
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha

    def commit(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


def is_lfs(filename: str) -> bool:
    return filename.endswith(LFS_SUFFIXES)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file stored as-is: sha1 of ``blob <size>\\0<content>``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    sha = hashlib.sha256(content).hexdigest()
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(content)}\n"
    ).encode()


class HubServer:
    """A Hub look-alike: add repos, point ``HF_ENDPOINT`` at ``url``, inspect ``requests``."""

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.requests: list[Request] = []
        self.ignore_ranges = False  # answer 200 with the whole file, as some proxies do
        self._cuts: dict[str, int] = {}
        self._corrupt: set[str] = set()
        self._lock = threading.Lock()
        self._hub = _Listener(self, "hub")
        self._cdn = _Listener(self, "cdn")

    @property
    def url(self) -> str:
        return self._hub.url

    @property
    def cdn_url(self) -> str:
        return self._cdn.url

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes],
        *,
        revision: str = "main",
        token: str | None = None,
    ) -> str:
        """Publish ``files`` as a commit on branch ``revision``; return the commit sha."""
        repo = self.repos.setdefault(repo_id, _Repo(repo_id, token))
        digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[revision] = sha
        return sha

    def cut_once(self, filename: str, after: int) -> None:
        """Drop the connection after ``after`` body bytes the next time ``filename`` is sent."""
        self._cuts[filename] = after

    def corrupt(self, filename: str) -> None:
        """Serve ``filename`` with one byte flipped (headers still describe the good file)."""
        self._corrupt.add(filename)

    def file_gets(self, filename: str) -> list[Request]:
        """The GET requests that fetched ``filename``'s bytes (from the CDN or directly)."""
        return [r for r in self.requests if r.method == "GET" and self._filename_of(r) == filename]

    def _filename_of(self, request: Request) -> str | None:
        if request.server == "cdn":
            return request.path.removeprefix("/cdn/").partition("__")[2]
        parts = request.path.split("/", 5)
        return parts[5] if len(parts) == 6 and parts[3] == "resolve" else None

    def start(self) -> HubServer:
        self._hub.start()
        self._cdn.start()
        return self

    def stop(self) -> None:
        self._hub.stop()
        self._cdn.stop()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _record(self, request: Request) -> bool:
        with self._lock:
            self.requests.append(request)
            return len(self.requests) <= MAX_REQUESTS

    def _take_cut(self, filename: str) -> int | None:
        with self._lock:
            return self._cuts.pop(filename, None)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # keep-alive clients must not stall the teardown

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up mid-response (the point of some tests) are not errors."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)


class _Listener:
    """One ThreadingHTTPServer on an ephemeral loopback port, run in a daemon thread."""

    def __init__(self, hub: HubServer, role: str) -> None:
        handler = type(f"{role.title()}Handler", (_Handler,), {"hub": hub, "role": role})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    hub: HubServer
    role: str

    def log_message(self, format: str, *args: object) -> None:  # silence stderr
        pass

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        request = Request(
            self.role,
            self.command,
            path,
            split.query,
            {name.lower(): value for name, value in self.headers.items()},
        )
        if not self.hub._record(request):
            self._reply(503, {}, b"too many requests", body)
            return
        if self.role == "cdn":
            self._cdn(split.path, body)
            return
        segments = [unquote(part) for part in split.path.strip("/").split("/")]
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            self._api(segments[2:], parse_qs(split.query), body)
        elif len(segments) >= 5 and segments[2] == "resolve":
            self._resolve("/".join(segments[:2]), segments[3], "/".join(segments[4:]), body)
        else:
            self._reply(404, {}, b"not found", body)

    # --- Hub endpoints -----------------------------------------------------------------------

    def _repo(self, repo_id: str, body: bool) -> _Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if repo.token is not None:
            sent = self.headers.get("Authorization")
            if sent is None:
                self._error(401, "RepoNotFound", "Invalid username or password.", body)
                return None
            if sent != f"Bearer {repo.token}":
                self._error(401, None, "Invalid credentials in Authorization header", body)
                return None
        return repo

    def _api(self, parts: list[str], query: dict[str, list[str]], body: bool) -> None:
        repo = self._repo("/".join(parts[:2]), body)
        if repo is None:
            return
        rest = parts[2:]
        revision = rest[1] if len(rest) >= 2 and rest[0] in ("revision", "tree") else "main"
        sha = repo.commit(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return
        files = repo.commits[sha]
        if rest and rest[0] == "tree":
            recursive = query.get("recursive", [""])[0].lower() == "true"
            self._json(_tree(files, "/".join(rest[2:]).strip("/"), recursive), body)
            return
        blobs = query.get("blobs", [""])[0].lower() == "true"
        owner = repo.repo_id.split("/")[0]
        info = {
            "_id": sha[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": owner,
            "sha": sha,
            "lastModified": "2025-07-28T00:00:00.000Z",
            "private": repo.token is not None,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [_sibling(n, files[n], blobs) for n in sorted(files)],
        }
        self._json(info, body)

    def _resolve(self, repo_id: str, revision: str, filename: str, body: bool) -> None:
        repo = self._repo(repo_id, body)
        if repo is None:
            return
        sha = repo.commit(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return
        content = repo.commits[sha].get(filename)
        if content is None:
            self._error(404, "EntryNotFound", "Entry not found", body, {"X-Repo-Commit": sha})
            return
        headers = {"X-Repo-Commit": sha}
        if is_lfs(filename):
            digest = hashlib.sha256(content).hexdigest()
            location = f"{self.hub.cdn_url}/cdn/{digest}__{quote(filename, safe='')}?sig=signed"
            headers |= {
                "Location": location,
                "ETag": f'"{git_blob_oid(lfs_pointer(content))}"',
                "X-Linked-Etag": f'"{digest}"',
                "X-Linked-Size": str(len(content)),
            }
            self._reply(302, headers, b"", body)
        else:
            headers["ETag"] = f'"{git_blob_oid(content)}"'
            self._send_file(filename, content, headers, body)

    # --- the CDN -----------------------------------------------------------------------------

    def _cdn(self, raw_path: str, body: bool) -> None:
        name = unquote(raw_path.removeprefix("/cdn/"))
        digest, _, filename = name.partition("__")
        for repo in self.hub.repos.values():
            for files in repo.commits.values():
                content = files.get(filename)
                if content is not None and hashlib.sha256(content).hexdigest() == digest:
                    self._send_file(filename, content, {"ETag": f'"{digest}"'}, body)
                    return
        self._reply(404, {}, b"no such object", body)

    # --- responses ---------------------------------------------------------------------------

    def _send_file(
        self, filename: str, content: bytes, headers: dict[str, str], body: bool
    ) -> None:
        total = len(content)
        start, end, status = 0, total - 1, 200
        wanted = None if self.hub.ignore_ranges else self.headers.get("Range")
        if wanted:
            match = _RANGE.match(wanted.strip())
            if match is None or int(match.group(1)) >= total:
                self._reply(416, {"Content-Range": f"bytes */{total}"}, b"", body)
                return
            start = int(match.group(1))
            end = min(int(match.group(2)), total - 1) if match.group(2) else total - 1
            status = 206
            headers = headers | {"Content-Range": f"bytes {start}-{end}/{total}"}
        payload = content[start : end + 1]
        if body and filename in self.hub._corrupt and payload:
            payload = bytes([payload[0] ^ 0xFF]) + payload[1:]
        headers = headers | {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        cut = self.hub._take_cut(filename) if body else None
        if cut is None:
            self._reply(status, headers, payload, body)
            return
        self._start(status, headers, len(payload))
        self.wfile.write(payload[:cut])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _json(self, data: object, body: bool) -> None:
        payload = json.dumps(data).encode()
        self._reply(200, {"Content-Type": "application/json"}, payload, body)

    def _error(
        self,
        status: int,
        code: str | None,
        message: str,
        body: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"} | (extra or {})
        if code is not None:
            headers["X-Error-Code"] = code
        self._reply(status, headers, json.dumps({"error": message}).encode(), body)

    def _reply(self, status: int, headers: dict[str, str], payload: bytes, body: bool) -> None:
        self._start(status, headers, len(payload))
        if body and payload:
            self.wfile.write(payload)

    def _start(self, status: int, headers: dict[str, str], length: int) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()


def _sibling(name: str, content: bytes, blobs: bool) -> dict[str, object]:
    entry: dict[str, object] = {"rfilename": name}
    if blobs:
        entry |= _blob_fields(name, content)
    return entry


def _tree(files: Mapping[str, bytes], folder: str, recursive: bool) -> list[dict[str, object]]:
    """The tree listing of ``folder``: its files and sub-folders, or everything below it."""
    prefix = f"{folder}/" if folder else ""
    entries: dict[str, dict[str, object]] = {}
    for name in sorted(files):
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        for depth in range(1, len(parts)):  # the folders on the way to the file
            path = prefix + "/".join(parts[:depth])
            if recursive or depth == 1:
                entries.setdefault(path, {"type": "directory", "oid": "0" * 40, "path": path})
        if recursive or len(parts) == 1:
            entries[name] = _tree_entry(name, files[name])
    return list(entries.values())


def _tree_entry(name: str, content: bytes) -> dict[str, object]:
    fields = _blob_fields(name, content)
    entry = {"type": "file", "oid": fields["blobId"], "size": fields["size"], "path": name}
    if "lfs" in fields:
        lfs = fields["lfs"]
        assert isinstance(lfs, dict)
        entry["lfs"] = {
            "oid": lfs["sha256"],
            "size": lfs["size"],
            "pointerSize": lfs["pointerSize"],
        }
    return entry


def _blob_fields(name: str, content: bytes) -> dict[str, object]:
    if not is_lfs(name):
        return {"blobId": git_blob_oid(content), "size": len(content)}
    pointer = lfs_pointer(content)
    return {
        "blobId": git_blob_oid(pointer),
        "size": len(content),
        "lfs": {
            "sha256": hashlib.sha256(content).hexdigest(),
            "size": len(content),
            "pointerSize": len(pointer),
        },
    }
