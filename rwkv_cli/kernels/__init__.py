"""WKV recurrence implementations: torch references, dispatchers and compiled kernels.

Each ``wkv*.py`` holds a generation's torch reference and its dispatcher; ``cuda.py`` (and the CPU
kernels' ``cpu_ops.py``) wrap compiled operators built by ``build.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch


def require_compiled(device: torch.device) -> None:
    """For ``--kernel compiled``: build the compiled kernels that serve ``device`` now, so a
    missing or broken build stops a command before it starts. Raises KernelBuildError."""
    from rwkv_cli.kernels.build import KernelBuildError, load_extension

    extensions = compiled_extensions(device)
    if not extensions:
        raise KernelBuildError(
            f"there are no compiled kernels for the {device.type} in this version of rwkv-cli",
            hint="use --kernel auto (the default) or --kernel torch",
        )
    for extension in extensions:
        load_extension(extension)


def compiled_extensions(device: torch.device) -> list:
    """The compiled extensions that run WKV recurrences on ``device``'s type."""
    if device.type == "cuda":
        from rwkv_cli.kernels import cuda

        return [cuda.EXTENSION]
    if device.type == "cpu":
        extension = getattr(cpu_kernels(), "EXTENSION", None)
        return [extension] if extension is not None else []
    return []


def cpu_kernels() -> ModuleType | None:
    """The CPU kernels' module (``cpu_ops``: ``EXTENSION``, ``self_test()``), if this version
    has one."""
    try:
        return importlib.import_module("rwkv_cli.kernels.cpu_ops")
    except ImportError:
        return None
