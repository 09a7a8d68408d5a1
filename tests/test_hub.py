"""Model specs, downloads, the cache and offline use, against tests/hub_server.py."""

from __future__ import annotations

import errno
import functools
import hashlib
import http.server
import io
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub import constants as hf_constants
from rich.console import Console

from rwkv_cli import fileio
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
    WriteError,
)
from rwkv_cli.loading import download
from rwkv_cli.loading.hub import CachedModel, cached_models, resolve_model
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.loading.spec import ALIASES, list_aliases
from rwkv_cli.models import load_model
from rwkv_cli.settings import DEFAULT_MODEL
from rwkv_cli.ui import print_models
from tests.conftest import LocalHub
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S
from tests.support.fixtures import rwkv7_tensors, write_pth

G1 = "BlinkDL/rwkv7-g1"
G1_OLD = "rwkv7-g1-0.1b-20250307-ctx4096.pth"
G1_NEW = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
G1_04 = "rwkv7-g1d-0.4b-20260210-ctx8192.pth"
G1_15 = "rwkv7-g1b-1.5b-20251202-ctx8192.pth"
EXPERIMENTAL = "rwkv7a-g1b-0.1b-20251010-ctx4096.pth"  # newer, but never picked by an alias
PAYLOAD_BYTES = 300_000


def payload(seed: int, size: int = PAYLOAD_BYTES) -> bytes:
    return random.Random(seed).randbytes(size)


G1_FILES = {
    G1_OLD: payload(1),
    G1_NEW: payload(2),
    G1_04: payload(3),
    G1_15: payload(4),
    EXPERIMENTAL: payload(5),
    "README.md": b"# RWKV-7 G1\n",
}


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "RETRY_DELAYS_S", (0.0, 0.0))


@pytest.fixture
def g1(local_hub: LocalHub) -> LocalHub:
    """The local Hub with a BlinkDL/rwkv7-g1 look-alike published on main."""
    local_hub.server.add_repo(G1, G1_FILES)
    return local_hub


def quiet() -> Console:
    return Console(file=io.StringIO(), force_terminal=False)


def resolve(spec: str, **kwargs: object) -> Provenance:
    kwargs.setdefault("console", quiet())
    return resolve_model(spec, **kwargs)  # type: ignore[arg-type]


def files_in(cache: Path) -> list[str]:
    """Every file in the cache except lock files, relative to it."""
    if not cache.exists():
        return []
    files = (p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)
    return sorted(p.relative_to(cache).as_posix() for p in files)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- aliases -----------------------------------------------------------------------------------

AliasCase = namedtuple("AliasCase", "alias matches rejects")
ALIAS_CASES = [
    AliasCase(
        "rwkv7-g1-0.4b",
        ["rwkv7-g1-0.4b-20250324-ctx4096.pth", G1_04],
        ["rwkv7a-g1b-0.4b-20251010-ctx4096.pth", "rwkv7-g1-0.4b-20250324-ctx4096.pth.json"],
    ),
    AliasCase(  # releases G1a2, G1a3 (a digit after the letter) are G1 too
        "rwkv7-g1-1.5b",
        ["rwkv7-g1a2-1.5b-20251005-ctx8192.pth", "rwkv7-g1a3-1.5b-20251015-ctx8192.pth", G1_15],
        ["rwkv7-g0a3-1.5b-20251029-ctx8192.pth", "rwkv7a-g1b-1.5b-20251010-ctx8192.pth"],
    ),
    AliasCase(
        "rwkv7-world-0.1b",
        ["RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth"],
        ["RWKV-x070-World-0.4B-v2.9-20250107-ctx4096.pth"],
    ),
    AliasCase(
        "rwkv6-world-1.6b",
        ["RWKV-x060-World-1B6-v2.1-20240328-ctx4096.pth"],
        ["RWKV-x060-World-3B-v2.1-20240417-ctx4096.pth"],
    ),
    AliasCase(
        "rwkv5-world-1.5b",
        ["RWKV-5-World-1B5-v2-20231025-ctx4096.pth"],
        ["RWKV-5-World-0.1B-v1-20230803-ctx4096.pth"],
    ),
    AliasCase("rwkv5-world-7b", ["RWKV-v5-Eagle-World-7B-v2-20240128-ctx4096.pth"], []),
    AliasCase(
        "rwkv4-pile-169m",
        ["RWKV-4-Pile-169M-20220807-8023.pth"],
        ["RWKV-4-Pile-169M-Instruct-test1-20230116.pth"],
    ),
    AliasCase(
        "rwkv4-pile-1.5b",
        ["RWKV-4-Pile-1B5-20220929-ctx4096.pth"],
        ["RWKV-4-Pile-1B5-Instruct-test2-20230209.pth"],
    ),
    AliasCase(
        "rwkv4-world-1.5b",
        ["RWKV-4-World-1.5B-v1-fixed-20230612-ctx4096.pth"],
        ["RWKV-4-World-CHNtuned-1.5B-v1-20230620-ctx4096.pth"],
    ),
]


