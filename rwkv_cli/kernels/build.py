"""Compiled kernels: C++ and CUDA sources in ``rwkv_cli/csrc``, built on first use and cached.

Nothing compiles at import time. ``load_extension`` builds an extension the first time a process
needs it and reuses the build afterwards. Two kinds:

- CPU kernels are plain C++ behind a C interface, compiled by the system's C++ compiler into a
  shared library that ``ctypes`` loads (``kernels/cpu_ops.py`` wraps it). Without torch's
  headers the build takes about two seconds, so a first command on a new machine is quick.
- CUDA kernels are a torch extension built with ``torch.utils.cpp_extension``; they register
  their operators with ``TORCH_LIBRARY`` under the ``rwkv_cli`` namespace, so callers reach them
  as ``torch.ops.rwkv_cli.<op>``.

Each build lives in its own folder under ``$RWKV_CLI_HOME/kernels``, named after what the binary
depends on: the CPU's instruction sets (CPU kernels are compiled for the machine they run on), or
the torch version, CUDA version and GPU architectures.

Every compiled operator has a plain-torch twin with the same meaning. ``compiled_ops`` is how model
code asks for one: with the default choice "auto" a build failure is reported once, as a warning
with its reason, and the caller runs its torch path; with "compiled" the failure is an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rwkv_cli.errors import RwkvCliError
from rwkv_cli.fileio import exclusive
from rwkv_cli.paths import home_dir
from rwkv_cli.settings import KERNEL_CHOICES, KernelChoice

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
OPS_NAMESPACE = "rwkv_cli"
_NEARLY_FULL_BYTES = 256 << 20  # a failed build with less free is not remembered as failing
TORCH_BUILD_LOCK = "lock"  # the file torch.utils.cpp_extension creates while it builds a folder


class KernelBuildError(RwkvCliError):
    """A compiled extension could not be built or loaded (no compiler, compile error, ...)."""


class KernelSelfTestError(RwkvCliError):
    """A compiled kernel built, but its results differ from its torch twin's."""


@dataclass(frozen=True)
class Extension:
    """A compiled extension: its name, the source files compiled and the headers they include
    (both under ``source_dir``, ``csrc``). A CUDA extension is a torch extension; any other is a
    plain shared library with a C interface."""

    name: str
    sources: tuple[str, ...]
    cuda: bool = False
    source_dir: Path = SOURCE_DIR
    headers: tuple[str, ...] = ()

    def source_paths(self) -> list[str]:
        return [str(self.source_dir / source) for source in self.sources]

    def input_paths(self) -> list[str]:
        """Every file the build reads: the sources, then the headers."""
        return [*self.source_paths(), *(str(self.source_dir / name) for name in self.headers)]


def kernels_dir() -> Path:
    """Where built extensions are cached."""
    return home_dir() / "kernels"


def build_dir(extension: Extension) -> Path:
    """This extension's build folder for the running hardware (and torch, for CUDA)."""
    if not extension.cuda:  # a plain library: torch's version does not matter
        return kernels_dir() / f"{extension.name}-cpu-{_cpu_flags_digest()}"
    torch_version = re.sub(r"[^0-9A-Za-z.]", "_", torch.__version__)
    # torch compiles for $TORCH_CUDA_ARCH_LIST, else for the architectures of all visible GPUs
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "-".join(
        sorted(
            "{}{}".format(*torch.cuda.get_device_capability(index))
            for index in range(torch.cuda.device_count())
        )
    )
    hardware = f"cu{torch.version.cuda}-sm{re.sub(r'[^0-9A-Za-z.+-]', '_', archs)}"
    return kernels_dir() / f"{extension.name}-torch{torch_version}-{hardware}"


