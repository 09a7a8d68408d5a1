"""Token shift: every generation mixes each token's input with the previous token's."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rwkv_cli.kernels.decode import is_decode


def previous_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Token shift: row t holds x[t-1], row 0 the last input of the previous call.

    x is (T, C) with shift (C,), or batched (B, T, C) with shift (B, C). For one token that is
    ``shift`` itself, returned as a view rather than copied.
    """
    if is_decode(x.shape[-2]):
        return shift.unsqueeze(-2)  # (..., 1, C)
    return torch.cat((shift.unsqueeze(-2), x[..., :-1, :]), dim=-2)  # (..., T, C)


def lerp_inputs(
    x: torch.Tensor, prev: torch.Tensor, mixes: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """RWKV-4/5 token mixing ``x·μ + x_prev·(1-μ)`` for each μ in ``mixes``, each (T, C)."""
    return [torch.lerp(prev, x, mix) for mix in mixes]


def in_front(mixes: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Stacked mixes (M, C) shaped to broadcast against x (..., T, C) with M in front."""
    return mixes.view(mixes.shape[0], *(1,) * (x.dim() - 1), mixes.shape[-1])  # (M, 1, ..., C)
