"""The batched engine (issue #19): B sequences stepped together give each one the logits and the
state of its own run, for every generation, with sequences joining and leaving mid-run; a
sequence taken out of a batch is a plain session that saves and resumes exactly.

Tolerance: in a batch of two or more, the compiled CPU kernels (projections, recurrences) give
each sequence the bits of its own run, but RWKV-6's and 7's low-rank adapters are torch matrix
products over B rows, whose float32 sums are ordered differently. Measured relative errors: 0
for RWKV-4 and 5, up to about 1e-6 for RWKV-6 and 7 (fp32, bf16 and int8 weights, which all
compute in float32 on the CPU); the bound is 1e-5. A batch of one is the one-sequence path, and
is compared bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.batching import Batch
from rwkv_cli.batching.states import stack_states, state_row
from rwkv_cli.generation import Session, prefill
from rwkv_cli.kernels.selftest import TORCH_REFERENCES, wkv_inputs
from rwkv_cli.models import MODEL_CLASSES
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.numerics import assert_states_close, relative_error
from tests.support.state_roundtrip import save_and_resume

TOLERANCE = 1e-5  # relative error of a batched row against the sequence's own run
PROMPTS = [[11, 12, 13], [7], [20, 21, 22, 23, 24, 25, 26], [5, 5], [30, 31, 32, 33, 34]]


def _model(generation: str, dtype: torch.dtype = torch.float32):
    """A tiny model of ``generation`` with ``dtype`` weights and float32 activations (as the
    CPU runs every weight type)."""
    tensors = generation_tensors(generation, n_layer=2, seed=5)
    cls = MODEL_CLASSES[generation]
    return cls.from_prepared(cls.prepare(tensors, dtype), compute_dtype=torch.float32)


@pytest.fixture(scope="module", params=GENERATIONS)
def model(request):
    return _model(request.param)


def _token(sequence: int, step: int) -> int:
    """The token sequence ``sequence`` reads at its ``step``-th step (any fixed choice)."""
    return 40 + (7 * sequence + 3 * step) % 50


def _alone(model, sequence: int, steps: int) -> tuple[list[torch.Tensor], Session]:
    """Sequence ``sequence``'s own run: the logits after its prompt and after each of ``steps``
    tokens, and its session at the end."""
    session = prefill(model, PROMPTS[sequence])
    logits = [session.logits]
    for step in range(steps):
        session = prefill(model, [_token(sequence, step)], session)
        logits.append(session.logits)
    return logits, session


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    error = relative_error(actual, expected)
    assert error < TOLERANCE, f"{what}: relative error {error:.1e}"


@pytest.mark.parametrize("size", [1, 2, 5])
def test_every_sequence_in_a_batch_follows_its_own_run(model, size) -> None:
    steps = 4
    prompts = PROMPTS[:size]  # of different lengths
    batch = Batch(model)
    slots = [batch.add(prefill(model, prompt)) for prompt in prompts]
    batched = [[] for _ in prompts]
    for step in range(steps):
        logits = batch.step({slot: _token(row, step) for row, slot in enumerate(slots)})
        assert logits.shape == (size, model.vocab_size)
        for row, row_logits in enumerate(logits):
            batched[row].append(row_logits)
    for row, slot in enumerate(slots):
        expected, session = _alone(model, row, steps)
        taken = batch.remove(slot)
        for step, (got, want) in enumerate(zip(batched[row], expected[1:], strict=True)):
            if size == 1:
                assert torch.equal(got, want), f"step {step}: a batch of one is bit for bit"
            else:
                _assert_close(got, want, f"sequence {row}, step {step}")
        assert_states_close(taken.state, session.state, TOLERANCE)
        assert taken.tokens_consumed == session.tokens_consumed
    assert len(batch) == 0


def test_sequences_join_and_leave_a_running_batch(model) -> None:
    # step: which sequences join before it (by index into PROMPTS) and which leave after it
    joins = {0: [0, 1], 2: [2, 3], 3: [4]}
    leaves = {1: [1], 3: [0, 3], 5: [2, 4]}
    batch, slots, steps_done = Batch(model), {}, {}
    got: dict[int, list[torch.Tensor]] = {}
    final: dict[int, Session] = {}
    for step in range(6):
        for sequence in joins.get(step, []):
            slots[sequence] = batch.add(prefill(model, PROMPTS[sequence]))
            steps_done[sequence], got[sequence] = 0, []
        tokens = {slots[s]: _token(s, steps_done[s]) for s in slots}
        logits = batch.step(tokens)
        for s, slot in slots.items():
            got[s].append(logits[batch.slots.index(slot)])
            steps_done[s] += 1
        for sequence in leaves.get(step, []):
            final[sequence] = batch.remove(slots.pop(sequence))
    assert not slots and len(batch) == 0
    for sequence, logits in got.items():
        expected, session = _alone(model, sequence, steps_done[sequence])
        for step, (actual, want) in enumerate(zip(logits, expected[1:], strict=True)):
            _assert_close(actual, want, f"sequence {sequence}, step {step}")
        assert_states_close(final[sequence].state, session.state, TOLERANCE)


def _save(path, model, session: Session) -> Session:
    """Save ``session`` to a state file at ``path`` and read it back for ``model``."""
    return save_and_resume(model, model, [], path, session)[2]


def test_a_sequence_taken_out_saves_and_resumes_alone(model, tmp_path) -> None:
    batch = Batch(model)
    slots = [batch.add(prefill(model, prompt)) for prompt in PROMPTS[:3]]
    batch.step({slot: _token(row, 0) for row, slot in enumerate(slots)})
    taken = batch.remove(slots[1])
    resumed = _save(tmp_path / "taken.rwkvstate", model, taken)
    assert torch.equal(resumed.logits, taken.logits)
    assert_states_close(resumed.state, taken.state, 0)  # a state file keeps it exactly
    assert resumed.tokens_consumed == taken.tokens_consumed == len(PROMPTS[1]) + 1

    alone, _ = model.forward([_token(1, 1)], resumed.state)
    stayed = Batch(model)  # the same sequence, had it stayed in a batch
    kept = stayed.add(prefill(model, PROMPTS[1]))
    stayed.add(prefill(model, PROMPTS[0]))
    stayed.step({kept: _token(1, 0), stayed.slots[1]: _token(0, 0)})
    in_batch = stayed.step({kept: _token(1, 1), stayed.slots[1]: _token(0, 1)})[0]
    _assert_close(alone, in_batch, "resumed alone")


def test_a_sequence_resumed_from_a_file_continues_in_a_running_batch(model, tmp_path) -> None:
    saved = _save(tmp_path / "saved.rwkvstate", model, prefill(model, PROMPTS[2]))
    expected, _ = _alone(model, 2, 3)
    batch = Batch(model)
    others = [batch.add(prefill(model, prompt)) for prompt in PROMPTS[:2]]
    batch.step({slot: _token(row, 0) for row, slot in enumerate(others)})
    slot = batch.add(saved)
    for step in range(3):
        tokens = {other: _token(row, step + 1) for row, other in enumerate(others)}
        logits = batch.step(tokens | {slot: _token(2, step)})
        _assert_close(logits[batch.slots.index(slot)], expected[step + 1], f"step {step}")


def test_a_step_needs_a_token_for_every_slot(model) -> None:
    batch = Batch(model)
    first = batch.add(prefill(model, [1]))
    batch.add(prefill(model, [2]))
    with pytest.raises(ValueError, match="every slot"):
        batch.step({first: 3})
    with pytest.raises(KeyError):
        batch.remove(99)
    with pytest.raises(ValueError, match="every slot"):
        Batch(model).step({})


def test_a_fresh_session_joins_with_the_zero_state(model) -> None:
    batch = Batch(model)
    fresh, other = batch.add(Session()), batch.add(prefill(model, [3, 4]))
    logits = batch.step({fresh: 9, other: 10})
    _assert_close(logits[0], model.forward([9])[0], "fresh")


@pytest.mark.parametrize("generation", GENERATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
def test_narrow_weights_batched_equal_their_own_single_runs(generation, dtype) -> None:
    model = _model(generation, dtype)
    batch = Batch(model)
    slots = [batch.add(prefill(model, prompt)) for prompt in PROMPTS[:3]]
    for step in range(2):
        logits = batch.step({slot: _token(row, step) for row, slot in enumerate(slots)})
    for row in range(3):
        expected, _ = _alone(model, row, 2)
        _assert_close(logits[row], expected[-1], f"sequence {row}")


@pytest.mark.parametrize("generation", sorted(TORCH_REFERENCES))
def test_batched_recurrences_equal_each_sequence_alone(generation) -> None:
    """The torch twins with a leading batch dimension, B = 3 sequences of 4 tokens."""
    shared = {"4": (3, 4), "5": (5,), "7": ()}[generation]  # weights: the same for every row
    runs = [wkv_inputs(generation, tokens=4, seed=seed) for seed in range(3)]
    runs = [
        tuple(runs[0][i] if i in shared else x for i, x in enumerate(inputs)) for inputs in runs
    ]
    batched = [
        runs[0][i] if i in shared else torch.stack([inputs[i] for inputs in runs])
        for i in range(len(runs[0]))
    ]
    outputs = TORCH_REFERENCES[generation](*batched)
    for row, inputs in enumerate(runs):
        for index, (got, want) in enumerate(
            zip(outputs, TORCH_REFERENCES[generation](*inputs), strict=True)
        ):
            _assert_close(got[row], want, f"row {row}, output {index}")


def test_rows_of_a_stacked_state_are_the_states_stacked(model) -> None:
    states = [prefill(model, prompt).state for prompt in PROMPTS[:3]]
    stacked = stack_states(states)
    for row, state in enumerate(states):
        for got, want in zip(state_row(stacked, row).tensors(), state.tensors(), strict=True):
            assert torch.equal(got, want)
