"""WKV recurrence implementations: torch references, dispatchers and compiled kernels.

Each ``wkv*.py`` holds a generation's torch reference and its dispatcher; ``cuda.py`` (and the CPU
kernels' ``cpu_ops.py``) wrap compiled operators built by ``build.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rwkv_cli.kernels.build import Extension


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
        load_extension(extension, retry=True)


def compiled_extensions(device: torch.device) -> list[Extension]:
    """The compiled extensions that serve models on ``device``'s type."""
    if device.type == "cuda":
        from rwkv_cli.kernels import cuda

        return [cuda.EXTENSION]
    if device.type == "cpu":
        from rwkv_cli.kernels import cpu_ops

        return [cpu_ops.EXTENSION]
    return []


def prepare_kernels(device: torch.device) -> None:
    """Build (or load) the compiled kernels for ``device`` now, following ``--kernel``: with
    "compiled" a failure is an error, with "auto" a warning (the torch path runs)."""
    from rwkv_cli.kernels.build import compiled_ops, kernel_choice

    if kernel_choice() == "compiled":
        require_compiled(device)
        return
    for extension in compiled_extensions(device):
        compiled_ops(extension)


def kernels_to_build(device: torch.device) -> list[Extension]:
    """The compiled extensions for ``device`` that ``prepare_kernels`` would have to build (none
    with ``--kernel torch``): a first use, worth telling the user about."""
    from rwkv_cli.kernels.build import is_built, kernel_choice

    if kernel_choice() == "torch":
        return []
    return [extension for extension in compiled_extensions(device) if not is_built(extension)]
