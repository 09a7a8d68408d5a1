"""``rwkv doctor``: what this machine offers rwkv-cli, and whether the compiled kernels work.

``diagnose`` gathers one :class:`Check` per line: versions (torch, its CUDA), the GPUs, the
toolchain the kernels are built with (nvcc, ninja, a C++ compiler), the kernels themselves (built
and compared with the torch path on random inputs) and where rwkv-cli keeps its files. A check
that fails carries a hint. A machine without a GPU is not broken: the CUDA kernels are skipped.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from huggingface_hub import constants as hf_constants

from rwkv_cli import __version__
from rwkv_cli.device import resolve_device
from rwkv_cli.errors import InvalidInputError, RwkvCliError
from rwkv_cli.kernels import selftest
from rwkv_cli.kernels.build import kernel_choice, kernels_dir
from rwkv_cli.paths import converted_dir, home_dir

Status = Literal["info", "ok", "skipped", "warning", "failed"]
_SHOWN_STATUS = {"ok": "ok: ", "skipped": "skipped: ", "warning": "warning: ", "failed": "FAILED: "}
_TOOL_TIMEOUT_S = 30
_GIB = 1024**3
_TORCH_PATH_HINT = "meanwhile rwkv-cli runs the slower torch path (--kernel torch skips builds)"


@dataclass(frozen=True)
class Check:
    """One line of the report: what was looked at, what was found, and how that stands."""

    name: str
    value: str
    status: Status = "info"
    hint: str | None = None


@dataclass(frozen=True)
class Report:
    checks: tuple[Check, ...]

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.status == "failed"]

    def to_dict(self) -> dict:
        return {"ok": not self.failures, "checks": [asdict(check) for check in self.checks]}

    def format(self) -> str:
        """Aligned lines: name, then the status (unless plain information) and the value."""
        width = max(len(check.name) for check in self.checks) + 2
        return "\n".join(
            f"{check.name:<{width}}{_SHOWN_STATUS.get(check.status, '')}{check.value}"
            for check in self.checks
        )

    def problem(self) -> RwkvCliError | None:
        """The error ``rwkv doctor`` exits with: the first failure and its hint, or None."""
        if not self.failures:
            return None
        first = self.failures[0]
        count = len(self.failures)
        return RwkvCliError(
            f"{count} problem{'s' if count > 1 else ''} found; {first.name}: {first.value}",
            hint=first.hint,
        )


def diagnose(build_kernels: bool = True) -> Report:
    """Look at this machine. With ``build_kernels`` the compiled kernels are built (the first
    time a few seconds for the CPU ones, a minute or more for CUDA) and each is compared with
    the torch path."""
    gpus = visible_gpus()
    checks = [
        Check("rwkv-cli", __version__),
        Check("python", f"{platform.python_version()} ({platform.system()} {platform.machine()})"),
        _torch_check(),
        *_gpu_checks(gpus),
        _nvcc_check(needed=bool(gpus)),
        # The CPU kernels are built on every machine: ninja and a C++ compiler matter everywhere.
        _tool_check("ninja", _ninja_path(), needed=True),
        _tool_check("C++ compiler", shutil.which(os.environ.get("CXX", "c++")), needed=True),
        Check("kernel choice", kernel_choice()),
        _default_device_check(gpus),
        _cuda_kernels_check(bool(gpus), build_kernels),
        _cpu_kernels_check(build_kernels),
        *_storage_checks(),
    ]
    return Report(tuple(checks))


def visible_gpus() -> list[str]:
    """One description per GPU torch can use: index, name, memory, compute capability."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        found.append(
            f"cuda:{index} {properties.name}, {properties.total_memory / _GIB:.1f} GiB, "
            f"compute capability {properties.major}.{properties.minor}"
        )
    return found


def _default_device_check(gpus: list[str]) -> Check:
    """Where commands run without --device: ``RWKV_CLI_DEVICE`` if set (and usable), else the
    CPU, with a tip when a GPU sits unused."""
    name, configured = "device", os.environ.get("RWKV_CLI_DEVICE")
    if configured is None:
        tip = " (a GPU is here: --device cuda, or RWKV_CLI_DEVICE=cuda for every command)"
        return Check(name, "cpu" + (tip if gpus else ""))
    try:
        device = resolve_device(configured)
    except InvalidInputError as error:
        hint = "unset RWKV_CLI_DEVICE, or set it to a device listed above (or cpu, or auto)"
        return Check(name, f"RWKV_CLI_DEVICE={configured}: {error.message}", "failed", hint)
    return Check(name, f"{device} (RWKV_CLI_DEVICE={configured})", "ok")


def _torch_check() -> Check:
    if torch.version.cuda is None:
        return Check("torch", f"{torch.__version__} (CPU-only build)")
    return Check("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")


