"""Atomic writes and locks: symbolic links, leftovers of killed writes, lock files."""

from __future__ import annotations

import errno
import os

import pytest

from rwkv_cli.errors import WriteError
from rwkv_cli.fileio import atomic_write_bytes


def _hidden(folder) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.name.startswith("."))


def test_a_write_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "state.bin"
    target.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(os.path.join("data", "state.bin"))  # relative, as ln -s makes them
    atomic_write_bytes(link, b"new")
    assert link.is_symlink() and os.readlink(link) == os.path.join("data", "state.bin")
    assert target.read_bytes() == b"new"
    assert _hidden(tmp_path) == [] and _hidden(tmp_path / "data") == []


def test_a_link_to_a_file_not_yet_there_creates_it(tmp_path):
    link = tmp_path / "link.bin"
    link.symlink_to(tmp_path / "new.bin")
    atomic_write_bytes(link, b"first")
    assert link.is_symlink() and (tmp_path / "new.bin").read_bytes() == b"first"


@pytest.mark.parametrize("existed", [True, False])
def test_a_full_disk_mentions_the_previous_file_only_if_there_was_one(
    tmp_path, monkeypatch, existed
):
    path = tmp_path / "s.rwkvstate"
    if existed:
        path.write_bytes(b"previous")

    def no_space(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match="disk full while writing") as caught:
        atomic_write_bytes(path, b"new")
    assert ("the previous file is unchanged" in caught.value.message) == existed
    assert os.listdir(tmp_path) == (["s.rwkvstate"] if existed else [])
