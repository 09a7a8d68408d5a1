"""Writing files safely: atomic replacement (a reader sees the old file or the new one, never a
half-written one), locks between processes, and the checks worth making before a long write."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from rwkv_cli.errors import DiskFullError, WriteError

_TEMPORARY = ".tmp"  # the suffix of atomic_write's temporary folders
_CLAIM_ATTEMPTS = 3  # a new temporary folder is lost to another write's cleanup only in a race


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda temp: temp.write_bytes(data))


def atomic_write(path: str | Path, write_to: Callable[[Path], object]) -> None:
    """Replace ``path`` with what ``write_to(temp_path)`` writes: a file in a temporary folder
    of its own beside ``path`` (a writer that makes temporary files itself, as safetensors does,
    makes them there too), fsync, rename. A symbolic link is written through: its target is
    replaced, beside which the temporary folder is made, and the link stays.

    Each write first removes what earlier writes of the same file left when their process was
    killed (``remove_leftovers``). On any failure the temporary folder is removed, the previous
    file (if any) is left as it was, and a :class:`WriteError` says why.
    """
    path = Path(path)
    target = write_target(path)
    try:
        with _temporary_folder(target) as folder:
            remove_leftovers(target)
            temp = folder / target.name
            write_to(temp)
            os.chmod(temp, _mode_for(target))
            _fsync_file(temp)
            os.replace(temp, target)
    except OSError as error:
        raise _write_error(path, error) from error
    _fsync_directory(target.parent)


def write_target(path: Path) -> Path:
    """The file a write of ``path`` replaces: ``path`` itself, or the file a symbolic link
    points to (a link that points nowhere yet names the file to create)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


@contextlib.contextmanager
def _temporary_folder(beside: Path) -> Iterator[Path]:
    """A new folder beside ``beside``, flocked until the block ends and it is removed, so
    that one nobody holds is known to be left by a killed process."""
    for _ in range(_CLAIM_ATTEMPTS):
        prefix = f".{beside.name}."
        folder = Path(tempfile.mkdtemp(dir=beside.parent, prefix=prefix, suffix=_TEMPORARY))
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            if not _claim(descriptor, folder):
                continue
            try:
                yield folder
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return
        finally:
            os.close(descriptor)
    raise OSError(errno.EAGAIN, "other writes of the file kept removing its temporary folder")


def _claim(descriptor: int, folder: Path) -> bool:
    """Lock a new temporary folder; False when another write's ``remove_leftovers`` took it in
    the moment between its making and its locking (and removed it or is removing it)."""
    if fcntl is not None:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            return True  # no flocks here: no other write can take it either
    return _still_named(folder, descriptor)


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_file`` (created if need be) while the block runs: one
    process at a time, the others wait. It is an ``flock``, which the system drops when its
    process dies, so a killed process never leaves it held. Yields whether the lock is held:
    False where there are no such locks (Windows, some network file systems), and the block
    runs unguarded. OSError if the file (or its folder) cannot be created.

    The file is deleted as the lock is released (a cache keeps no empty file per lock); a
    process that was waiting on the deleted file finds it gone and locks the new one."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(lock_file, "a") as handle:
            held = _lock(handle)
            if held and not _still_named(lock_file, handle.fileno()):
                continue  # released and deleted while we waited
            try:
                yield held
            finally:
                with contextlib.suppress(OSError):
                    lock_file.unlink()  # while held: a waiter finds its file gone, starts over
            return


def lock_now(descriptor: int) -> bool:
    """Take the flock of an open file without waiting: False if another process (or another
    open of the file) holds it. True where there are no flocks: nothing can guard it there."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True


def _lock(handle: IO) -> bool:
    """Wait for ``handle``'s flock; False where there are no flocks."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _still_named(path: Path, descriptor: int) -> bool:
    """Whether ``path`` still names the file (or folder) open as ``descriptor``."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def held_elsewhere(lock_file: Path) -> bool:
    """Whether another process holds ``lock_file``'s flock right now (to say why we wait);
    False where there are no flocks."""
    if fcntl is None or not lock_file.is_file():
        return False
    try:
        with open(lock_file, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def remove_leftovers(path: Path) -> None:
    """Delete the temporary folders that writes of ``path`` by ``atomic_write`` left when their
    process was killed: those whose flock nobody holds. Those of live writes stay, and so does
    everything where there are no flocks."""
    for folder in path.parent.glob(f".{glob_escape(path.name)}.*{_TEMPORARY}"):
        if folder.is_dir() and not folder.is_symlink():
            with contextlib.suppress(OSError):
                _remove_if_abandoned(folder)


def _remove_if_abandoned(folder: Path) -> None:
    """Remove a temporary folder if no live write holds its flock."""
    if fcntl is None:
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a live write
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(descriptor)


def check_writable(path: str | Path) -> None:
    """Raise :class:`WriteError` now if ``atomic_write`` could not create ``path`` later: it
    names a directory, or its directory is missing or read-only. Commands check their output
    files before a long run rather than fail at its end."""
    path = Path(path)
    directory = write_target(path).parent
    if path.is_dir():
        reason = "it is a directory"
    elif directory.exists() and not directory.is_dir():
        reason = f"{directory} is a file, not a directory"
    elif not directory.is_dir():
        reason = f"there is no directory {directory}"
    elif not os.access(directory, os.W_OK | os.X_OK):
        reason = f"the directory {directory} is not writable"
    else:
        return
    raise WriteError(f"cannot write {path}: {reason}", hint="choose a file in a writable directory")


def _mode_for(path: Path) -> int:
    """Keep the mode of the file being replaced; a new file gets the umask's usual 0o666 mode."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_file(name: str | Path) -> None:
    descriptor = os.open(name, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (not possible on every platform; best effort)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _write_error(path: Path, error: OSError) -> WriteError:
    if error.errno == errno.ENOSPC:
        kept = "; the previous file is unchanged" if path.exists() else ""
        return WriteError(
            f"disk full while writing {path}{kept}",
            hint="free some space and run the command again",
        )
    reason = error.strerror or str(error)
    return WriteError(
        f"cannot write {path}: {reason}", hint="check the directory exists and is writable"
    )


def check_free_space(directory: Path, needed: int, hint: str, what: str | None = None) -> None:
    """Raise :class:`DiskFullError` now if ``directory``'s disk has less than ``needed`` bytes
    free, rather than after writing most of a large file."""
    free = shutil.disk_usage(directory).free
    if needed > free:
        subject = f" for {what}" if what else ""
        raise DiskFullError(
            f"not enough disk space{subject}: {format_size(needed)} needed, "
            f"{format_size(free)} free in {directory}",
            hint=hint,
        )


_BINARY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``2G``, ``1.5g``, ``4096`` (bytes; K, M, G and T are powers of 1024, an
    optional trailing B or iB is allowed) -> bytes; ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if match is None:
        raise ValueError(f"{text!r} is not a size: use e.g. 512M or 2G")
    number, unit = match.groups()
    return int(float(number) * _BINARY_UNITS[unit])


def format_size(size: int | None) -> str:
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