@functools.cache
def _cpu_flags_digest() -> str:
    """A short digest of the CPU's instruction-set flags (builds use ``-march=native``)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = os.uname().machine
    flags = next((line for line in text.splitlines() if line.startswith("flags")), text)
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


CPU_FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"]
# A CPU extension is one shared library; only its C interface (RWKV_CLI_EXPORT) is visible.
LIBRARY_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
CUDA_FLAGS = ["-O3", "--use_fast_math", "-Xptxas", "-O3"]  # .ci/compile-kernels uses these too
# The host code of a CUDA extension (its torch binding) is not tuned to this CPU: its build
# folder is keyed by the GPUs only.
CUDA_HOST_FLAGS = ["-O3"]


def is_built(extension: Extension) -> bool:
    """Whether ``extension`` was built from its current sources (loading it will be quick)."""
    folder = build_dir(extension)
    stamp = folder / "sources.sha256"
    if not (folder / f"{extension.name}.so").is_file() or not stamp.is_file():
        return False
    try:
        return stamp.read_text() == _sources_digest(extension)
    except KernelBuildError:  # no sources to build from: building is what reports it
        return False


def load_extension(extension: Extension, retry: bool = False) -> Any:
    """Build (or reuse) ``extension``, load it and return it: a CUDA extension's operators in
    ``torch.ops.rwkv_cli``, a CPU library as a ``ctypes.CDLL``.

    Raises KernelBuildError with a one-line reason; the whole compiler output is kept in the
    build folder's ``build-error.log``. Each extension is tried once per process, and a build
    that failed is not tried again from the same sources and toolchain (so a machine without a
    compiler does not spend seconds on every command) unless ``retry`` (``rwkv doctor``,
    ``--kernel compiled``).
    """
    error = _build_once(extension, retry)
    if error is not None:
        raise error
    return _loaded[extension.name]


@functools.cache
def _build_once(extension: Extension, retry: bool) -> KernelBuildError | None:
    try:
        _build(extension, retry)
    except KernelBuildError as error:
        return error
    return None


def _build(extension: Extension, retry: bool) -> None:
    if extension.name in _loaded:
        # Loaded in this process already (from this or another build folder): a second copy of
        # a torch extension would register its operators twice, which aborts the process.
        return
    if extension.cuda and not torch.cuda.is_available():
        raise KernelBuildError("no CUDA GPU is available")
    folder = build_dir(extension)
    stamp, failed = folder / "sources.sha256", folder / "failed.txt"
    digest = _sources_digest(extension)
    if _load_built(extension, folder):
        return
    if not retry and failed.is_file():
        earlier_digest, _, message = failed.read_text().partition("\n")
        if earlier_digest == digest:
            raise KernelBuildError(
                f"{message} (an earlier build; `rwkv doctor` tries again)",
                hint=f"compiler output: {folder / 'build-error.log'}",
            )
    with _build_lock(folder):
        if _load_built(extension, folder):  # another process built it while this one waited
            return
        try:
            _compile(extension, folder)
        except KernelBuildError as error:
            if shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES:  # likely the cause; passes
                raise KernelBuildError(
                    f"{error.message} (the disk is nearly full)",
                    hint="free some disk space: the next command builds again",
                ) from error
            failed.write_text(f"{digest}\n{error.message}")
            raise
        failed.unlink(missing_ok=True)
        stamp.write_text(digest)
        if extension.cuda:
            _loaded[extension.name] = getattr(torch.ops, OPS_NAMESPACE)  # cpp_extension loaded it
        elif not _load_built(extension, folder):
            raise KernelBuildError(f"the {extension.name} kernels were built but do not load")


def _load_built(extension: Extension, folder: Path) -> bool:
    """Load a build made before from these very sources, without asking ninja (half a second)."""
    if not is_built(extension):
        return False
    library = folder / f"{extension.name}.so"
    try:
        if extension.cuda:
            torch.ops.load_library(str(library))
            _loaded[extension.name] = getattr(torch.ops, OPS_NAMESPACE)
        else:
            _loaded[extension.name] = ctypes.CDLL(str(library))
    except OSError:
        return False  # unloadable (a half-written file?): build again
    return True


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """One build per folder at a time, across processes.

    torch's builder guards a folder with a ``lock`` file that a build killed by a signal (the OOM
    killer, ``kill -9``) leaves behind, and every later build then waits for it forever. This lock
    is an ``flock`` (``fileio.exclusive``), which the system drops when its process dies: while it
    is held no other build is running, so a torch ``lock`` file found then is stale and removed.
    """
    with contextlib.ExitStack() as held:
        try:
            alone = held.enter_context(exclusive(folder / "build.lock"))  # waits for a build
        except OSError as error:
            raise KernelBuildError(
                f"cannot use the build folder {folder}: {error.strerror or error}",
                hint="set RWKV_CLI_HOME to a writable directory",
            ) from error
        if alone:
            (folder / TORCH_BUILD_LOCK).unlink(missing_ok=True)
        yield


def _sources_digest(extension: Extension) -> str:
    """What a build depends on besides the folder's name: the sources, the flags and the
    compiler asked for. Raises KernelBuildError if a source cannot be read (a broken install)."""
    toolchain = (
        CPU_FLAGS,
        LIBRARY_FLAGS,
        CUDA_FLAGS,
        CUDA_HOST_FLAGS,
        os.environ.get("CXX"),
        shutil.which("c++"),
    )
    digest = hashlib.sha256(repr(toolchain).encode())
    for path in extension.input_paths():
        try:
            digest.update(Path(path).read_bytes())
        except OSError as error:
            raise KernelBuildError(
                f"a kernel source is missing: {path}",
                hint="the installation is incomplete: reinstall rwkv-cli",
            ) from error
    return digest.hexdigest()


def _compile(extension: Extension, folder: Path) -> None:
    try:
        if extension.cuda:
            _compile_torch_extension(extension, folder)
        else:
            _compile_library(extension, folder)
    except Exception as error:  # compiler, linker, loader and environment failures alike
        log = folder / "build-error.log"
        log.write_text(str(error))
        raise KernelBuildError(
            f"could not build the {extension.name} kernels: {_first_error_line(str(error))}",
            hint=f"compiler output: {log}; `rwkv doctor` checks the toolchain",
        ) from error


def _compile_torch_extension(extension: Extension, folder: Path) -> None:
    from torch.utils import cpp_extension  # imports setuptools: only when building

    _put_ninja_on_path()
    with _quiet(cpp_extension.logger):  # its compiler warnings would break one-line errors
        cpp_extension.load(
            name=extension.name,
            sources=extension.source_paths(),
            extra_cflags=CUDA_HOST_FLAGS,
            extra_cuda_cflags=CUDA_FLAGS,
            build_directory=str(folder),
            is_python_module=False,
            with_cuda=True,
            verbose=False,
        )


class CompilerError(Exception):
    """The compiler exited with an error; the message is its output."""


def _compile_library(extension: Extension, folder: Path) -> None:
    """One compiler run from the sources to ``<name>.so``, written under another name first so
    that a build killed halfway never leaves a library that looks finished."""
    compiler = os.environ.get("CXX") or "c++"
    partial = folder / f"{extension.name}.so.partial"
    command = [compiler, *CPU_FLAGS, *LIBRARY_FLAGS, *extension.source_paths(), "-o", str(partial)]
    try:
        returncode, output = _run_in_own_group(command)
    except FileNotFoundError:
        raise CompilerError(f"{compiler}: not found") from None
    if returncode != 0:
        raise CompilerError(output or f"{compiler} exited with status {returncode}")
    partial.replace(folder / f"{extension.name}.so")


def _run_in_own_group(command: list[str]) -> tuple[int, str]:
    """Run ``command`` in a process group of its own; returns its exit status and output. If this
    process is interrupted meanwhile (Ctrl-C, SIGTERM), the whole group (the compiler driver and
    the compilers and assembler it started) is killed before the interruption goes on."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = process.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    return process.returncode, output


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Only errors from ``logger`` while the block runs."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the ninja wheel's binary sits beside this Python's."""
    try:
        import ninja
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, path))


