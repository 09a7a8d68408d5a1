"""Batched inference: many sequences decoding together, each weight read once per step for all.

- batching/states.py: batched states, a sequence's per-layer tensors stacked with others';
- batching/engine.py: :class:`Batch`, a running batch that sequences join and leave between
  steps, as plain sessions;
- batching/generate.py: ``ContinuousBatch`` and ``generate_batch``, many requests through one
  batch (continuous batching), each with its own sampling, stop strings and seed.
"""

from rwkv_cli.batching.engine import Batch
from rwkv_cli.batching.generate import (
    BatchChunk,
    BatchFailure,
    BatchRequest,
    BatchResult,
    ContinuousBatch,
    generate_batch,
    stream_batch,
)

__all__ = [
    "Batch",
    "BatchChunk",
    "BatchFailure",
    "BatchRequest",
    "BatchResult",
    "ContinuousBatch",
    "generate_batch",
    "stream_batch",
]
