"""The one-token step on a GPU as a CUDA graph: one launch per token instead of hundreds.

Decoding one token runs a few hundred small kernels; launched one by one from Python, the launches
cost more than the work (a 0.1B model is launch-bound even on a slow GPU). A CUDA graph records
the whole step once and replays it with one call. A graph reads and writes fixed addresses, so
:class:`OneTokenGraph` owns its inputs: the token id, and a state held in one byte buffer
(state.StateLayout) that the step updates in place.

Models never change a state they were given, so every step returns a copy of that buffer as a
packed :class:`State` (one device copy). A state that is the copy made by the last step is
already in the buffer and is not copied back in; any other state is copied in first. Nothing
here waits for the GPU.

A batch of sequences stepping together (``forward_batch``) runs the graph of its batch-size
bucket (``batch_bucket``), captured on first use: the graph of R rows takes up to R sequences,
each a row of its input buffer. A batch of B fills the first B rows; the other R - B rows are
padding (token ``PADDING_TOKEN``, and the zero state or whatever their last step left there),
and their logits and states are never read, so they never reach a sequence. Every row is
computed apart from the others (projections, norms and recurrences act row by row), so padding
changes no real row. Sequences joining or leaving change B, and the next step picks the bucket
for the new B.

Graphs are captured on the current stream, which commands make a stream of their own
(device.use_own_stream), or else on a side stream: never on the default stream, where capture
is impossible. ``RWKV_CLI_CUDA_GRAPHS=0`` turns graphs off; a capture that fails warns once
and the model runs without one.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Protocol

import torch

from rwkv_cli.state import State, StateLayout

ENVIRONMENT_SWITCH = "RWKV_CLI_CUDA_GRAPHS"
WARM_UP_STEPS = 2  # before capture: loads kernels and sets up cuBLAS outside the graph
PADDING_TOKEN = 0  # what padding rows read: any valid id will do, their results are discarded


def batch_bucket(sequences: int) -> int:
    """The rows of the graph that steps a batch of ``sequences``: the smallest power of two that
    holds them. Powers of two keep the graphs few (one per doubling, each holding its own
    buffers) and the padding under half of a graph's rows."""
    if sequences < 1:
        raise ValueError(f"a batch has at least one sequence, not {sequences}")
    return 1 << (sequences - 1).bit_length()


def padded_tokens(tokens: Sequence[int], rows: int) -> list[int]:
    """``tokens``, one per sequence, then ``PADDING_TOKEN`` up to ``rows``."""
    return [int(token) for token in tokens] + [PADDING_TOKEN] * (rows - len(tokens))


def graphs_enabled(device: torch.device) -> bool:
    """Whether one-token steps on ``device`` should run as CUDA graphs."""
    return device.type == "cuda" and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"


class SteppingModel(Protocol):
    """What a graph needs of a model (models/frame.py's RecurrentModel has it)."""

    @property
    def device(self) -> torch.device: ...

    def new_state(self) -> State: ...

    def step_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]: ...


class StepBuffers:
    """What a one-token graph reads and writes: the token ids and a packed state
    (state.StateLayout) of one sequence, or with ``rows`` of a batch of up to ``rows`` sequences,
    and the step over them.

    A graph records ``step`` once and replays it; called directly (tests do, on the CPU),
    ``step`` computes what a replay computes.
    """

    def __init__(self, model: SteppingModel, rows: int | None = None) -> None:
        device = model.device
        zero_state = model.new_state()
        self.rows = rows
        batch = () if rows is None else (rows,)
        self.layout = StateLayout.of(zero_state)
        self.zero = self.layout.new_buffer(device)
        torch._foreach_copy_(
            State.from_packed(self.layout, self.zero).tensors(), zero_state.tensors()
        )
        self.buffer = self.layout.new_buffer(device, batch)  # (nbytes,) or (rows, nbytes)
        self.buffer.copy_(self.zero)  # every row
        self.state = State.from_packed(self.layout, self.buffer)  # the step's input, in place
        self.inputs = self.state.tensors()
        self.tokens = torch.full((*batch, 1), PADDING_TOKEN, dtype=torch.long, device=device)
        self.latest: torch.Tensor | None = None  # the copy of the buffer made by the last step

    def step(self, model: SteppingModel) -> torch.Tensor:
        """The forward over the inputs, then the new state written over them; returns the
        logits, (V,) or (rows, V)."""
        logits, new_state = model.step_ids(self.tokens, self.state)
        torch._foreach_copy_(self.inputs, new_state.tensors())
        return logits

    def load(self, tokens: Sequence[int], state: State | None) -> None:
        """Put one token and the state of each of ``len(tokens)`` sequences into the inputs: the
        first rows of a batch's, the rest padding (``state`` None: the zero state)."""
        used = self._rows(len(tokens))
        if state is None:
            used.copy_(self.zero)
        elif state.layout is not self.layout:
            torch._foreach_copy_(State.from_packed(self.layout, used).tensors(), state.tensors())
        elif state.packed is not self.latest:  # else the buffer already holds it
            used.copy_(state.packed)
        if self.rows is None:
            self.tokens.fill_(int(tokens[0]))
        else:
            padded = torch.tensor(padded_tokens(tokens, self.rows)).view_as(self.tokens)
            self.tokens.copy_(padded, non_blocking=True)

    def results(self, logits: torch.Tensor, sequences: int) -> tuple[torch.Tensor, State]:
        """Copies of the logits and the new state of the first ``sequences`` rows (of the one
        sequence, without ``rows``), as ``forward`` or ``forward_batch`` return them."""
        self.latest = self._rows(sequences).clone()
        if self.rows is not None:
            logits = logits[:sequences]
        return logits.clone(), State.from_packed(self.layout, self.latest)

    def _rows(self, sequences: int) -> torch.Tensor:
        """The part of the state buffer that holds ``sequences`` sequences."""
        return self.buffer if self.rows is None else self.buffer[:sequences]


class OneTokenGraph:
    """A model's one-token forward, captured on its GPU: ``graph(tokens, state) -> (logits,
    state)`` as ``model.forward(tokens, state)`` for one token, or with ``rows`` as
    ``model.forward_batch(tokens, state)`` for a batch of up to ``rows`` sequences, with the same
    results."""

    def __init__(self, model: SteppingModel, rows: int | None = None) -> None:
        device = model.device
        self.buffers = StepBuffers(model, rows)
        stream = _capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARM_UP_STEPS):
                self.buffers.step(model)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = self.buffers.step(model)

    def __call__(self, tokens: Sequence[int], state: State | None) -> tuple[torch.Tensor, State]:
        self.buffers.load(tokens, state)
        self.graph.replay()
        return self.buffers.results(self.logits, len(tokens))


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream a graph on ``device`` is warmed up and captured on: the current one, unless
    that is the default stream, on which nothing can be captured (device.use_own_stream)."""
    current = torch.cuda.current_stream(device)
    return current if current != torch.cuda.default_stream(device) else _side_stream(device)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream for every graph captured while the default stream is current: cuBLAS keeps a
    workspace (32 MiB on Hopper) for each stream it runs on."""
    return torch.cuda.Stream(device)


def capture(model: SteppingModel, rows: int | None = None) -> OneTokenGraph | None:
    """The model's one-token graph (for a batch of up to ``rows`` sequences), or None (with a
    warning) if it cannot be captured."""
    try:
        return OneTokenGraph(model, rows)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        what = "decoding" if rows is None else f"decoding batches of up to {rows}"
        warnings.warn(
            f"could not capture a CUDA graph for {what} ({reason}); decoding without one",
            stacklevel=2,
        )
        return None
