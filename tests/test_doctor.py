"""``rwkv doctor``: the report on a CPU machine, and how a broken GPU setup is reported."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from rwkv_cli import cli, doctor
from rwkv_cli.kernels import selftest
from rwkv_cli.kernels.build import KernelBuildError, KernelSelfTestError
from tests.support.cli_runner import rwkv

NAMES = ("rwkv-cli", "torch", "GPU", "nvcc", "ninja", "C++ compiler", "kernel choice", "device")
STORAGE = ("HF cache", "rwkv-cli home", "converted", "kernel builds")
FAKE_GPU = "cuda:0 Fake GPU, 80.0 GiB, compute capability 9.0"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_machine_without_a_gpu_is_not_broken() -> None:
    result = rwkv("doctor")  # builds and tests the CPU kernels, if this version has them
    stdout = result.stdout.decode()
    assert result.returncode == 0, stdout + result.stderr.decode()
    assert result.stderr == b""
    names = [line.split("  ")[0] for line in stdout.splitlines()]
    assert set(NAMES + STORAGE) <= set(names)
    assert "CUDA kernels   skipped: no GPU" in stdout
    assert "FAILED" not in stdout


def test_json_report() -> None:
    result = rwkv("doctor", "--json", "--no-build")
    report = json.loads(result.stdout)
    assert report["ok"] is (result.returncode == 0)
    checks = {check["name"]: check for check in report["checks"]}
    assert set(NAMES + STORAGE) <= set(checks)
    assert checks["torch"]["value"].startswith(torch.__version__)
    assert {check["status"] for check in report["checks"]} <= {
        "info", "ok", "skipped", "warning", "failed"
    }  # fmt: skip


@pytest.fixture
def gpu_whose_kernels_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> str:
        raise KernelBuildError(
            "could not build the rwkv_cli_cuda kernels: cuda_wkv7.cu(3): error: oops",
            hint="compiler output: /tmp/build-error.log",
        )

    monkeypatch.setattr(doctor, "visible_gpus", lambda: [FAKE_GPU])
    monkeypatch.setattr(selftest, "cuda_self_test", fail)


def test_kernels_that_do_not_build_on_a_gpu_are_a_failure(gpu_whose_kernels_fail) -> None:
    report = doctor.diagnose()
    failed = {check.name: check for check in report.failures}
    assert list(failed) == ["CUDA kernels"]
    assert "cuda_wkv7.cu(3): error: oops" in failed["CUDA kernels"].value
    assert "/tmp/build-error.log" in failed["CUDA kernels"].hint
    assert f"GPU            {FAKE_GPU}" in report.format()
    assert report.to_dict()["ok"] is False


def test_the_command_exits_1_with_the_first_problem(
    gpu_whose_kernels_fail, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(sys, "argv", ["rwkv", "doctor"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    out, err = capsys.readouterr()
    assert "CUDA kernels   FAILED: could not build the rwkv_cli_cuda kernels" in out
    lines = err.splitlines()
    assert lines[0].startswith("Error: 1 problem found; CUDA kernels: could not build")
    assert lines[1].startswith("Hint: compiler output: /tmp/build-error.log")
    assert len(lines) == 2


@pytest.mark.parametrize(
    "error",
    [
        KernelSelfTestError("the compiled WKV of RWKV-7 differs from the torch path"),
        RuntimeError("CUDA error: no kernel image is available for execution on the device"),
    ],
)
def test_every_kind_of_kernel_failure_is_reported(error) -> None:
    def self_test() -> str:
        raise error

    check = doctor._self_test_check("CUDA kernels", self_test)
    assert check.status == "failed"
    assert str(error) in check.value
    assert "torch path" in check.hint


def test_a_gpu_torch_cannot_use_is_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    listing = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)\n"
    monkeypatch.setattr(doctor, "visible_gpus", list)
    monkeypatch.setattr(
        doctor, "_run", lambda command: listing if "nvidia-smi" in command else None
    )
    checks = {check.name: check for check in doctor.diagnose(build_kernels=False).checks}
    assert checks["GPU"].status == "failed"
    assert "1 NVIDIA GPU(s) present, but torch cannot use them" in checks["GPU"].value
    assert "CUDA build of torch" in checks["GPU"].hint


@pytest.mark.parametrize(
    ("configured", "gpus", "status", "shown"),
    [
        (None, [], "info", "cpu"),
        (None, [FAKE_GPU], "info", "cpu (a GPU is here: --device cuda, or RWKV_CLI_DEVICE=cuda"),
        ("cpu", [], "ok", "cpu (RWKV_CLI_DEVICE=cpu)"),
        ("tpu", [], "failed", "RWKV_CLI_DEVICE=tpu: unknown device 'tpu'"),
    ],
)
def test_the_default_device_and_a_tip_when_a_gpu_sits_unused(
    monkeypatch: pytest.MonkeyPatch, configured, gpus, status, shown
) -> None:
    if configured is None:
        monkeypatch.delenv("RWKV_CLI_DEVICE", raising=False)
    else:
        monkeypatch.setenv("RWKV_CLI_DEVICE", configured)
    check = doctor._default_device_check(gpus)
    assert check.status == status and check.value.startswith(shown)
    assert (check.hint is not None) == (status == "failed")


def test_a_folder_that_cannot_be_created_is_a_failure(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.touch()
    monkeypatch.setenv("RWKV_CLI_HOME", str(blocker / "home"))
    checks = {check.name: check for check in doctor.diagnose(build_kernels=False).checks}
    home = checks["rwkv-cli home"]
    assert home.status == "failed"
    assert home.value.endswith(f"cannot be created: {blocker} is a file")
    assert "RWKV_CLI_HOME" in home.hint
    assert checks["HF cache"].status == "info"
