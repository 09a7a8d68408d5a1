"""The compiled CPU recurrences with a batch dimension (issue #19): RWKV-7's one-token time mixing
and the RWKV-4 and 5/6 WKVs step B sequences in one call. Each equals its torch twin, gives every
sequence the bits it gets alone, and is what a batched decode step (``forward_batch``) runs."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.batching.states import stack_states
from rwkv_cli.generation import prefill
from rwkv_cli.kernels import build, cpu_ops
from rwkv_cli.kernels.selftest import (
    TORCH_REFERENCES,
    one_sequence,
    time_mix_inputs,
    time_mix_sequence,
    wkv_inputs,
)
from rwkv_cli.kernels.time_mix7 import time_mix7_torch
from rwkv_cli.models import MODEL_CLASSES
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.numerics import relative_error

BATCHES = [1, 3, 8]
TOLERANCE = 1e-5  # float32 against the twin (float64 for the WKVs): only the order of sums differs
# 4 heads of 64 in a batch of 8 is enough work to be split among threads (cpu_kernels.h); one
# sequence alone is not, so the bit-identity tests compare the two ways of running too.
HEADS, HEAD_SIZE, LARGE_BATCH = 4, 64, 8
LAYER = [True, False]
LAYER_IDS = ["layer 0", "later layer"]


@pytest.fixture(scope="module")
def ops() -> cpu_ops.CpuKernels:
    return cpu_ops.CpuKernels(build.load_extension(cpu_ops.EXTENSION))


def _compiled_wkv(ops: cpu_ops.CpuKernels, generation: str):
    return {"4": ops.wkv4, "5": ops.wkv5}[generation]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("first_layer", LAYER, ids=LAYER_IDS)
def test_batched_time_mixing_equals_the_torch_twin(ops, batch, first_layer) -> None:
    state, inputs, layer = time_mix_inputs(batch, first_layer, HEADS, HEAD_SIZE, seed=batch)
    expected = time_mix7_torch(state, *inputs, **layer)
    actual = ops.time_mix7(state, *inputs, **layer)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape
        assert relative_error(got, want) < TOLERANCE


@pytest.mark.parametrize("first_layer", LAYER, ids=LAYER_IDS)
def test_time_mixing_gives_each_sequence_the_same_bits_alone_as_in_a_batch(
    ops, first_layer
) -> None:
    arguments = time_mix_inputs(LARGE_BATCH, first_layer, HEADS, HEAD_SIZE)
    state, inputs, layer = arguments
    together = ops.time_mix7(state, *inputs, **layer)
    for row in range(LARGE_BATCH):
        state, inputs, layer = time_mix_sequence(arguments, row)
        alone = ops.time_mix7(state, *inputs, **layer)
        for got, want in zip(together, alone, strict=True):
            assert torch.equal(got[row], want), f"sequence {row}"


@pytest.mark.parametrize("generation", ["4", "5"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("tokens", [1, 5])
def test_batched_wkv_equals_the_float64_twin(ops, generation, batch, tokens) -> None:
    inputs = wkv_inputs(generation, tokens, HEADS, HEAD_SIZE, seed=batch, batch=batch)
    expected = TORCH_REFERENCES[generation](*(x.double() for x in inputs))
    for got, want in zip(_compiled_wkv(ops, generation)(*inputs), expected, strict=True):
        assert got.shape == want.shape
        assert relative_error(got.double(), want) < TOLERANCE


@pytest.mark.parametrize("generation", ["4", "5"])
def test_wkv_gives_each_sequence_the_same_bits_alone_as_in_a_batch(ops, generation) -> None:
    compiled = _compiled_wkv(ops, generation)
    inputs = wkv_inputs(generation, 1, HEADS, HEAD_SIZE, batch=LARGE_BATCH)
    together = compiled(*inputs)
    for row in range(LARGE_BATCH):
        alone = compiled(*one_sequence(generation, inputs, row))
        for got, want in zip(together, alone, strict=True):
            assert torch.equal(got[row], want), f"sequence {row}"


def test_the_batched_kernels_refuse_rows_that_do_not_match_the_state(ops) -> None:
    """A batch of 3 states with inputs for 2 sequences would read past the inputs' end."""
    state, inputs, layer = time_mix_inputs(3, False, 2, 16)
    with pytest.raises(ValueError, match="r must be float32 with 96 elements"):
        ops.time_mix7(state, inputs[0][:2], *inputs[1:], **layer)
    with pytest.raises(ValueError, match="v_first must be float32 with 96 elements"):
        ops.time_mix7(state, *inputs, **(layer | {"v_first": layer["v_first"][:2]}))
    state, r, w, k, v, u = wkv_inputs("5", 1, 2, 16, batch=3)
    with pytest.raises(ValueError, match="r must be"):
        ops.wkv5(state, r[:2], w[:2], k[:2], v[:2], u)
    aa, bb, pp, w, u, k, v = wkv_inputs("4", 1, 2, 16, batch=3)
    with pytest.raises(ValueError, match="aa must be float32 with 64 elements"):
        ops.wkv4(aa, bb, pp, w, u, k[:2], v[:2])


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_batched_decode_step_runs_the_compiled_recurrences(generation, monkeypatch) -> None:
    """forward_batch hands each layer's batched state to a kernel, never to the torch twin."""
    cls = MODEL_CLASSES[generation]
    model = cls.from_prepared(cls.prepare(generation_tensors(generation, n_layer=2), torch.float32))
    states = stack_states([prefill(model, prompt).state for prompt in ([1, 2], [3], [4, 5, 6])])
    ranks = []  # the dimensions of each kernel call's state: batched ones have one more
    for name in ("time_mix7", "wkv4", "wkv5"):
        original = getattr(cpu_ops.CpuKernels, name)

        def spy(self, state, *args, _original=original, **kwargs):
            ranks.append(state.dim())
            return _original(self, state, *args, **kwargs)

        monkeypatch.setattr(cpu_ops.CpuKernels, name, spy)
    logits, _ = model.forward_batch([7, 8, 9], states)
    assert logits.shape == (3, model.vocab_size)
    assert ranks == [2 if generation == "4" else 4] * model.config.n_layer