def _gpu_checks(gpus: list[str]) -> list[Check]:
    if gpus:
        return [Check("GPU" if i == 0 else f"GPU {i}", gpu) for i, gpu in enumerate(gpus)]
    listed = _run(["nvidia-smi", "-L"]) or ""
    present = [line for line in listed.splitlines() if line.startswith("GPU ")]
    if not present:
        return [Check("GPU", "none (models run on the CPU)")]
    why = "a CPU-only build" if torch.version.cuda is None else "CUDA is not available to it"
    return [
        Check(
            "GPU",
            f"{len(present)} NVIDIA GPU(s) present, but torch cannot use them ({why})",
            "failed",
            hint="install a CUDA build of torch (see pytorch.org), or check the NVIDIA driver",
        )
    ]


def _nvcc_check(needed: bool) -> Check:
    """nvcc compiles the CUDA kernels; its CUDA major version must match torch's."""
    path = _nvcc_path()
    if path is None:
        return _missing("nvcc", needed, "install the CUDA toolkit (nvcc) matching torch's CUDA")
    output = _run([path, "--version"]) or ""
    release = re.search(r"release (\d+)\.(\d+)", output)
    if release is None:
        return Check("nvcc", f"{path} (version unknown)", "warning" if needed else "info")
    version = f"{release[1]}.{release[2]}"
    torch_cuda = torch.version.cuda
    if torch_cuda is not None and torch_cuda.split(".")[0] != release[1]:
        return Check(
            "nvcc",
            f"{version} ({path}), but torch was built with CUDA {torch_cuda}",
            "warning",
            hint=f"torch only builds extensions with a CUDA {torch_cuda.split('.')[0]}.x nvcc: "
            "install that toolkit and point CUDA_HOME at it",
        )
    return Check("nvcc", f"{version} ({path})")


def _nvcc_path() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _ninja_path() -> str | None:
    """torch builds with ninja: from PATH, or the ninja wheel's (kernels/build.py adds it)."""
    found = shutil.which("ninja")
    if found is None:
        try:
            import ninja
        except ImportError:
            return None
        found = shutil.which("ninja", path=ninja.BIN_DIR)
    return found


def _tool_check(name: str, path: str | None, needed: bool) -> Check:
    if path is None:
        return _missing(name, needed, f"install {name}: torch needs it to build the kernels")
    lines = (_run([path, "--version"]) or "").strip().splitlines()
    return Check(name, f"{lines[0] if lines else 'version unknown'} ({path})")


def _missing(name: str, needed: bool, hint: str) -> Check:
    """A tool that is not installed: worth a warning only where kernels need building."""
    if needed:
        return Check(name, "not found", "warning", hint=hint)
    return Check(name, "not found")


def _cuda_kernels_check(has_gpu: bool, build_kernels: bool) -> Check:
    if not has_gpu:
        return Check("CUDA kernels", "no GPU", "skipped")
    if not build_kernels:
        return Check("CUDA kernels", "not built (--no-build)", "skipped")
    return _self_test_check("CUDA kernels", selftest.cuda_self_test)


def _cpu_kernels_check(build_kernels: bool) -> Check:
    if not build_kernels:
        return Check("CPU kernels", "not built (--no-build)", "skipped")
    return _self_test_check("CPU kernels", selftest.cpu_self_test)


def _self_test_check(name: str, self_test: Callable[[], str]) -> Check:
    """Build and compare with the torch path; any failure becomes a failed check."""
    try:
        summary = self_test()
    except RwkvCliError as error:
        hint = f"{error.hint}; {_TORCH_PATH_HINT}" if error.hint else _TORCH_PATH_HINT
        return Check(name, error.message, "failed", hint=hint)
    except Exception as error:  # a broken toolchain or driver fails in many ways: report them all
        return Check(name, f"{type(error).__name__}: {error}", "failed", hint=_TORCH_PATH_HINT)
    return Check(name, summary, "ok")


def _storage_checks() -> list[Check]:
    places = (
        ("HF cache", Path(hf_constants.HF_HUB_CACHE), "HF_HOME (or HF_HUB_CACHE)"),
        ("rwkv-cli home", home_dir(), "RWKV_CLI_HOME"),
        ("converted", converted_dir(), "RWKV_CLI_HOME"),
        ("kernel builds", kernels_dir(), "RWKV_CLI_HOME"),
    )
    return [_storage_check(*place) for place in places]


def _storage_check(name: str, path: Path, variable: str) -> Check:
    """A folder's size, or why it cannot be created (a file where a folder should be)."""
    if path.is_dir():
        return Check(name, f"{path} ({_folder_summary(path)})")
    blocker = next((place for place in (path, *path.parents) if place.exists()), None)
    if blocker is None or blocker.is_dir():
        return Check(name, f"{path} (not created yet)")
    return Check(
        name,
        f"{path} cannot be created: {blocker} is a file",
        "failed",
        hint=f"set {variable} to a writable directory",
    )


def _folder_summary(path: Path) -> str:
    files = [Path(root) / name for root, _, names in os.walk(path) for name in names]
    size = sum(file.stat().st_size for file in files if file.is_file() and not file.is_symlink())
    shown = f"{size / _GIB:.1f} GiB" if size >= _GIB else f"{size / 1024**2:.1f} MiB"
    return f"{len(files)} files, {shown}"


def _run(command: list[str]) -> str | None:
    """A tool's stdout, or None if it is missing or fails."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None