def _first_error_line(output: str) -> str:
    """The compiler's first diagnostic (``file:line: error: ...``) or the shell's complaint
    (``cc: not found``), else the first line that mentions an error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    diagnostic = next(
        (line for line in lines if _DIAGNOSTIC.search(line) and "Error building" not in line),
        None,
    )
    if diagnostic is not None:
        return diagnostic[:200]
    for line in lines:
        if "error" in line.lower() and not line.startswith("FAILED"):
            return line[:200]
    return lines[0][:200] if lines else "unknown error"


_DIAGNOSTIC = re.compile(r"error:|: not found$|No such file or directory")


_loaded: dict[str, Any] = {}  # name -> what load_extension loaded (torch.ops namespace or CDLL)
_reported: set[str] = set()
_choice: KernelChoice = "auto"


def set_kernel_choice(choice: KernelChoice) -> None:
    """Choose the kernels for this process (``--kernel``): "auto" (compiled where they build,
    else torch), "torch" (never compile) or "compiled" (a build failure is an error)."""
    global _choice
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"unknown kernel choice {choice!r}")
    _choice = choice


def kernel_choice() -> KernelChoice:
    return _choice


def compiled_ops(extension: Extension) -> Any:
    """``extension`` loaded (``torch.ops.rwkv_cli`` for CUDA, the ``ctypes.CDLL`` of a CPU
    library), or None to use the torch path.

    Follows ``set_kernel_choice``: "torch" never builds; "auto" builds, and on failure warns
    once per extension and returns None; "compiled" raises the KernelBuildError instead.
    """
    choice = _choice
    if choice == "torch":
        return None
    try:
        return load_extension(extension)
    except KernelBuildError as error:
        if choice == "compiled":
            raise
        if extension.name not in _reported:
            _reported.add(extension.name)
            warnings.warn(f"{error.message}; using the slower torch path", stacklevel=2)
        return None
