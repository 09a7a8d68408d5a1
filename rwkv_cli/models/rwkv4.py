"""RWKV-4, the model of the RWKV paper, in plain torch.

Time mixing is a per-channel WKV: a decaying, key-weighted average of past values, kept
numerically stable by carrying the largest exponent seen (kernels/wkv4.py). The rest of the model
is the frame every generation shares (models/frame.py). Sources: BlinkDL/RWKV-LM ``RWKV-v4neo`` and
the official ``rwkv`` package (docs/DESIGN.md sections 3-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkv_cli.kernels.linear import linear
from rwkv_cli.kernels.wkv4 import INITIAL_MAX, wkv4
from rwkv_cli.loading.checkpoint import layer_count
from rwkv_cli.models.channel_mix import ChannelMixWeights, gated_channel_mix
from rwkv_cli.models.frame import RecurrentModel
from rwkv_cli.models.token_shift import lerp_inputs, previous_tokens
from rwkv_cli.models.validate import tensor_shape
from rwkv_cli.models.weight_groups import WeightGroup

GENERATION = "4"
LABEL = "RWKV-4"


@dataclass(frozen=True)
class RWKV4Config:
    """Dimensions of an RWKV-4 model, all read from tensor shapes."""

    n_layer: int
    n_embd: int
    vocab_size: int
    ffn_size: int

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RWKV4Config:
        vocab_size, n_embd = tensor_shape(tensors, "emb.weight", 2, LABEL)
        return cls(
            n_layer=layer_count(tensors),
            n_embd=n_embd,
            vocab_size=vocab_size,
            ffn_size=tensor_shape(tensors, "blocks.0.ffn.key.weight", 2, LABEL)[0],
        )


@dataclass
class TimeMixWeights(WeightGroup):
    """``blocks.N.att.*``; linear weights are (out, in)."""

    time_mix_k: torch.Tensor
    time_mix_v: torch.Tensor
    time_mix_r: torch.Tensor
    time_decay: torch.Tensor  # (C,) float32; the decay per token is exp(-exp(time_decay))
    time_first: torch.Tensor  # (C,) float32; the current token's weight is exp(time_first + k)
    key_weight: torch.Tensor
    value_weight: torch.Tensor
    receptance_weight: torch.Tensor
    output_weight: torch.Tensor


@dataclass
class LayerState:
    """RWKV-4 state of one layer."""

    att_shift: torch.Tensor  # (C,) last ln1 output, for time mixing's token shift
    att_aa: torch.Tensor  # (C,) float32 WKV numerator, scaled by exp(-pp)
    att_bb: torch.Tensor  # (C,) float32 WKV denominator, scaled by exp(-pp)
    att_pp: torch.Tensor  # (C,) float32 largest exponent so far; -1e30 when empty
    ffn_shift: torch.Tensor  # (C,) last ln2 output, for channel mixing's token shift


class RWKV4(RecurrentModel):
    """An RWKV-4 model ready to run: ``forward(tokens, state) -> (logits, state)``."""

    generation = GENERATION
    time_mix_weights = TimeMixWeights
    channel_mix_weights = ChannelMixWeights
    channel_mix = staticmethod(gated_channel_mix)
    float32_keys = ("att.time_decay", "att.time_first")

    @classmethod
    def read_config(cls, tensors: dict[str, torch.Tensor]) -> RWKV4Config:
        return RWKV4Config.from_tensors(tensors)

    @classmethod
    def expected_shapes(cls, config: RWKV4Config) -> dict[str, tuple[int, ...]]:
        c = config.n_embd
        return {f"att.{name}.weight": (c, c) for name in ("key", "value", "receptance", "output")}

    def new_layer_state(self) -> LayerState:
        c = self.config.n_embd
        return LayerState(
            att_shift=torch.zeros(c, dtype=self.dtype),
            att_aa=torch.zeros(c, dtype=torch.float32),
            att_bb=torch.zeros(c, dtype=torch.float32),
            att_pp=torch.full((c,), INITIAL_MAX, dtype=torch.float32),
            ffn_shift=torch.zeros(c, dtype=self.dtype),
        )

    def time_mix(
        self, att: TimeMixWeights, x: torch.Tensor, state: LayerState, v_first: None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        prev = previous_tokens(x, state.att_shift)
        xk, xv, xr = lerp_inputs(x, prev, (att.time_mix_k, att.time_mix_v, att.time_mix_r))
        r = torch.sigmoid(linear(xr, att.receptance_weight))
        k = linear(xk, att.key_weight)
        v = linear(xv, att.value_weight)
        decay = -torch.exp(att.time_decay)
        y, aa, bb, pp = wkv4(state.att_aa, state.att_bb, state.att_pp, decay, att.time_first, k, v)
        out = linear(r * y.to(x.dtype), att.output_weight)
        return out, {"att_aa": aa, "att_bb": bb, "att_pp": pp}, None
