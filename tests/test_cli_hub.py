"""Hub-backed CLI use: -m with aliases and repo specs, download, models, offline resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.statefile import read_state_file
from tests.support.cli_runner import assert_one_line_error, rwkv, rwkv_ok
from tests.support.fixtures import rwkv7_tensors, write_pth

G1 = "BlinkDL/rwkv7-g1"
OLD = "rwkv7-g1-0.1b-20250307-ctx4096.pth"
NEW = "rwkv7-g1a-0.1b-20250728-ctx4096.pth"
PROVENANCE_FIELDS = ("model_path", "model_repo", "model_file", "model_revision")


@pytest.fixture
def g1(local_hub, tmp_path):
    """The local Hub serving two tiny RWKV-7 checkpoints under real-looking G1 names."""
    older = write_pth(tmp_path / "old.pth", rwkv7_tensors(seed=7)).read_bytes()
    newer = write_pth(tmp_path / "new.pth", rwkv7_tensors(seed=8)).read_bytes()
    commit = local_hub.server.add_repo(G1, {OLD: older, NEW: newer})
    return local_hub, commit


def test_download_prints_the_local_path_and_announces_on_stderr(g1) -> None:
    hub, _ = g1
    result = rwkv("download", "rwkv7-g1-0.1b", env=hub.env())
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.decode().strip())
    assert path.name == NEW and path.is_file()
    assert result.stderr.decode().startswith(f"Downloading {G1}:{NEW}")


def test_a_damaged_download_names_the_command_that_fetches_it_again(g1, tmp_path) -> None:
    hub, commit = g1
    args = ("generate", "Hi", "-n", "3", "--temperature", "0")
    elsewhere = {"RWKV_CLI_HOME": str(tmp_path / "home")}  # its converted copy would serve
    local = rwkv(*args, "-m", tmp_path / "new.pth", env=elsewhere)  # the Hub's NEW, as a file
    args += ("-m", "rwkv7-g1-0.1b")
    path = Path(rwkv("download", "rwkv7-g1-0.1b", env=hub.env()).stdout.decode().strip())
    blob = path.resolve()
    blob.write_bytes(blob.read_bytes()[:5000])  # damaged on disk after the download
    damaged = rwkv(*args, env=hub.env(HF_HUB_OFFLINE="1"))
    assert_one_line_error(damaged, 1, "is truncated or corrupt")
    command = f"rwkv download {G1}:{NEW} --revision {commit} --force"
    assert damaged.stderr.decode().splitlines()[1] == f"Hint: fetch it again: {command}"
    plain = rwkv("download", "rwkv7-g1-0.1b", env=hub.env())  # a cached copy is not re-checked
    assert plain.returncode == 0 and blob.stat().st_size == 5000
    offline = rwkv(*command.split()[1:], env=hub.env(HF_HUB_OFFLINE="1"))
    assert_one_line_error(offline, 1, "cannot download", "again: HF_HUB_OFFLINE is set")
    again = rwkv(*command.split()[1:], env=hub.env())
    assert again.returncode == 0, again.stderr
    assert again.stderr.decode().startswith(f"Downloading {G1}:{NEW}")
    assert rwkv(*args, env=hub.env()).stdout == local.stdout != b""


def test_generate_with_an_alias_then_offline_from_the_cache(g1) -> None:
    hub, _ = g1
    online = rwkv(
        "generate", "Hi", "-m", "rwkv7-g1-0.1b", "-n", "5", "--temperature", "0", env=hub.env()
    )
    assert online.returncode == 0, online.stderr
    hub.server.requests.clear()
    offline = rwkv(
        "generate",
        "Hi",
        "-m",
        "rwkv7-g1-0.1b",
        "-n",
        "5",
        "--temperature",
        "0",
        env=hub.env(HF_HUB_OFFLINE="1"),
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == online.stdout != b""
    assert offline.stderr == b"" and hub.server.requests == []


def test_repo_file_spec_picks_that_file(g1) -> None:
    hub, _ = g1
    newest = rwkv("generate", "Hi", "-m", G1, "-n", "5", "--temperature", "0", env=hub.env())
    older = rwkv(
        "generate", "Hi", "-m", f"{G1}:{OLD}", "-n", "5", "--temperature", "0", env=hub.env()
    )
    assert newest.returncode == older.returncode == 0
    assert newest.stdout != older.stdout  # different weights


def test_a_state_records_the_hub_file_and_resumes_offline_without_m(g1, tmp_path) -> None:
    hub, commit = g1
    state = tmp_path / "s.rwkvstate"
    first = rwkv(
        "generate",
        "Hi",
        "-m",
        "rwkv7-g1-0.1b",
        "-n",
        "4",
        "--temperature",
        "0",
        "--save-state",
        state,
        env=hub.env(),
    )
    assert first.returncode == 0, first.stderr
    saved = read_state_file(state)
    assert saved.model_spec == "rwkv7-g1-0.1b"
    assert saved.model_resolved == f"{G1}:{NEW}@{commit}"
    hub.server.requests.clear()
    resumed = rwkv(
        "generate", " there", "--state", state, "-n", "4", env=hub.env(HF_HUB_OFFLINE="1")
    )
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout and hub.server.requests == []


def test_a_state_written_before_provenance_fields_still_finds_its_pinned_hub_file(
    g1, tmp_path
) -> None:
    hub, commit = g1
    state = tmp_path / "s.rwkvstate"
    args = ("-m", "rwkv7-g1-0.1b", "-n", "4", "--temperature", "0", "--save-state", state)
    assert rwkv("generate", "Hi", *args, env=hub.env()).returncode == 0
    with safe_open(state, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    old = {key: value for key, value in metadata.items() if key not in PROVENANCE_FIELDS}
    assert old["model_resolved"] == f"{G1}:{NEW}@{commit}"
    save_file(tensors, state, metadata=old)  # the tensors, and so their checksum, unchanged
    assert read_state_file(state).provenance == Provenance(None, G1, NEW, commit)
    newer = write_pth(tmp_path / "newer.pth", rwkv7_tensors(seed=9)).read_bytes()
    hub.server.add_repo(G1, {"rwkv7-g1b-0.1b-20251202-ctx8192.pth": newer})  # the alias moves on
    hub.server.requests.clear()
    resumed = rwkv("generate", " there", "--state", state, "-n", "4", env=hub.env())
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout and hub.server.requests == []  # the pinned commit, from the cache


def test_models_lists_aliases_and_downloads(g1) -> None:
    hub, _ = g1
    before = rwkv("models", env=hub.env())
    assert before.returncode == 0
    text = before.stdout.decode()
    assert "rwkv7-g1-0.1b" in text and "rwkv4-pile-169m" in text and "none yet" in text
    rwkv_ok("download", "rwkv7-g1-0.1b", env=hub.env())
    after = rwkv("models", env=hub.env()).stdout.decode()
    assert f"{G1}:{NEW}" in after and "MB" in after


def test_hub_errors_are_one_line(g1) -> None:
    hub, _ = g1
    missing_repo = rwkv("generate", "x", "-m", "nobody/nothing", env=hub.env())
    assert_one_line_error(missing_repo, 1, "nobody/nothing")
    missing_file = rwkv("download", f"{G1}:rwkv7-g1-9b-20990101.pth", env=hub.env())
    assert_one_line_error(missing_file, 1, "rwkv7-g1-9b-20990101.pth")
    assert NEW in missing_file.stderr.decode()  # the hint lists what the repo has
    down = rwkv("download", "rwkv7-g1-0.4b", env=hub.env(HF_ENDPOINT="http://127.0.0.1:9"))
    assert_one_line_error(down, 1)
    assert "HF_HUB_OFFLINE=1" in down.stderr.decode()


def test_revision_is_passed_to_the_hub(g1) -> None:
    hub, commit = g1
    result = rwkv("download", G1, "--revision", commit, env=hub.env())
    assert result.returncode == 0, result.stderr
    assert f"snapshots/{commit}/" in result.stdout.decode()
