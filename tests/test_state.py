"""States packed in one byte buffer (what the GPU's one-token graphs make) behave as any other."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rwkv_cli.batching.states import stack_states
from rwkv_cli.models import MODEL_CLASSES
from rwkv_cli.state import State, StateLayout
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.numerics import assert_states_close


def _model(generation: str, dtype: torch.dtype = torch.float32):
    return MODEL_CLASSES[generation].from_tensors(generation_tensors(generation), dtype=dtype)


def _packed(state: State) -> State:
    layout = StateLayout.of(state)
    packed = State.from_packed(layout, layout.new_buffer("cpu"))
    torch._foreach_copy_(packed.tensors(), state.tensors())
    return packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_packed_state_holds_the_same_tensors(generation, dtype) -> None:
    model = _model(generation, dtype)
    _, state = model.forward([5, 6, 7])
    packed = _packed(state)
    assert packed.generation == state.generation
    for (name, got), (_, want) in zip(
        packed.named_tensors().items(), state.named_tensors().items(), strict=True
    ):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
        storage = got.untyped_storage().data_ptr()
        assert storage == packed.packed.untyped_storage().data_ptr(), f"{name} is a view"
        assert got.data_ptr() % 16 == 0, f"{name} is aligned"
    assert [type(layer) for layer in packed.layers] == [type(layer) for layer in state.layers]


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_model_continues_from_a_packed_state(generation) -> None:
    model = _model(generation)
    _, state = model.forward([5, 6, 7])
    expected, expected_state = model.forward([8, 9], state)
    logits, new_state = model.forward([8, 9], _packed(state))
    assert torch.equal(logits, expected)
    assert_states_close(new_state, expected_state, 0.0)


def test_layer_records_are_made_once_and_share_the_buffer() -> None:
    _, state = _model("7").forward([1, 2])
    filled = _packed(state)
    packed = State.from_packed(filled.layout, filled.packed.clone())
    assert packed._layers is None  # not made until asked for
    layers = packed.layers
    assert packed.layers is layers
    packed.packed.zero_()  # writes through the buffer show in the views
    assert all(not tensor.any() for tensor in packed.tensors())


def test_copies_of_a_packed_state_are_independent() -> None:
    _, state = _model("6").forward([1, 2])
    packed = _packed(state)
    clone = packed.clone()
    packed.packed.zero_()
    assert_states_close(clone, state, 0.0)


def test_a_layout_aligns_every_tensor_and_counts_its_bytes() -> None:
    state = _model("4", torch.float16).new_state()
    layout = StateLayout.of(state)
    offsets = [slot.offset for layer in layout.slots for slot in layer]
    assert offsets == sorted(offsets) and all(offset % 16 == 0 for offset in offsets)
    fields = [dataclasses.fields(layer) for layer in state.layers]
    assert [len(layer) for layer in layout.slots] == [len(names) for names in fields]
    payload = sum(tensor.numel() * tensor.element_size() for tensor in state.tensors())
    assert payload <= layout.nbytes < payload + 16 * len(offsets)


@pytest.mark.parametrize("generation", ["4", "7"])
def test_a_buffer_of_rows_holds_a_batch_one_state_a_row(generation) -> None:
    """What a batch's graph keeps: row b of the buffer packs sequence b's state, and the views of
    the whole buffer are the batched state (a leading batch dimension)."""
    model = _model(generation, torch.bfloat16)
    states = [model.forward(prompt)[1] for prompt in ([5, 6], [7], [8, 9, 10])]
    layout = StateLayout.of(states[0])
    rows = layout.new_buffer("cpu", (3,))
    for row, state in zip(rows, states, strict=True):
        torch._foreach_copy_(State.from_packed(layout, row).tensors(), state.tensors())
    assert_states_close(State.from_packed(layout, rows), stack_states(states), 0.0)
