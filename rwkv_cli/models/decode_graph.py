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

Graphs are captured on the current stream, which commands make a stream of their own
(device.use_own_stream), or else on a side stream: never on the default stream, where capture
is impossible. ``RWKV_CLI_CUDA_GRAPHS=0`` turns graphs off; a capture that fails warns once
and the model runs without one.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Protocol

import torch

from rwkv_cli.state import State, StateLayout

ENVIRONMENT_SWITCH = "RWKV_CLI_CUDA_GRAPHS"
WARM_UP_STEPS = 2  # before capture: loads kernels and sets up cuBLAS outside the graph


def graphs_enabled(device: torch.device) -> bool:
    """Whether one-token steps on ``device`` should run as CUDA graphs."""
    return device.type == "cuda" and os.environ.get(ENVIRONMENT_SWITCH, "1") != "0"


class SteppingModel(Protocol):
    """What a graph needs of a model (models/frame.py's RecurrentModel has it)."""

    @property
    def device(self) -> torch.device: ...

    def new_state(self) -> State: ...

    def step_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]: ...


class OneTokenGraph:
    """A model's one-token forward, captured on its GPU: ``graph(token, state) -> (logits,
    state)`` as ``model.forward([token], state)``, with the same results."""

    def __init__(self, model: SteppingModel) -> None:
        device = model.device
        zero_state = model.new_state()
        self.layout = StateLayout.of(zero_state)
        self.buffer = self.layout.new_buffer(device)
        self.state = State.from_packed(self.layout, self.buffer)  # the step's input, in place
        self.inputs = self.state.tensors()
        torch._foreach_copy_(self.inputs, zero_state.tensors())
        self.zero = self.buffer.clone()
        self.token = torch.zeros(1, dtype=torch.long, device=device)
        self.latest: torch.Tensor | None = None  # the copy of the buffer made by the last step

        stream = _capture_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(WARM_UP_STEPS):
                self._step(model)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.logits = self._step(model)

    def _step(self, model: SteppingModel) -> torch.Tensor:
        """What the graph records: the forward, then the new state written over the input."""
        logits, new_state = model.step_ids(self.token, self.state)
        torch._foreach_copy_(self.inputs, new_state.tensors())
        return logits

    def __call__(self, token: int, state: State | None) -> tuple[torch.Tensor, State]:
        if state is None:
            self.buffer.copy_(self.zero)
        elif state.layout is not self.layout:
            torch._foreach_copy_(self.inputs, state.tensors())
        elif state.packed is not self.latest:  # else the buffer already holds it
            self.buffer.copy_(state.packed)
        self.token.fill_(token)
        self.graph.replay()
        self.latest = self.buffer.clone()
        return self.logits.clone(), State.from_packed(self.layout, self.latest)


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


def capture(model: SteppingModel) -> OneTokenGraph | None:
    """The model's one-token graph, or None (with a warning) if it cannot be captured."""
    try:
        return OneTokenGraph(model)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"could not capture a CUDA graph for decoding ({reason}); decoding without one",
            stacklevel=2,
        )
        return None
