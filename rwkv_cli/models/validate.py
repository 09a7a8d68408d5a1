"""Checking a checkpoint before it is run: every tensor the generation needs, none it would
ignore, each of the shape the model's dimensions imply; and token ids within the vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from rwkv_cli.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from rwkv_cli.models.weight_groups import block_suffix

MERGED_STATE_HINT = (
    "this model has a state-tuning state merged in: pass the base model, and the time_state "
    "tensors as a file of their own with --state"
)
MODEL_KEYS = frozenset({"emb.weight", "head.weight", "ln_out.weight", "ln_out.bias"})
FIRST_BLOCK_KEYS = frozenset({"ln0.weight", "ln0.bias"})  # block 0's extra LayerNorm, folded


def squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def tensor_shape(
    tensors: dict[str, torch.Tensor], name: str, dims: int, label: str
) -> tuple[int, ...]:
    """The shape of ``tensors[name]`` without its size-1 dims, which must leave ``dims`` dims."""
    if name not in tensors:
        raise CheckpointError(f"incomplete {label} checkpoint: no {name} tensor")
    shape = squeezed(tensors[name].shape)
    if len(shape) != dims:
        raise CheckpointError(
            f"corrupt {label} checkpoint: {name} has shape {list(tensors[name].shape)}"
        )
    return shape


def check_keys(
    tensors: dict[str, torch.Tensor],
    n_layer: int,
    block_keys: Iterable[str],
    label: str,
    hint: str | None = None,
    optional: Iterable[str] = (),
) -> None:
    """Refuse checkpoints with missing tensors or tensors this implementation would ignore;
    ``optional`` names tensors that may be absent."""
    block_keys = list(block_keys)
    expected = set(MODEL_KEYS) | {f"blocks.0.{key}" for key in FIRST_BLOCK_KEYS}
    for index in range(n_layer):
        expected |= {f"blocks.{index}.{key}" for key in block_keys}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        if any(name.endswith(".att.time_state") for name in unexpected):
            hint = MERGED_STATE_HINT
        raise UnsupportedModelError(
            f"unsupported {label} variant: unexpected tensors {shown}", hint=hint
        )
    missing = sorted(expected - set(tensors) - set(optional))
    if missing:
        raise CheckpointError(f"incomplete {label} checkpoint: missing {missing[0]}")


def check_shapes(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    default: tuple[int, ...],
    label: str,
) -> None:
    """Every tensor must have the shape its key suffix implies (``default`` for the rest).

    ``expected`` is keyed by the name without ``blocks.N.``; size-1 dims are ignored, so a
    ``(1, 1, C)`` mixing vector matches ``(C,)``.
    """
    for name, tensor in tensors.items():
        want = expected.get(block_suffix(name), default)
        if squeezed(tensor.shape) != squeezed(want):
            raise CheckpointError(
                f"corrupt {label} checkpoint: {name} has shape {list(tensor.shape)}, "
                f"expected {list(want)}"
            )


def check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    if not tokens:
        raise ValueError("forward() needs at least one token")
    if max(tokens) >= vocab_size or min(tokens) < 0:
        raise InvalidInputError(f"token id out of range for vocabulary {vocab_size}")
