"""The model registry: one module per RWKV generation, chosen from the checkpoint's tensor names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from rwkv_cli.errors import UnsupportedModelError
from rwkv_cli.loading.checkpoint import (
    GENERATION_NAMES,
    Checkpoint,
    load_checkpoint,
    naming_the_file,
    weights_fingerprint,
)
from rwkv_cli.models.rwkv4 import RWKV4
from rwkv_cli.models.rwkv5 import RWKV5_0, RWKV5_1, RWKV5_2
from rwkv_cli.models.rwkv6 import RWKV6
from rwkv_cli.models.rwkv7 import RWKV7
from rwkv_cli.state import State


class Model(Protocol):
    """What every generation's model offers."""

    generation: str
    dtype: torch.dtype
    fingerprint: str  # identifies the exact weights (see checkpoint.weights_fingerprint)

    @property
    def vocab_size(self) -> int: ...

    def describe(self) -> str: ...

    @staticmethod
    def prepare(
        tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]: ...

    @classmethod
    def from_prepared(
        cls, prepared: dict[str, torch.Tensor], compute_dtype: torch.dtype | None = None
    ) -> Model: ...

    @property
    def device(self) -> torch.device: ...

    def to(self, device: torch.device | str) -> Model: ...

    def new_state(self) -> State: ...

    def forward(
        self, tokens: Sequence[int], state: State | None = None
    ) -> tuple[torch.Tensor, State]: ...

    def forward_batch(self, tokens: Sequence[int], state: State) -> tuple[torch.Tensor, State]: ...


MODEL_CLASSES = {
    model.generation: model for model in (RWKV4, RWKV5_0, RWKV5_1, RWKV5_2, RWKV6, RWKV7)
}


def model_class(generation: str) -> type:
    """The class that runs ``generation``, or an error explaining it is not supported yet."""
    found = MODEL_CLASSES.get(generation)
    if found is None:
        supported = ", ".join(GENERATION_NAMES[name] for name in MODEL_CLASSES)
        raise UnsupportedModelError(
            f"{GENERATION_NAMES.get(generation, generation)} checkpoints are not supported yet "
            f"(this version runs {supported})",
            hint="see the README's roadmap for when other generations arrive",
        )
    return found


def model_from_checkpoint(checkpoint: Checkpoint, dtype: torch.dtype = torch.float32) -> Model:
    """Build the model for a checkpoint's generation, or explain why it cannot run."""
    with naming_the_file(checkpoint.path):
        model = model_class(checkpoint.generation).from_tensors(checkpoint.tensors, dtype=dtype)
    model.fingerprint = weights_fingerprint(checkpoint.tensors)
    return model


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Model:
    """Read a checkpoint file and return the model it holds."""
    return model_from_checkpoint(load_checkpoint(path), dtype=dtype)
