"""Building compiled kernels: the CUDA sources compile (where nvcc is), and a build that fails
falls back to the torch path with one warning, or is an error under --kernel compiled."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rwkv_cli import fileio
from rwkv_cli.kernels import build, cpu_ops, cuda, kernels_to_build
from rwkv_cli.kernels.build import (
    Extension,
    KernelBuildError,
    KernelSelfTestError,
    compiled_ops,
)
from rwkv_cli.kernels.selftest import compare_with_torch
from rwkv_cli.kernels.wkv7 import wkv7_sequential
from tests.support.cli_runner import assert_one_line_error, rwkv

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_every_cuda_source_compiles() -> None:
    """What CI runs before the tests (.ci/compile-kernels): nvcc for sm_80 and sm_90."""
    result = subprocess.run(
        [str(REPO / ".ci" / "compile-kernels")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every CUDA source compiles" in result.stdout


@pytest.fixture
def broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Extension:
    """A CPU extension whose only source has a syntax error, not yet reported as failing."""
    (tmp_path / "broken.cpp").write_text("int broken( {\n")
    monkeypatch.setattr(build, "_reported", set())
    return Extension(f"rwkv_cli_broken_{tmp_path.name}", ("broken.cpp",), source_dir=tmp_path)


def _compiles_an_empty_library(record: Callable[[Path], object]):
    """Stands in for ``build._compile``: calls ``record(folder)``, then makes a valid library
    with nothing in it (in a moment, unlike a real build)."""

    def compile_(extension: Extension, folder: Path) -> None:
        record(folder)
        source = folder / "empty.cpp"
        source.write_text("\n")
        library = folder / f"{extension.name}.so"
        subprocess.run(["c++", "-shared", "-fPIC", source, "-o", library], check=True)

    return compile_


def test_auto_warns_once_and_falls_back(broken, kernel_choice) -> None:
    kernel_choice("auto")
    with pytest.warns(UserWarning, match="could not build the rwkv_cli_broken.*torch path"):
        assert compiled_ops(broken) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise
        assert compiled_ops(broken) is None


def test_compiled_makes_the_failure_an_error(broken, kernel_choice) -> None:
    kernel_choice("compiled")
    with pytest.raises(KernelBuildError, match="could not build the rwkv_cli_broken") as caught:
        compiled_ops(broken)
    log = build.build_dir(broken) / "build-error.log"
    assert str(log) in caught.value.hint
    assert "broken.cpp" in log.read_text()


def test_missing_sources_are_a_build_failure_not_a_crash(tmp_path, kernel_choice) -> None:
    """An incomplete installation (sources left out of the package) falls back with a warning."""
    missing = Extension(f"rwkv_cli_missing_{tmp_path.name}", ("gone.cpp",), source_dir=tmp_path)
    assert not build.is_built(missing)
    with pytest.warns(UserWarning, match="a kernel source is missing: .*gone.cpp"):
        assert compiled_ops(missing) is None


def test_the_package_ships_every_kernel_source() -> None:
    """What `pip install .` puts in the wheel: a CPU and a CUDA source, and a header."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    shipped = package_data["package-data"]["rwkv_cli"]
    for extension in (cpu_ops.EXTENSION, cuda.EXTENSION):
        for path in extension.input_paths():
            relative = Path(path).relative_to(REPO / "rwkv_cli")
            assert any(relative.match(pattern) for pattern in shipped), relative


