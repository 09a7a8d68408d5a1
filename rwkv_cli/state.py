"""The recurrent state: what an RWKV model carries from one token to the next.

A :class:`State` holds one record per layer; each record is a dataclass of named tensors defined by
the model's generation (for RWKV-7: ``att_shift``, ``att_wkv``, ``ffn_shift``). Models never update
a state in place: ``forward`` returns a new one, so keeping a snapshot is just keeping a reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class State:
    """Per-layer recurrent state of one model generation."""

    generation: str
    layers: list[Any]

    def clone(self) -> State:
        """A deep copy whose tensors share no memory with this one."""
        copies = [
            dataclasses.replace(
                layer,
                **{
                    field.name: getattr(layer, field.name).clone()
                    for field in dataclasses.fields(layer)
                },
            )
            for layer in self.layers
        ]
        return State(generation=self.generation, layers=copies)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``blocks.{i}.att.shift``-style names, as used in state files."""
        named = {}
        for index, layer in enumerate(self.layers):
            for field in dataclasses.fields(layer):
                name = field.name.replace("_", ".", 1)
                named[f"blocks.{index}.{name}"] = getattr(layer, field.name)
        return named