def test_aliases_cover_every_family_and_size() -> None:
    aliases = {alias.name: alias.repo_id for alias in list_aliases()}
    expected = {
        "rwkv7-g1-": ("0.1b", "0.4b", "1.5b", "2.9b", "7.2b", "13.3b"),
        "rwkv7-world-": ("0.1b", "0.4b", "1.5b", "2.9b"),
        "rwkv6-world-": ("1.6b", "3b", "7b", "14b"),
        "rwkv5-world-": ("0.1b", "0.4b", "1.5b", "3b", "7b"),
        "rwkv4-pile-": ("169m", "430m", "1.5b", "3b", "7b", "14b"),
        "rwkv4-world-": ("0.1b", "0.4b", "1.5b", "3b", "7b"),
    }
    assert set(aliases) == {prefix + size for prefix, sizes in expected.items() for size in sizes}
    assert aliases[DEFAULT_MODEL] == G1
    assert aliases["rwkv5-world-7b"] == "RWKV/v5-Eagle-7B-pth"
    assert aliases["rwkv4-pile-1.5b"] == "BlinkDL/rwkv-4-pile-1b5"
    assert aliases["rwkv6-world-14b"] == "BlinkDL/rwkv-6-world"


@pytest.mark.parametrize("case", ALIAS_CASES, ids=lambda case: case.alias)
def test_alias_patterns_match_official_file_names(case: AliasCase) -> None:
    alias = ALIASES[case.alias]
    assert all(alias.matches(name) for name in case.matches)
    assert not any(alias.matches(name) for name in case.rejects)


def test_alias_takes_the_newest_matching_file(g1: LocalHub) -> None:
    commit = g1.server.repos[G1].refs["main"]

    model = resolve("rwkv7-g1-0.1b")

    assert model.filename == G1_NEW
    assert model.repo_id == G1
    assert model.revision == commit
    assert model.resolved == f"{G1}:{G1_NEW}@{commit}"
    assert model.path.read_bytes() == G1_FILES[G1_NEW]
    assert resolve("RWKV7-G1-0.4B").filename == G1_04


def test_alias_without_a_matching_file_lists_what_the_repo_has(g1: LocalHub) -> None:
    with pytest.raises(RemoteFileNotFoundError) as caught:
        resolve("rwkv7-g1-2.9b")
    assert "rwkv7-g1-2.9b" in caught.value.message
    assert G1_NEW in caught.value.hint and "README.md" not in caught.value.hint


def test_repo_and_filename(g1: LocalHub) -> None:
    model = resolve(f"{G1}:{G1_OLD}")
    assert (model.filename, model.path.read_bytes()) == (G1_OLD, G1_FILES[G1_OLD])


