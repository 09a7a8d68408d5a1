"""Token shift: every generation mixes each token's input with the previous token's."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def previous_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Token shift: row t holds x[t-1], row 0 the last input of the previous call."""
    return torch.cat((shift.unsqueeze(0), x[:-1]))  # (T, C)


def lerp_inputs(
    x: torch.Tensor, prev: torch.Tensor, mixes: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """RWKV-4/5 token mixing ``x·μ + x_prev·(1-μ)`` for each μ in ``mixes``, each (T, C)."""
    return [torch.lerp(prev, x, mix) for mix in mixes]
