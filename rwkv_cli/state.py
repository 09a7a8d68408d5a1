"""The recurrent state: what an RWKV model carries from one token to the next.

A :class:`State` holds one record per layer; each record is a dataclass of named tensors defined by
the model's generation (for RWKV-7: ``att_shift``, ``att_wkv``, ``ffn_shift``). Models never update
a state in place: ``forward`` returns a new one, so keeping a snapshot is just keeping a reference.

A state can also live in one flat byte buffer laid out by a :class:`StateLayout` (the GPU's
one-token graphs make such states): it then copies as one operation, and its layer records are
views into the buffer, made when first asked for. A buffer of B rows, one sequence's state each,
holds a batched state (batching/states.py): its tensors have a leading batch dimension.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_ALIGNMENT = 16  # bytes: every tensor of a packed state starts at a multiple of this


class State:
    """Per-layer recurrent state of one model generation."""

    def __init__(self, generation: str, layers: list[Any]) -> None:
        self.generation = generation
        self._layers: list[Any] | None = layers
        self.packed: torch.Tensor | None = None  # the byte buffer of a packed state
        self.layout: StateLayout | None = None

    @classmethod
    def from_packed(cls, layout: StateLayout, packed: torch.Tensor) -> State:
        """The state held in ``packed``, a byte buffer laid out by ``layout`` (not copied)."""
        state = cls(layout.generation, [])
        state._layers, state.packed, state.layout = None, packed, layout
        return state

    @property
    def layers(self) -> list[Any]:
        if self._layers is None:
            self._layers = self.layout.views(self.packed)
        return self._layers

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state, layer by layer, in field order."""
        return [
            getattr(layer, field.name)
            for layer in self.layers
            for field in dataclasses.fields(layer)
        ]

    def clone(self) -> State:
        """A deep copy whose tensors share no memory with this one."""
        if self.packed is not None:
            return State.from_packed(self.layout, self.packed.clone())
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


@dataclass(frozen=True)
class _Slot:
    field: str
    offset: int  # bytes
    dtype: torch.dtype
    shape: torch.Size


@dataclass(frozen=True)
class StateLayout:
    """Where each tensor of a model's state sits in one flat byte buffer."""

    generation: str
    records: tuple[type, ...]  # each layer's record class
    slots: tuple[tuple[_Slot, ...], ...]  # each layer's tensors
    nbytes: int

    @classmethod
    def of(cls, state: State) -> StateLayout:
        """The layout of states shaped like ``state``: its tensors in order, each aligned."""
        offset, slots = 0, []
        for layer in state.layers:
            layer_slots = []
            for field in dataclasses.fields(layer):
                tensor = getattr(layer, field.name)
                layer_slots.append(_Slot(field.name, offset, tensor.dtype, tensor.shape))
                offset += -(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT
            slots.append(tuple(layer_slots))
        records = tuple(type(layer) for layer in state.layers)
        return cls(state.generation, records, tuple(slots), offset)

    def new_buffer(self, device: torch.device | str, rows: tuple[int, ...] = ()) -> torch.Tensor:
        """An uninitialised buffer for one state, or with ``rows`` (B,) for B of them."""
        return torch.empty(*rows, self.nbytes, dtype=torch.uint8, device=device)

    def views(self, packed: torch.Tensor) -> list[Any]:
        """The layer records of the state in ``packed``, as views into it (batched for a buffer
        of B rows)."""
        return [
            record(**{slot.field: _view(packed, slot) for slot in layer_slots})
            for record, layer_slots in zip(self.records, self.slots, strict=True)
        ]


def _view(packed: torch.Tensor, slot: _Slot) -> torch.Tensor:
    size = slot.shape.numel() * slot.dtype.itemsize
    rows = packed.shape[:-1]  # () for one state, (B,) for a batch
    return packed[..., slot.offset : slot.offset + size].view(slot.dtype).view(*rows, *slot.shape)
