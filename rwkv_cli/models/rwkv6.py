"""RWKV-6 "Finch" in plain torch.

RWKV-6 is RWKV-5.2 with data-dependent token shift and decay: a small LoRA (``time_maa_w1/w2``)
computes per-token offsets to the five interpolation weights (w, k, v, r, g), and another
(``time_decay_w1/w2``) a per-token offset to the decay. Token mixing is written
``x + (x_prev - x)·μ``. Sources: BlinkDL/RWKV-LM ``RWKV-v5/src/model.py`` (``x060``) and the
official ``rwkv`` package (docs/DESIGN.md sections 3-4).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rwkv_cli.errors import CheckpointError
from rwkv_cli.kernels.linear import linear
from rwkv_cli.kernels.wkv5 import wkv5
from rwkv_cli.models.frame import WkvLayerState
from rwkv_cli.models.rwkv5 import RWKV5, RWKV5Config, wkv_output
from rwkv_cli.models.token_shift import in_front, previous_tokens
from rwkv_cli.models.validate import tensor_shape
from rwkv_cli.models.weight_groups import WeightGroup

GENERATION = "6"
MIXED_INPUTS = 5  # the token-shift LoRA makes offsets for the w, k, v, r, g inputs, in order


@dataclass(frozen=True)
class RWKV6Config(RWKV5Config):
    """Dimensions of an RWKV-6 model: RWKV-5's plus the two LoRA widths."""

    mix_lora: int
    decay_lora: int


@dataclass
class TimeMixWeights(WeightGroup):
    """``blocks.N.att.*``; LoRA matrices are stored (in, out), linear weights (out, in)."""

    time_maa_x: torch.Tensor
    time_maa_w: torch.Tensor
    time_maa_k: torch.Tensor
    time_maa_v: torch.Tensor
    time_maa_r: torch.Tensor
    time_maa_g: torch.Tensor
    time_maa_w1: torch.Tensor  # (C, 5·D)
    time_maa_w2: torch.Tensor  # (5, D, C)
    time_decay: torch.Tensor  # (C,) float32
    time_decay_w1: torch.Tensor  # (C, D_decay)
    time_decay_w2: torch.Tensor  # (D_decay, C)
    time_faaaa: torch.Tensor  # (H, N) float32: the current token's bonus u
    receptance_weight: torch.Tensor
    key_weight: torch.Tensor
    value_weight: torch.Tensor
    gate_weight: torch.Tensor
    output_weight: torch.Tensor
    ln_x_weight: torch.Tensor  # float32
    ln_x_bias: torch.Tensor  # float32

    @functools.cached_property
    def mixes(self) -> torch.Tensor:
        """The five static token-shift mixes stacked (w, k, v, r, g), (5, C)."""
        maa = (self.time_maa_w, self.time_maa_k, self.time_maa_v, self.time_maa_r, self.time_maa_g)
        return torch.stack(maa)


@dataclass
class ChannelMixWeights(WeightGroup):
    """``blocks.N.ffn.*`` of RWKV-6: ``x + (x_prev - x)·μ`` token mixing."""

    time_maa_k: torch.Tensor
    time_maa_r: torch.Tensor
    key_weight: torch.Tensor
    receptance_weight: torch.Tensor
    value_weight: torch.Tensor

    def mixed_inputs(self, x: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(key input, receptance input), each (T, C)."""
        return tuple(torch.lerp(x, prev, mix) for mix in (self.time_maa_k, self.time_maa_r))


class RWKV6(RWKV5):
    """An RWKV-6 model ready to run: ``forward(tokens, state) -> (logits, state)``."""

    generation = GENERATION
    time_mix_weights = TimeMixWeights
    channel_mix_weights = ChannelMixWeights
    has_gate = True
    per_channel_decay = True

    @classmethod
    def read_config(cls, tensors: dict[str, torch.Tensor]) -> RWKV6Config:
        label = cls.label()
        base = RWKV5Config.read_base(tensors, "blocks.0.att.time_faaaa", label)
        mix_width = tensor_shape(tensors, "blocks.0.att.time_maa_w1", 2, label)[1]
        if mix_width % MIXED_INPUTS:
            raise CheckpointError(
                f"corrupt {label} checkpoint: time_maa_w1 width {mix_width} is not 5 LoRAs"
            )
        return RWKV6Config(
            **base,
            mix_lora=mix_width // MIXED_INPUTS,
            decay_lora=tensor_shape(tensors, "blocks.0.att.time_decay_w1", 2, label)[1],
        )

    @classmethod
    def normalize(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors  # every RWKV-6 release stores the bonus as time_faaaa

    @classmethod
    def expected_shapes(cls, config: RWKV6Config) -> dict[str, tuple[int, ...]]:
        c, d, d_decay = config.n_embd, config.mix_lora, config.decay_lora
        return {
            **super().expected_shapes(config),
            "att.time_decay": (c,),
            "att.time_maa_w1": (c, MIXED_INPUTS * d),
            "att.time_maa_w2": (MIXED_INPUTS, d, c),
            "att.time_decay_w1": (c, d_decay),
            "att.time_decay_w2": (d_decay, c),
        }

    def time_mix(
        self, att: TimeMixWeights, x: torch.Tensor, state: WkvLayerState, v_first: None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        h, n = self.config.n_head, self.config.head_size
        delta = previous_tokens(x, state.att_shift) - x  # (..., T, C)
        lora = torch.tanh((x + delta * att.time_maa_x) @ att.time_maa_w1)  # (..., T, 5·D)
        # (5, R, D): one row per token of every sequence
        lora = lora.view(-1, MIXED_INPUTS, self.config.mix_lora).transpose(0, 1)
        offsets = torch.bmm(lora, att.time_maa_w2).view(MIXED_INPUTS, *x.shape)  # (5, ..., T, C)
        xw, xk, xv, xr, xg = torch.addcmul(x, delta, offsets + in_front(att.mixes, x))
        heads = (*x.shape[:-1], h, n)  # (..., T, H, N)
        r = linear(xr, att.receptance_weight).view(heads)
        k = linear(xk, att.key_weight).view(heads)
        v = linear(xv, att.value_weight).view(heads)
        decay_lora = torch.tanh(xw @ att.time_decay_w1) @ att.time_decay_w2  # (T, C)
        decay = torch.exp(-torch.exp(att.time_decay + decay_lora.float()))
        y, wkv = wkv5(state.att_wkv, r, decay.view(heads), k, v, att.time_faaaa)
        return wkv_output(att, y, h, x.dtype, xg), {"att_wkv": wkv}, None
