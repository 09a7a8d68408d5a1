"""Weight groups: dataclasses whose fields are named after checkpoint keys.

A generation declares each group of one block's tensors as a :class:`WeightGroup` (its time
mixing's ``blocks.N.att.*``, its channel mixing's ``blocks.N.ffn.*``); a field ``ln_x_weight``
holds the tensor ``ln_x.weight``. The same names list the keys a checkpoint must have
(models/validate.py) and pick a block's tensors out of the prepared weights (models/frame.py).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch

from rwkv_cli.kernels.linear import QuantizedMatrix, Weight

# Projection matrices, kept (out, in) as checkpoints store them, are the bulk of the weights: they
# alone take the weight format asked for (float32, 16-bit or int8; see kernels/linear.py).
_PROJECTIONS = ("receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight")
SCALE_SUFFIX = ".scale"  # an int8 projection's per-row scales are stored under its name + this


def is_projection(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` is a projection matrix (or the head)."""
    return name == "head.weight" or name.endswith(_PROJECTIONS)


def block_suffix(name: str) -> str:
    """A tensor's name without ``blocks.N.``: the key that names it in every block."""
    return name.split(".", 2)[2] if name.startswith("blocks.") else name


def checkpoint_key(field_name: str) -> str:
    """Map a weight field to its checkpoint suffix: ``ln_x_weight`` -> ``ln_x.weight``."""
    for suffix in ("_weight", "_bias"):
        if field_name.endswith(suffix):
            return field_name[: -len(suffix)] + "." + suffix[1:]
    return field_name


def prepared_weight(prepared: dict[str, torch.Tensor], name: str) -> Weight | None:
    """The tensor ``name`` of a prepared dict, as a QuantizedMatrix if it has int8 scales."""
    scale = prepared.get(name + SCALE_SUFFIX)
    if scale is not None:
        return QuantizedMatrix(prepared[name], scale)
    return prepared.get(name)


@dataclass
class WeightGroup:
    """Base for weight groups whose fields are named after checkpoint keys."""

    @classmethod
    def checkpoint_keys(cls) -> list[str]:
        return [checkpoint_key(field.name) for field in dataclasses.fields(cls)]

    @classmethod
    def take(cls, prepared: dict[str, torch.Tensor], prefix: str):
        """This group's tensors from a prepared dict; absent ones are None."""
        return cls(
            **{
                field.name: prepared_weight(prepared, prefix + checkpoint_key(field.name))
                for field in dataclasses.fields(cls)
            }
        )

    def move_to(self, device: torch.device) -> None:
        """Move every tensor to ``device``, in place. Values derived from the fields
        (``functools.cached_property``, such as stacked mixes) are dropped: they are made again,
        from the moved fields, when next used."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                setattr(self, field.name, value.to(device))
        for name, attribute in vars(type(self)).items():
            if isinstance(attribute, functools.cached_property):
                self.__dict__.pop(name, None)


@dataclass
class NormWeights(WeightGroup):
    """``blocks.N.ln1`` / ``ln2``: the pre-norms of time mixing and channel mixing."""

    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor


@dataclass
class Block:
    """One block's weights."""

    norms: NormWeights
    att: Any  # the generation's time-mixing weight group
    ffn: Any  # the generation's channel-mixing weight group
