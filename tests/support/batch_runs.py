"""A run of the batched engine that changes its batch size, for the tests of the per-bucket
one-token graphs (on the CPU, tests/test_decode_graph.py; on a GPU, tests/test_cuda.py)."""

from __future__ import annotations

import torch

from rwkv_cli.batching import Batch
from rwkv_cli.generation import prefill

PROMPTS = [[11, 12, 13], [7], [20, 21, 22, 23], [5, 5], [30, 31, 32, 33, 34], [9, 8]]


def joins_and_leaves(model) -> list[torch.Tensor]:
    """Run a batch that grows from 3 sequences to 5, shrinks to 2 and to 1 (two steps at each
    size, fixed tokens); return the logits of every step and the final state tensors of each
    sequence as it leaves, in order."""
    batch = Batch(model)
    slots = [batch.add(prefill(model, prompt)) for prompt in PROMPTS[:3]]
    results = []

    def steps(count: int) -> None:
        for step in range(count):
            tokens = {slot: 40 + (7 * slot + 3 * step) % 50 for slot in batch.slots}
            results.append(batch.step(tokens))

    def leave(slot: int) -> None:
        results.extend(batch.remove(slot).state.tensors())

    steps(2)  # 3 sequences
    slots += [batch.add(prefill(model, prompt)) for prompt in PROMPTS[3:5]]
    steps(2)  # 5
    for slot in slots[:3]:
        leave(slot)
    steps(2)  # 2
    leave(slots[3])
    steps(2)  # 1: the one-sequence path
    leave(slots[4])
    return results
