"""The operations the models are made of: torch twins, dispatchers and compiled kernels.

Each op module (``wkv4.py``, ``wkv5.py``, ``wkv7.py``, ``time_mix7.py``, ``linear.py``) holds an
op's plain-torch twin (``*_torch``; the WKVs' token-by-token references are ``*_sequential`` or,
for RWKV-4, the twin itself) and its dispatcher, which runs a compiled kernel where one takes the
inputs. ``cuda.py`` and ``cpu_ops.py`` wrap the compiled operators that ``build.py`` builds;
``decode.py`` states the rule for the one-token path; ``selftest.py`` compares every compiled
kernel with its twin. Dependencies point one way: op modules use ``cuda``/``cpu_ops``/``build``,
``selftest`` uses the op modules, and nothing here imports the models.
"""

from __future__ import annotations

import torch

from rwkv_cli.kernels import cpu_ops, cuda
from rwkv_cli.kernels.build import (
    Extension,
    KernelBuildError,
    compiled_ops,
    is_built,
    kernel_choice,
    load_extension,
)


def require_compiled(device: torch.device) -> None:
    """For ``--kernel compiled``: build the compiled kernels that serve ``device`` now, so a
    missing or broken build stops a command before it starts. Raises KernelBuildError."""
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
        return [cuda.EXTENSION]
    if device.type == "cpu":
        return [cpu_ops.EXTENSION]
    return []


def prepare_kernels(device: torch.device) -> None:
    """Build (or load) the compiled kernels for ``device`` now, following ``--kernel``: with
    "compiled" a failure is an error, with "auto" a warning (the torch path runs)."""
    if kernel_choice() == "compiled":
        require_compiled(device)
        return
    for extension in compiled_extensions(device):
        compiled_ops(extension)


def kernels_to_build(device: torch.device) -> list[Extension]:
    """The compiled extensions for ``device`` that ``prepare_kernels`` would have to build (none
    with ``--kernel torch``): a first use, worth telling the user about."""
    if kernel_choice() == "torch":
        return []
    return [extension for extension in compiled_extensions(device) if not is_built(extension)]
