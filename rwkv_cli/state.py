"""The recurrent state: what an RWKV model carries from one token to the next.

A :class:`State` holds one record per layer; each record is a dataclass of named tensors defined by
the model's generation (for RWKV-7: ``att_shift``, ``att_wkv``, ``ffn_shift``). Models never update
a state in place: ``forward`` returns a new one, so keeping a snapshot is just keeping a reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
        return self._map(torch.Tensor.clone)

    def to(self, device: torch.device | str) -> State:
        """This state with its tensors on ``device`` (tensors already there are not copied)."""
        return self._map(lambda tensor: tensor.to(device))

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> State:
        layers = [
            dataclasses.replace(
                layer,
                **{
                    field.name: function(getattr(layer, field.name))
                    for field in dataclasses.fields(layer)
                },
            )
            for layer in self.layers
        ]
        return State(generation=self.generation, layers=layers)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``blocks.{i}.att.shift``-style names, as used in state files."""
        return {
            _tensor_name(index, field.name): getattr(layer, field.name)
            for index, layer in enumerate(self.layers)
            for field in dataclasses.fields(layer)
        }

    def with_tensors(self, named: dict[str, torch.Tensor]) -> State:
        """A state shaped like this one, holding ``named`` tensors (named as ``named_tensors``).

        Tensors take the device and dtype of this state's. Raises ValueError naming the first
        tensor that is missing or has the wrong shape.
        """
        layers = []
        for index, layer in enumerate(self.layers):
            values = {}
            for field in dataclasses.fields(layer):
                name = _tensor_name(index, field.name)
                template = getattr(layer, field.name)
                tensor = named.get(name)
                if tensor is None:
                    raise ValueError(f"no {name} tensor")
                if tensor.shape != template.shape:
                    raise ValueError(
                        f"{name} has shape {list(tensor.shape)}, expected {list(template.shape)}"
                    )
                values[field.name] = tensor.to(device=template.device, dtype=template.dtype)
            layers.append(dataclasses.replace(layer, **values))
        return State(generation=self.generation, layers=layers)


def _tensor_name(index: int, field_name: str) -> str:
    """``att_wkv`` of layer 3 -> ``blocks.3.att.wkv``."""
    return f"blocks.{index}.{field_name.replace('_', '.', 1)}"
