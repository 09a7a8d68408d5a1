"""Atomic writes and locks: symbolic links, leftovers of killed writes, lock files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from rwkv_cli import fileio
from rwkv_cli.errors import WriteError
from rwkv_cli.fileio import atomic_write, atomic_write_bytes, exclusive

# A write that a signal kills halfway: it prints when its temporary file is half written.
_KILLED_WRITE = """
import sys, time
from rwkv_cli.fileio import atomic_write

def write(temp):
    temp.write_bytes(b"half a file")
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], write)
"""


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


def test_a_later_write_removes_what_a_killed_write_left(tmp_path):
    path = tmp_path / "s.rwkvstate"
    path.write_bytes(b"previous")
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITE, str(path)], stdout=subprocess.PIPE
    )
    assert writer.stdout.readline() == b"writing\n"
    writer.kill()  # kill -9: nothing of the writer's own runs
    writer.wait()
    (leftover,) = [entry for entry in tmp_path.iterdir() if entry.name.endswith(".tmp")]
    assert (leftover / path.name).read_bytes() == b"half a file"
    assert path.read_bytes() == b"previous"
    atomic_write_bytes(path, b"next")
    assert path.read_bytes() == b"next"
    assert _hidden(tmp_path) == []


def test_a_write_in_progress_keeps_its_temporary_folder_from_another_write(tmp_path):
    path = tmp_path / "s.rwkvstate"
    inside = threading.Event()
    release = threading.Event()

    def slow(temp):
        temp.write_bytes(b"slow")
        inside.set()
        release.wait(30)

    with ThreadPoolExecutor(1) as pool:
        slow_write = pool.submit(atomic_write, path, slow)
        assert inside.wait(30)
        atomic_write_bytes(path, b"quick")  # must not remove the slow write's folder
        release.set()
        slow_write.result()
    assert path.read_bytes() == b"slow"
    assert _hidden(tmp_path) == []


def test_a_released_lock_leaves_no_file_behind(tmp_path):
    lock = tmp_path / "cache" / ".model.lock"
    with exclusive(lock) as held:
        assert held and lock.is_file()
    assert not lock.exists()


def test_locks_exclude_each_other_while_their_files_come_and_go(tmp_path):
    lock = tmp_path / ".shared.lock"
    inside, most = [], []

    def critical(_: int) -> None:
        with exclusive(lock) as held:
            assert held
            inside.append(1)
            most.append(len(inside))
            time.sleep(0.01)
            inside.pop()

    with ThreadPoolExecutor(6) as pool:  # flock excludes threads too: each opens its own file
        list(pool.map(critical, range(60)))
    assert max(most) == 1
    assert not lock.exists()


def test_without_flocks_a_lock_runs_unguarded_and_still_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, "fcntl", None)
    lock = tmp_path / ".model.lock"
    with exclusive(lock) as held:
        assert held is False
    assert not lock.exists()
