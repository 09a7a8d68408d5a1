"""Where a model runs, and in which weight type: ``--device`` and ``--dtype``, checked against
this machine before anything is loaded."""

from __future__ import annotations

import functools

import torch

from rwkv_cli.errors import InvalidInputError
from rwkv_cli.kernels.linear import INT4
from rwkv_cli.settings import DTYPE_NAMES, DtypeName

DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
DTYPES: dict[DtypeName, torch.dtype] = dict(
    zip(DTYPE_NAMES, (torch.float32, torch.float16, torch.bfloat16, torch.int8, INT4), strict=True)
)
_DOCTOR_HINT = "`rwkv doctor` shows the GPUs and the torch build"
_CPU = torch.device("cpu")


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The device ``spec`` names: "cpu" (the default), "cuda" (the current GPU), "cuda:N", or
    "auto" (the GPU if there is one, else the CPU). InvalidInputError if it is not there."""
    text = device_name(spec)
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if _has_cuda() else _CPU
    device = torch.device(text)
    if device.type == "cpu":
        return _CPU
    if not _has_cuda():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU visible"
        raise InvalidInputError(
            f"device {text} is not available: {build}",
            hint=f"run on the CPU (--device cpu), or install a CUDA build of torch; {_DOCTOR_HINT}",
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise InvalidInputError(
            f"there is no GPU cuda:{index}: this machine has {count}", hint=_DOCTOR_HINT
        )
    return torch.device("cuda", index)


def device_name(spec: str | torch.device | None) -> str:
    """``spec`` as one of the device names rwkv-cli knows (cpu, cuda, cuda:N, auto), whether
    or not this machine has that device; InvalidInputError for any other name."""
    text = str(spec if spec is not None else "cpu").strip().lower()
    if text == "auto":
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidInputError(
            f"unknown device {text!r}", hint=f"use one of {', '.join(DEVICE_CHOICES)}"
        )
    return text


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The weight type ``name`` names (fp32, fp16, bf16, int8, int4); without one, fp16 on a GPU
    (as the official package runs) and fp32 on the CPU (where 16-bit weights decode faster but
    the matrix products of prefill are slower). int8 and int4 weights are for the CPU."""
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = DTYPES.get(name.strip().lower())
    if dtype is None:
        raise InvalidInputError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(DTYPES)}")
    if dtype in (torch.int8, INT4) and device.type != "cpu":
        raise InvalidInputError(
            f"{dtype_name(dtype)} weights run on the CPU only",
            hint="on a GPU use --dtype fp16 or bf16",
        )
    if dtype == torch.bfloat16 and device.type == "cuda" and not _bf16_supported(device):
        raise InvalidInputError(
            f"{torch.cuda.get_device_name(device)} does not compute in bf16",
            hint="use --dtype fp16 (or fp32)",
        )
    return dtype


def compute_dtype(weights: torch.dtype, device: torch.device) -> torch.dtype:
    """The activations' type for ``weights`` on ``device``: float32 on the CPU (its 16-bit
    arithmetic is slow; the compiled kernels widen 16-bit and int8 weights as they read them),
    the weights' own type on a GPU."""
    return torch.float32 if device.type == "cpu" else weights


def dtype_name(dtype: torch.dtype) -> str:
    """fp32, fp16, bf16 (as --dtype spells them), else torch's name."""
    names = {value: key for key, value in DTYPES.items()}
    return names.get(dtype, str(dtype).removeprefix("torch."))


def use_own_stream(device: torch.device) -> None:
    """On a GPU, make a stream of rwkv-cli's own this thread's current stream, for good.

    The one-token CUDA graphs must be captured on a stream other than the default one, and cuBLAS
    keeps a workspace (32 MiB on Hopper) for every stream it runs on. With all the work (loading,
    prefill, graphs, sampling) on one such stream, and the graphs captured on it, there is one
    workspace. Commands call this; library users who stay on the default stream get a second.
    """
    if device.type == "cuda":
        torch.cuda.set_stream(_own_stream(device))


@functools.cache
def _own_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _has_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def _bf16_supported(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8  # bf16 arithmetic arrived with Ampere (compute capability 8.0)
