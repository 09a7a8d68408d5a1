"""Atomic writes and locks: symbolic links, leftovers of killed writes, lock files."""

from __future__ import annotations

import os

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