def test_bare_repo_takes_the_newest_regular_checkpoint(local_hub: LocalHub) -> None:
    files = {
        "rwkv7-g1a-0.1b-20250728-ctx4096.pth": payload(1, 1000),
        "rwkv7-g1b-1.5b-20251202-ctx8192.safetensors": payload(2, 1000),
        "rwkv7b-g1b-0.1b-20251231-ctx4096.pth": payload(3, 1000),  # experimental
        "rwkv7-g1-0.4b-20260101-state.pth": payload(4, 1000),  # state tuning
        "notes-20260301.txt": b"not a checkpoint",
    }
    local_hub.server.add_repo("someone/rwkv-mix", files)
    model = resolve("someone/rwkv-mix")
    assert model.filename == "rwkv7-g1b-1.5b-20251202-ctx8192.safetensors"


def test_an_existing_local_file_comes_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "BlinkDL").mkdir()
    local = tmp_path / "BlinkDL" / "rwkv7-g1"  # looks like a repo id, but it is a file here
    local.write_bytes(b"weights")
    monkeypatch.chdir(tmp_path)

    model = resolve("BlinkDL/rwkv7-g1")

    assert model.path == local.resolve() and model.resolved == str(local.resolve())
    assert model.repo_id is None and model.revision is None
    with pytest.raises(InvalidInputError):
        resolve("BlinkDL/rwkv7-g1", revision="main")


def test_a_local_folder_means_its_checkpoint(tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "rwkv-x.pth"):
        (tmp_path / name).write_bytes(b"")
    assert resolve(str(tmp_path)).path == tmp_path / "rwkv-x.pth"
    with pytest.raises(InvalidInputError):
        resolve(str(tmp_path), revision="main")


def test_a_local_folder_of_dated_checkpoints_means_the_newest(tmp_path: Path) -> None:
    for name in ("rwkv7-g1a-0.1b-20250728-ctx4096.pth", "rwkv7-g1-0.1b-20250307-ctx4096.pth"):
        (tmp_path / name).write_bytes(b"")
    console = quiet()
    assert resolve(str(tmp_path), console=console).path.name.startswith("rwkv7-g1a-0.1b-20250728")
    assert "the newest of 2 in" in console.file.getvalue()


def test_a_local_folder_without_one_clear_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="holds no checkpoint"):
        resolve(str(tmp_path))
    (tmp_path / "a.pth").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"cannot tell which checkpoint .*: a.pth, b.saf"):
        resolve(str(tmp_path))