def test_torch_never_builds(broken, kernel_choice, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(extension: Extension, retry: bool) -> None:
        raise AssertionError(f"{extension.name} was built")

    monkeypatch.setattr(build, "_build", fail)
    kernel_choice("torch")
    assert compiled_ops(broken) is None


def test_a_failed_build_is_not_tried_again_until_asked(broken, monkeypatch) -> None:
    """A machine without a working compiler must not spend a build on every command."""
    with pytest.raises(KernelBuildError, match="could not build"):
        build.load_extension(broken)
    build._build_once.cache_clear()  # as in a later process
    compiles = []
    monkeypatch.setattr(build, "_compile", _compiles_an_empty_library(compiles.append))
    with pytest.raises(KernelBuildError, match="an earlier build; `rwkv doctor` tries again"):
        build.load_extension(broken)
    assert compiles == []
    build.load_extension(broken, retry=True)  # doctor and --kernel compiled try again
    assert len(compiles) == 1
    assert not (build.build_dir(broken) / "failed.txt").exists()
    build._build_once.cache_clear()


def test_a_lock_left_by_a_killed_build_is_cleared(broken, monkeypatch) -> None:
    """torch's builder would wait forever for the ``lock`` file of a build killed by a signal."""
    folder = build.build_dir(broken)
    folder.mkdir(parents=True)
    (folder / build.TORCH_BUILD_LOCK).touch()
    lock_at_compile = []
    monkeypatch.setattr(
        build,
        "_compile",
        _compiles_an_empty_library(
            lambda _: lock_at_compile.append((folder / build.TORCH_BUILD_LOCK).exists())
        ),
    )
    build.load_extension(broken)
    build._build_once.cache_clear()
    assert lock_at_compile == [False]


def test_an_unusable_build_folder_is_a_build_error(broken, tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.touch()
    monkeypatch.setenv("RWKV_CLI_HOME", str(blocker / "home"))
    with pytest.raises(KernelBuildError, match="cannot use the build folder") as caught:
        build.load_extension(broken)
    build._build_once.cache_clear()
    assert "RWKV_CLI_HOME" in caught.value.hint


def test_without_flock_a_torch_lock_is_left_alone(broken, monkeypatch) -> None:
    """Without a lock of our own (Windows, some network file systems) a torch ``lock`` may
    belong to a running build: it must not be removed."""
    monkeypatch.setattr(fileio, "fcntl", None)
    folder = build.build_dir(broken)
    folder.mkdir(parents=True)
    (folder / build.TORCH_BUILD_LOCK).touch()
    with build._build_lock(folder):
        assert (folder / build.TORCH_BUILD_LOCK).exists()


def test_one_build_per_folder_at_a_time(tmp_path) -> None:
    entered = threading.Event()

    def second_build() -> None:
        with build._build_lock(tmp_path):
            entered.set()

    with build._build_lock(tmp_path):
        waiting = threading.Thread(target=second_build)
        waiting.start()
        assert not entered.wait(0.5)  # blocked while the first build holds the folder
    assert entered.wait(10)
    waiting.join()


def test_a_build_that_failed_on_a_nearly_full_disk_is_tried_again(broken, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(build.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(KernelBuildError, match=r"\(the disk is nearly full\)") as caught:
        build.load_extension(broken)
    build._build_once.cache_clear()
    assert "builds again" in caught.value.hint
    assert not (build.build_dir(broken) / "failed.txt").exists()


def test_an_extension_is_loaded_once_per_process(broken, monkeypatch) -> None:
    """A second copy (another RWKV_CLI_HOME's build) would register its operators twice, which
    makes torch abort the process."""
    loaded = object()  # as if loaded from another folder
    monkeypatch.setattr(build, "_loaded", {broken.name: loaded})
    monkeypatch.setattr(build, "_compile", lambda *_: pytest.fail("built a second copy"))
    assert build.load_extension(broken, retry=True) is loaded
    build._build_once.cache_clear()


def test_cli_kernel_torch_never_builds(rwkv7_pth, tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = rwkv(
        "--kernel", "torch", "generate", "Hi", "-m", rwkv7_pth, "-n", "4",
        env={"RWKV_CLI_HOME": str(home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (home / "kernels").exists()


@pytest.mark.parametrize("choice", ["compiled", "cuda"])  # cuda is another name for compiled
def test_cli_kernel_compiled_without_a_usable_build_is_an_error(rwkv7_pth, tmp_path, choice):
    """No GPU here and no C++ compiler: whichever kernels this device has cannot be built."""
    env = {"RWKV_CLI_HOME": str(tmp_path / "home"), "CXX": str(tmp_path / "no-such-compiler")}
    result = rwkv("--kernel", choice, "generate", "Hi", "-m", rwkv7_pth, env=env)
    assert_one_line_error(result, 1, "kernels")


def test_the_self_test_comparison_catches_a_wrong_kernel() -> None:
    def off_by_a_bit(*inputs):
        y, state = wkv7_sequential(*inputs)
        return y * 1.001, state

    with pytest.raises(KernelSelfTestError, match=r"RWKV-7 differs .* float32 inputs: output 0"):
        compare_with_torch({"7": off_by_a_bit}, device="cpu")
    assert compare_with_torch({"7": wkv7_sequential}, device="cpu") == 0.0


def test_cuda_builds_are_kept_per_cuda_version_and_gpu_architectures(monkeypatch) -> None:
    capabilities = [(9, 0), (8, 0)]
    monkeypatch.setattr(build.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(build.torch.cuda, "get_device_capability", capabilities.__getitem__)
    monkeypatch.setattr(build.torch.version, "cuda", "12.8")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    extension = Extension("rwkv_cli_cuda", ("a.cu",), cuda=True)
    assert build.build_dir(extension).name.endswith("-cu12.8-sm80-90")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert build.build_dir(extension).name.endswith("-cu12.8-sm8.0_9.0+PTX")


def test_only_a_build_still_to_do_is_announced(tmp_path, monkeypatch, kernel_choice) -> None:
    """open_model shows a spinner for kernels it must build, not for ones built before."""
    monkeypatch.setenv("RWKV_CLI_HOME", str(tmp_path))
    cpu = torch.device("cpu")
    assert kernels_to_build(cpu) == [cpu_ops.EXTENSION]
    folder = build.build_dir(cpu_ops.EXTENSION)
    folder.mkdir(parents=True)
    (folder / f"{cpu_ops.EXTENSION.name}.so").touch()
    (folder / "sources.sha256").write_text(build._sources_digest(cpu_ops.EXTENSION))
    assert kernels_to_build(cpu) == []
    (folder / "sources.sha256").write_text("sources have changed since")
    assert kernels_to_build(cpu) == [cpu_ops.EXTENSION]
    kernel_choice("torch")
    assert kernels_to_build(cpu) == []


def test_sigterm_during_a_build_ends_the_compiler_too(rwkv7_pth, tmp_path: Path) -> None:
    """A compiler left running would hold the build lock and the CPU after the command ended."""
    started = tmp_path / "compiler.pid"
    compiler = tmp_path / "slow-c++"
    compiler.write_text(f"#!/bin/sh\necho $$ > {started}\nsleep 600\n")
    compiler.chmod(0o755)
    env = {**os.environ, "RWKV_CLI_HOME": str(tmp_path / "home"), "CXX": str(compiler)}
    command = [sys.executable, "-m", "rwkv_cli", "generate", "Hi", "-m", str(rwkv7_pth)]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not started.exists() or not started.read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 143
    compiler_pid = int(started.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(compiler_pid, 0)
