"""The rule for the one-token (decode) path, stated once.

Generation reads a prompt in one forward over many tokens (prefill), then decodes one token per
forward. The two are bound by different things: prefill by arithmetic, so it batches the tokens
into matrix products and computes the recurrences chunk by chunk; decode by reading every weight
once per token and by per-operation overhead, so it takes paths made for exactly one token. A
forward, or an operation within it, takes the decode path exactly when it has one token
(``is_decode``); any other count takes the prefill path. Where the rule applies:

- projections on the CPU: the compiled ``gemv`` kernel (kernels/linear.py) for up to
  ``SMALL_BATCH_ROWS`` rows (``is_small_batch``; narrow weights a few more, as widening them for
  a GEMM costs too), else a GEMM;
- RWKV-7's time mixing on the CPU: one fused compiled kernel (kernels/time_mix7.py), for one
  sequence or a batch, else the torch twin, whose recurrence is chunked for many tokens;
- the WKV recurrences' torch twins: token by token (``wkv5_sequential``, ``wkv7_sequential``),
  else chunked (``wkv5_chunked``, ``wkv7_chunked``);
- a whole forward on a GPU: replayed as one CUDA graph (models/decode_graph.py, models/frame.py).

A batch of sequences decoding together (``RecurrentModel.forward_batch``) has B rows of one
token each: its projections read each weight once for all B rows (the ``gemv`` kernel up to
``SMALL_BATCH_ROWS`` rows, a GEMM beyond). Its recurrences, whose inputs then carry a leading
batch dimension (``is_batched``), take the same paths as one sequence's: on the CPU, RWKV-7's
fused time mixing and the RWKV-4 and 5/6 kernels step all B sequences in one call, each
sequence with the bits it gets alone; on a GPU the CUDA WKV kernels take the batch, and the
whole batched step replays the CUDA graph of its batch-size bucket, its rows padded
(models/decode_graph.py). Without the compiled kernels, batched recurrences run their torch
twins token by token. A projection cannot tell B sequences' tokens from a short chunk of one
sequence's prompt, and need not: both are a few rows bound by reading the weights.

The compiled kernels among those run only where they take the inputs (float32 CPU tensors for
the CPU kernels, no gradient asked for, a build that succeeded); elsewhere one token goes through
the op's torch twin, with the same result up to rounding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DECODE_TOKENS = 1
# Rows of input up to which a CPU projection runs the gemv kernel, which reads each weight once
# for up to this many rows (kMaxRows in csrc/cpu_gemv.cpp), rather than a GEMM: a decode step of
# up to 16 sequences. The rows' inputs stay in cache while the weights stream past; for more rows
# the arithmetic, which a GEMM does faster, outweighs reading the weights.
SMALL_BATCH_ROWS = 16


def is_decode(tokens: int) -> bool:
    """Whether ``tokens`` tokens take the one-token (decode) path."""
    return tokens == DECODE_TOKENS


def is_small_batch(rows: int) -> bool:
    """Whether a projection over ``rows`` rows of input takes the small-batch (decode) kernel."""
    return 1 <= rows <= SMALL_BATCH_ROWS


def is_batched(state: torch.Tensor, sequence_dims: int) -> bool:
    """Whether an op's ``state``, of ``sequence_dims`` dimensions for one sequence, holds a batch
    of sequences (a leading batch dimension); the compiled kernels take such inputs, the torch
    twins too (token by token)."""
    return state.dim() > sequence_dims
