"""Batched states: the per-layer tensors of B sequences stacked along a new leading dimension.

A batched state is an ordinary :class:`~rwkv_cli.state.State` whose every tensor has one more
dimension, the batch, in front: ``att_wkv`` (B, H, N, N) instead of (H, N, N). The model steps
it with ``forward_batch``; a row taken out of it is the state of one sequence again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from rwkv_cli.state import State


def stack_states(states: Sequence[State]) -> State:
    """The batched state of ``states`` (at least one), in that order; copies the tensors."""
    return _combine(states, torch.stack)


def as_batch(state: State) -> State:
    """``state`` as a batch of one, as views into it."""
    return _combine((state,), lambda one: one[0].unsqueeze(0))


def append_row(batched: State, state: State) -> State:
    """``batched`` with ``state`` as a new last row (a new batched state; inputs untouched)."""
    return _combine((batched, state), lambda pair: torch.cat((pair[0], pair[1].unsqueeze(0))))


def state_row(batched: State, row: int) -> State:
    """The state of one row, as views into ``batched`` (clone it to keep it apart)."""
    return _combine((batched,), lambda one: one[0][row])


def take_rows(batched: State, rows: Sequence[int]) -> State:
    """A batched state of the given rows of ``batched``, in that order (copied)."""
    index = torch.as_tensor(rows, dtype=torch.long)
    return _combine((batched,), lambda one: one[0].index_select(0, index.to(one[0].device)))


def _combine(states: Sequence[State], function: Callable[[list[torch.Tensor]], torch.Tensor]):
    """A state shaped like ``states[0]`` whose every tensor is ``function`` of the matching
    tensors of ``states``."""
    layers = [
        dataclasses.replace(
            layer,
            **{
                field.name: function([getattr(state.layers[index], field.name) for state in states])
                for field in dataclasses.fields(layer)
            },
        )
        for index, layer in enumerate(states[0].layers)
    ]
    return State(generation=states[0].generation, layers=layers)
