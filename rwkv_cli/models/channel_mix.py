"""The channel mixing of RWKV-4, 5 and 6: ``σ(R·xr) ⊙ V·relu(K·xk)²`` (RWKV-6 mixes its inputs
from the previous token its own way; RWKV-7 has no receptance gate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rwkv_cli.kernels.linear import linear
from rwkv_cli.models.token_shift import lerp_inputs, previous_tokens
from rwkv_cli.models.weight_groups import WeightGroup


@dataclass
class ChannelMixWeights(WeightGroup):
    """``blocks.N.ffn.*`` of RWKV-4 and 5: ``x·μ + x_prev·(1-μ)`` token mixing."""

    time_mix_k: torch.Tensor
    time_mix_r: torch.Tensor
    key_weight: torch.Tensor
    receptance_weight: torch.Tensor
    value_weight: torch.Tensor

    def mixed_inputs(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(key input, receptance input), each (T, C)."""
        return tuple(lerp_inputs(x, prev, (self.time_mix_k, self.time_mix_r)))


def gated_channel_mix(ffn: Any, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RWKV-4/5/6 channel mixing of the ln2-normed (T, C) input: ``σ(R·xr) ⊙ V·relu(K·xk)²``;
    ``ffn`` mixes the inputs (``mixed_inputs``)."""
    xk, xr = ffn.mixed_inputs(x, previous_tokens(x, shift))
    hidden = torch.relu(linear(xk, ffn.key_weight)) ** 2  # (T, F)
    return torch.sigmoid(linear(xr, ffn.receptance_weight)) * linear(hidden, ffn.value_weight)
