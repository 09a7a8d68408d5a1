"""A running batch: sequences that decode together, one token each per step.

RWKV decodes by reading every weight once per token; B sequences stepping together read them
once for all B (docs/DESIGN.md section 6). A :class:`Batch` holds the states of its sequences
stacked (batching/states.py) and steps them with the model's ``forward_batch``. Sequences join
(``add``) and leave (``remove``) between steps, each as a plain :class:`Session`: one taken out
saves to a state file, and resumes alone or in another batch, exactly as it would have gone on
here (up to the float rounding of a batched matrix product, see ``step``).

A batch of one steps through the model's own one-sequence ``forward`` (its compiled one-token
kernels), so a sequence alone in a batch runs exactly as it would outside one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from rwkv_cli.batching.states import append_row, as_batch, state_row, take_rows
from rwkv_cli.generation import Session
from rwkv_cli.models import Model
from rwkv_cli.state import State


class Batch:
    """Sequences stepped together by one model.

    Each sequence has a slot, an id that ``add`` hands out and that stays its own until
    ``remove``; ``slots`` lists them in row order (the order of ``step``'s logits). A batch keeps
    each sequence's state, last logits and token count; penalty counts are a sampler's, and pass
    through unchanged.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._slots: list[int] = []
        self._next_slot = 0
        self._state: State | None = None  # batched: one row per slot
        self._logits: list[torch.Tensor | None] = []
        self._counts: list[torch.Tensor | None] = []
        self._consumed: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def slots(self) -> list[int]:
        """The slots of the sequences in the batch, in row order."""
        return list(self._slots)

    def add(self, session: Session) -> int:
        """Put ``session``'s sequence into the batch; return its slot."""
        state = session.state if session.state is not None else self.model.new_state()
        state = state.to(self.model.device)
        if self._state is None:
            self._state = as_batch(state)
        else:
            self._state = append_row(self._state, state)
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        self._slots.append(slot)
        self._logits.append(session.logits)
        self._counts.append(session.counts)
        self._consumed.append(session.tokens_consumed)
        return slot

    def session(self, slot: int) -> Session:
        """Where ``slot``'s sequence stands now. Its state is a view into the batch: it stays
        valid (steps make new tensors), and keeps the batch's state alive while referenced."""
        row = self._row(slot)
        state = state_row(self._state, row)
        return Session(state, self._logits[row], self._counts[row], self._consumed[row])

    def remove(self, slot: int) -> Session:
        """Take ``slot``'s sequence out of the batch, as a session with its own tensors."""
        session = self.session(slot)
        row = self._row(slot)
        rest = [index for index in range(len(self._slots)) if index != row]
        self._state = take_rows(self._state, rest) if rest else None
        for column in (self._slots, self._logits, self._counts, self._consumed):
            del column[row]
        logits = None if session.logits is None else session.logits.clone()
        return Session(session.state.clone(), logits, session.counts, session.tokens_consumed)

    def step(self, tokens: Mapping[int, int]) -> torch.Tensor:
        """Feed each sequence its next token, ``tokens[slot]`` (every slot needs one), and
        return the next-token logits (B, V), rows in ``slots`` order.

        With two or more sequences a row's logits equal those of the sequence's own ``forward``
        up to float rounding (relative error of order 1e-7 in float32): the compiled CPU kernels
        give each row its own bits, but matrix products over B rows (RWKV-6's and 7's low-rank
        adapters; projections on a GPU or of more than 16 rows) sum in another order.
        """
        if not self._slots or set(tokens) != set(self._slots):
            raise ValueError(
                f"a step takes one token for every slot: got {sorted(tokens)}, "
                f"slots are {sorted(self._slots)}"
            )
        ordered = [tokens[slot] for slot in self._slots]
        if len(ordered) == 1:  # alone: the one-sequence path and its compiled kernels
            logits, state = self.model.forward(ordered, state_row(self._state, 0))
            logits, self._state = logits.unsqueeze(0), as_batch(state)
        else:
            logits, self._state = self.model.forward_batch(ordered, self._state)
        self._logits = list(logits)
        self._consumed = [consumed + 1 for consumed in self._consumed]
        return logits

    def _row(self, slot: int) -> int:
        try:
            return self._slots.index(slot)
        except ValueError:
            raise KeyError(f"no sequence in slot {slot}") from None