def test_a_folder_of_transformers_weights_means_its_pytorch_model_bin(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    assert resolve(str(tmp_path)).path == tmp_path / "pytorch_model.bin"


def test_a_folder_of_state_files_and_variants_says_what_it_holds(tmp_path: Path) -> None:
    for name in ("rwkv7a-g1b-0.1b-20251010-ctx4096.pth", "rwkv7-g1-0.1b-state.pth"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no model checkpoint, only rwkv7-g1-0\.1b-state"):
        resolve(str(tmp_path))


def test_a_missing_local_path_is_not_sent_to_the_hub(local_hub: LocalHub) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape("no such file: models/missing.pth")):
        resolve("models/missing.pth")
    assert local_hub.server.requests == []


def test_unknown_spec_names_what_was_tried_and_suggests_an_alias(local_hub: LocalHub) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        resolve("rwkv7-g1-0.2b")
    assert "not a local file, a Hub repo" in caught.value.message
    assert "rwkv7-g1-0.1b" in caught.value.hint and "rwkv models" in caught.value.hint
    assert local_hub.server.requests == []


def test_file_names_cannot_leave_the_cache(local_hub: LocalHub) -> None:
    with pytest.raises(ModelNotFoundError, match="invalid file name"):
        resolve(f"{G1}:../../outside.pth")
    assert local_hub.server.requests == []

    hostile = "x/../../../rwkv7-g1a-0.1b-20990101-ctx4096.pth"  # a listing from a bad mirror
    local_hub.server.add_repo(G1, {hostile: payload(1, 100)})
    with pytest.raises(ModelNotFoundError, match="invalid file name"):
        resolve("rwkv7-g1-0.1b")
    assert files_in(local_hub.cache) == []


# --- download and cache ------------------------------------------------------------------------


def test_download_fills_the_hf_cache_and_is_reused(g1: LocalHub) -> None:
    first = resolve("rwkv7-g1-0.1b")

    snapshot = g1.cache / "models--BlinkDL--rwkv7-g1" / "snapshots" / first.revision
    assert first.path == snapshot / G1_NEW and first.path.is_symlink()
    assert first.path.resolve().parent.name == "blobs"
    assert try_to_load_from_cache(G1, G1_NEW, cache_dir=g1.cache) == str(first.path)
    assert len(g1.server.file_gets(G1_NEW)) == 1
    assert not [name for name in files_in(g1.cache) if name.endswith(".incomplete")]

    second = resolve("rwkv7-g1-0.1b")
    again = resolve(f"{G1}:{G1_NEW}")

    assert second == first
    assert again.path == first.path
    assert len(g1.server.file_gets(G1_NEW)) == 1  # no second GET of the bytes


def test_offline_resolves_from_the_cache_without_any_request(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloaded = resolve("rwkv7-g1-0.1b").path
    g1.server.requests.clear()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)

    for spec in ("rwkv7-g1-0.1b", G1, f"{G1}:{G1_NEW}"):
        assert resolve(spec).path == downloaded
    with pytest.raises(NotCachedError) as caught:
        resolve("rwkv7-g1-1.5b")

    assert "HF_HUB_OFFLINE" in caught.value.hint
    assert g1.server.requests == []


def test_revision_picks_a_branch_and_a_cached_commit_needs_no_request(g1: LocalHub) -> None:
    v1 = g1.server.add_repo(G1, {G1_OLD: G1_FILES[G1_OLD]}, revision="v1")

    model = resolve("rwkv7-g1-0.1b", revision="v1")
    assert (model.filename, model.revision) == (G1_OLD, v1)
    assert (g1.cache / "models--BlinkDL--rwkv7-g1" / "refs" / "v1").read_text() == v1

    g1.server.requests.clear()
    assert resolve("rwkv7-g1-0.1b", revision=v1).path == model.path
    assert g1.server.requests == []

    with pytest.raises(ModelNotFoundError, match="revision 'nope' not found"):
        resolve("rwkv7-g1-0.1b", revision="nope")


def test_a_small_git_file_is_checked_against_its_git_hash(g1: LocalHub) -> None:
    assert resolve(f"{G1}:README.md").path.read_bytes() == G1_FILES["README.md"]


# --- resume ------------------------------------------------------------------------------------

CUT_AT = 100_000


def test_an_interrupted_download_resumes_where_it_stopped(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "RETRY_DELAYS_S", ())  # give up at the first drop, like a Ctrl-C
    g1.server.cut_once(G1_NEW, after=CUT_AT)

    with pytest.raises(HubUnreachableError) as caught:
        resolve("rwkv7-g1-0.1b")
    assert "resumes" in caught.value.hint
    partial = [name for name in files_in(g1.cache) if name.endswith(".incomplete")]
    assert len(partial) == 1 and (g1.cache / partial[0]).stat().st_size == CUT_AT

    console = quiet()
    model = resolve("rwkv7-g1-0.1b", console=console)

    first, second = g1.server.file_gets(G1_NEW)
    assert first.range is None and second.range == f"bytes={CUT_AT}-"
    assert model.path.read_bytes() == G1_FILES[G1_NEW]
    assert console.file.getvalue().startswith(f"Resuming {G1}:{G1_NEW} (100 kB of 300 kB")
    assert not [name for name in files_in(g1.cache) if name.endswith(".incomplete")]


def test_a_dropped_connection_is_resumed_within_the_same_call(g1: LocalHub) -> None:
    g1.server.cut_once(G1_NEW, after=CUT_AT)

    model = resolve("rwkv7-g1-0.1b")

    assert [r.range for r in g1.server.file_gets(G1_NEW)] == [None, f"bytes={CUT_AT}-"]
    assert model.path.read_bytes() == G1_FILES[G1_NEW]


def test_a_server_that_ignores_range_gets_a_clean_restart(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(download, "RETRY_DELAYS_S", ())
    g1.server.cut_once(G1_NEW, after=CUT_AT)
    with pytest.raises(HubUnreachableError):
        resolve("rwkv7-g1-0.1b")
    g1.server.ignore_ranges = True

    model = resolve("rwkv7-g1-0.1b")

    assert g1.server.file_gets(G1_NEW)[-1].range == f"bytes={CUT_AT}-"  # asked, answered 200
    assert model.path.read_bytes() == G1_FILES[G1_NEW]


# --- errors ------------------------------------------------------------------------------------


def test_unknown_repo(local_hub: LocalHub) -> None:
    with pytest.raises(RepoNotFoundError, match="repository BlinkDL/nope not found") as caught:
        resolve("BlinkDL/nope:model.pth")
    assert "rwkv models" in caught.value.hint
    with pytest.raises(RepoNotFoundError):
        resolve("rwkv4-pile-169m")  # the alias's repo does not exist on this Hub


def test_unknown_file_lists_the_checkpoints_the_repo_has(g1: LocalHub) -> None:
    with pytest.raises(RemoteFileNotFoundError) as caught:
        resolve(f"{G1}:rwkv7-g1-9b-20990101.pth")
    assert caught.value.message == f"rwkv7-g1-9b-20990101.pth is not in {G1}"
    for name in (G1_OLD, G1_NEW, G1_04, G1_15):
        assert name in caught.value.hint
    assert "README.md" not in caught.value.hint


def test_private_repo_needs_a_token(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch) -> None:
    local_hub.server.add_repo("me/private", {G1_NEW: G1_FILES[G1_NEW]}, token="hf_right")

    with pytest.raises(HubAccessError) as caught:
        resolve("me/private")
    assert "HTTP 401" in caught.value.message and "HF_TOKEN" in caught.value.hint
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubAccessError):
        resolve(f"me/private:{G1_NEW}")

    monkeypatch.setenv("HF_TOKEN", "hf_right")
    assert resolve("me/private").path.read_bytes() == G1_FILES[G1_NEW]
    (download,) = local_hub.server.file_gets(G1_NEW)
    assert download.server == "cdn" and "authorization" not in download.headers


def test_hub_down_is_a_network_error_with_the_offline_hint(
    local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    down = closed_port_url()
    monkeypatch.setattr(hf_constants, "ENDPOINT", down)

    with pytest.raises(HubUnreachableError) as caught:
        resolve("rwkv7-g1-0.1b")

    assert caught.value.message.startswith(f"cannot reach {down}")
    assert "HF_HUB_OFFLINE=1" in caught.value.hint and "local checkpoint" in caught.value.hint


def test_hub_down_falls_back_to_a_cached_copy(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloaded = resolve("rwkv7-g1-0.1b").path
    monkeypatch.setattr(hf_constants, "ENDPOINT", closed_port_url())
    console = quiet()

    assert resolve("rwkv7-g1-0.1b", console=console).path == downloaded
    assert "using the cached" in console.file.getvalue()


def test_an_endpoint_that_is_not_a_hub_falls_back_to_a_cached_copy(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    downloaded = resolve("rwkv7-g1-0.1b").path
    # A plain web server (a captive portal, a wrong HF_ENDPOINT): 404 for everything, and
    # without the Hub's X-Error-Code, so it says nothing about the repository.
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as plain:
        threading.Thread(target=plain.serve_forever, daemon=True).start()
        monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{plain.server_port}")
        console = quiet()
        assert resolve("rwkv7-g1-0.1b", console=console).path == downloaded
        with pytest.raises(HubUnreachableError, match="does not look like a Hugging Face Hub"):
            resolve("rwkv7-g1-0.4b")
        plain.shutdown()
    assert "using the cached" in console.file.getvalue()


def test_a_download_under_way_elsewhere_is_waited_for_with_a_notice(g1: LocalHub) -> None:
    fcntl = pytest.importorskip("fcntl")
    etag = hashlib.sha256(G1_FILES[G1_NEW]).hexdigest()  # names huggingface_hub's lock
    lock = Path(hf_constants.HF_HUB_CACHE) / ".locks" / "models--BlinkDL--rwkv7-g1" / f"{etag}.lock"
    lock.parent.mkdir(parents=True)
    console, resolved = quiet(), []

    def download() -> None:
        resolved.append(resolve(f"{G1}:{G1_NEW}", console=console))

    with lock.open("a") as other_download:
        fcntl.flock(other_download, fcntl.LOCK_EX)
        waiting = threading.Thread(target=download)
        waiting.start()
        deadline = time.monotonic() + 30
        while "Waiting for another download" not in console.file.getvalue():
            assert time.monotonic() < deadline and waiting.is_alive()
            time.sleep(0.05)
        time.sleep(0.3)
        assert waiting.is_alive()  # it waits for the other download's lock
    waiting.join(timeout=60)
    assert resolved and resolved[0].path.read_bytes() == G1_FILES[G1_NEW]
    notices = console.file.getvalue().splitlines()
    assert notices[0] == f"Waiting for another download of {G1}:{G1_NEW} to finish"


def test_disk_full_leaves_nothing_half_written(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[int] = []

    def write_then_fail(out: io.BufferedWriter, chunk: bytes) -> None:
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(out.write(chunk))

    monkeypatch.setattr(download, "_write_chunk", write_then_fail)

    with pytest.raises(DiskFullError) as caught:
        resolve("rwkv7-g1-0.1b")

    assert written and "HF_HOME" in caught.value.hint
    assert files_in(g1.cache) == []


def test_too_little_space_is_reported_before_downloading(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))

    with pytest.raises(DiskFullError, match=re.escape("300 kB needed, 1.0 kB free")):
        resolve("rwkv7-g1-0.1b")
    assert g1.server.file_gets(G1_NEW) == []


def test_a_cache_that_cannot_be_a_folder_is_reported_before_any_request(
    g1: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.touch()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(blocker / "hub"))
    with pytest.raises(WriteError, match=r"cannot write to the Hugging Face cache .*a-file/hub"):
        resolve("rwkv7-g1-0.1b")
    assert g1.server.requests == []


@pytest.mark.parametrize("filename", [G1_NEW, "README.md"], ids=["lfs-sha256", "git-sha1"])
def test_a_corrupt_download_is_detected_and_deleted(g1: LocalHub, filename: str) -> None:
    g1.server.corrupt(filename)

    with pytest.raises(ChecksumMismatchError, match="is corrupt") as caught:
        resolve(f"{G1}:{filename}")

    assert "run the command again" in caught.value.hint
    assert files_in(g1.cache) == []


# --- output ------------------------------------------------------------------------------------


def test_notice_without_a_terminal_is_one_plain_line(g1: LocalHub) -> None:
    console = Console(file=io.StringIO(), force_terminal=False)
    resolve("rwkv7-g1-0.1b", console=console)
    assert console.file.getvalue() == f"Downloading {G1}:{G1_NEW} (300 kB)\n"


def test_a_terminal_gets_a_progress_bar_unless_disabled(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    resolve("rwkv7-g1-0.1b", console=terminal)
    assert "\x1b[" in terminal.file.getvalue() and "300.0 kB" in terminal.file.getvalue()

    plain = Console(file=io.StringIO(), force_terminal=True, width=100)
    resolve(f"{G1}:{G1_04}", console=plain, progress=False)
    assert plain.file.getvalue() == f"Downloading {G1}:{G1_04} (300 kB)\n"

    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    muted = Console(file=io.StringIO(), force_terminal=True, width=100)
    resolve(f"{G1}:{G1_15}", console=muted)
    assert muted.file.getvalue() == f"Downloading {G1}:{G1_15} (300 kB)\n"


def test_cached_models_lists_downloaded_checkpoints(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cached_models() == []
    with monkeypatch.context() as patch:  # leave a partial download behind: it is not listed
        patch.setattr(download, "RETRY_DELAYS_S", ())
        g1.server.cut_once(G1_04, after=CUT_AT)
        with pytest.raises(HubUnreachableError):
            resolve("rwkv7-g1-0.4b")
    paths = {resolve(spec).path for spec in ("rwkv7-g1-0.1b", "rwkv7-g1-1.5b")}
    resolve(f"{G1}:README.md")

    listed = cached_models()

    assert [(m.repo_id, m.filename, m.size) for m in listed] == [
        (G1, G1_NEW, PAYLOAD_BYTES),
        (G1, G1_15, PAYLOAD_BYTES),
    ]
    assert {m.path for m in listed} == paths


def test_a_file_kept_for_two_commits_is_listed_with_each_revision(tmp_path, capsys) -> None:
    kept = [
        CachedModel(G1, G1_NEW, 10, tmp_path / "a" / G1_NEW, "a" * 40),
        CachedModel(G1, G1_NEW, 20, tmp_path / "b" / G1_NEW, "b" * 40),
        CachedModel(G1, G1_15, 30, tmp_path / "b" / G1_15, "b" * 40),
    ]
    print_models(list_aliases(), kept)
    listed = capsys.readouterr().out.split("Downloaded:")[1]
    assert f"{G1}:{G1_NEW} --revision {'a' * 12}  10 B" in listed
    assert f"{G1}:{G1_NEW} --revision {'b' * 12}  20 B" in listed
    assert f"{G1}:{G1_15}  30 B" in listed  # one version: no revision needed


def test_huggingface_hub_itself_works_with_the_local_hub_and_shares_the_cache(
    g1: LocalHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = HfApi(endpoint=g1.server.url)
    assert api.list_repo_files(G1) == sorted(G1_FILES)
    path = hf_hub_download(G1, G1_NEW)

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert resolve("rwkv7-g1-0.1b").path == Path(path)


# --- end to end --------------------------------------------------------------------------------


def test_a_downloaded_tiny_checkpoint_loads(local_hub: LocalHub, tmp_path: Path) -> None:
    tiny = write_pth(tmp_path / "tiny.pth", rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=512))
    local_hub.server.add_repo(G1, {G1_OLD: payload(1, 1000), G1_NEW: tiny.read_bytes()})

    model = load_model(resolve(DEFAULT_MODEL).path)

    assert model.generation == "7" and model.vocab_size == 512


def test_environment_variables_are_honoured_in_a_fresh_process(local_hub: LocalHub) -> None:
    """HF_ENDPOINT, HF_HOME, HF_TOKEN and HF_HUB_OFFLINE, read by huggingface_hub at import."""
    local_hub.server.add_repo(G1, G1_FILES, token="hf_secret")
    script = (
        "import sys; from rwkv_cli.loading.hub import resolve_model; "
        "print(resolve_model(sys.argv[1]).path)"
    )

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", script, "rwkv7-g1-0.1b"],
            env=local_hub.env(**env),
            capture_output=True,
            text=True,
            timeout=SLOW_MACHINE_TIMEOUT_S,
            check=False,
        )

    online = run(HF_TOKEN="hf_secret")
    assert online.returncode == 0, online.stderr
    path = Path(online.stdout.strip())
    assert path.is_relative_to(local_hub.cache) and path.read_bytes() == G1_FILES[G1_NEW]
    assert online.stderr == f"Downloading {G1}:{G1_NEW} (300 kB)\n"  # plain: stderr is a pipe

    local_hub.server.requests.clear()
    offline = run(HF_HUB_OFFLINE="1")
    assert offline.returncode == 0, offline.stderr
    assert Path(offline.stdout.strip()) == path and offline.stderr == ""
    assert local_hub.server.requests == []
