"""RWKV-7 "Goose" in plain torch.

The math follows docs/DESIGN.md section 4 (sources: BlinkDL/RWKV-LM ``RWKV-v7/rwkv_v7_demo.py``
and the official ``rwkv`` package). RWKV-7 runs in the frame all generations share
(``frame.RecurrentModel``); what is its own: the delta-rule time mixing with its LoRAs
(``RWKV7.time_mix``, whose math after the projections is kernels/time_mix7.py), the value
residual ``v_first`` that the first layer produces and every later layer takes, and a channel
mixing without a receptance gate. No fp16 rescaling is needed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from rwkv_cli.errors import CheckpointError
from rwkv_cli.kernels.linear import linear
from rwkv_cli.kernels.time_mix7 import time_mix7
from rwkv_cli.loading.checkpoint import layer_count
from rwkv_cli.models.frame import RecurrentModel, WkvLayerState
from rwkv_cli.models.token_shift import in_front, previous_tokens
from rwkv_cli.models.validate import tensor_shape
from rwkv_cli.models.weight_groups import WeightGroup

GENERATION = "7"
GROUP_NORM_EPS = 64e-5  # ln_x epsilon used by every RWKV-7 release (1e-5 times head size 64)
LABEL = "RWKV-7"


@dataclass(frozen=True)
class RWKV7Config:
    """Dimensions of an RWKV-7 model, all read from tensor shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_size: int
    decay_lora: int
    iclr_lora: int
    value_lora: int
    gate_lora: int

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> RWKV7Config:
        vocab_size, n_embd = tensor_shape(tensors, "emb.weight", 2, LABEL)
        if "blocks.0.att.r_k" not in tensors:
            raise CheckpointError(f"incomplete {LABEL} checkpoint: no blocks.0.att.r_k tensor")
        n_head, head_size = tensors["blocks.0.att.r_k"].shape[-2:]  # (H, N), even when H is 1
        return cls(
            n_layer=layer_count(tensors),
            n_embd=n_embd,
            n_head=n_head,
            head_size=head_size,
            vocab_size=vocab_size,
            ffn_size=tensor_shape(tensors, "blocks.0.ffn.key.weight", 2, LABEL)[0],
            decay_lora=tensor_shape(tensors, "blocks.0.att.w1", 2, LABEL)[1],
            iclr_lora=tensor_shape(tensors, "blocks.0.att.a1", 2, LABEL)[1],
            value_lora=_value_lora_width(tensors),
            gate_lora=tensor_shape(tensors, "blocks.0.att.g1", 2, LABEL)[1],
        )

    def describe(self) -> str:
        return f"{LABEL} L{self.n_layer} D{self.n_embd}"


def _value_lora_width(tensors: dict[str, torch.Tensor]) -> int:
    """Width of the value-residual LoRA; block 0 may lack it, and a 1-layer model never uses it."""
    for name in ("blocks.0.att.v1", "blocks.1.att.v1"):
        if name in tensors:
            return tensor_shape(tensors, name, 2, LABEL)[1]
    return 0


@dataclass
class TimeMixWeights(WeightGroup):
    """``blocks.N.att.*``; LoRA matrices are stored (in, out), linear weights (out, in)."""

    x_r: torch.Tensor
    x_w: torch.Tensor
    x_k: torch.Tensor
    x_v: torch.Tensor
    x_a: torch.Tensor
    x_g: torch.Tensor
    w0: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    a0: torch.Tensor
    a1: torch.Tensor
    a2: torch.Tensor
    v0: torch.Tensor | None  # the value-residual LoRA is unused (and may be absent) in block 0
    v1: torch.Tensor | None
    v2: torch.Tensor | None
    g1: torch.Tensor
    g2: torch.Tensor
    k_k: torch.Tensor
    k_a: torch.Tensor
    r_k: torch.Tensor
    receptance_weight: torch.Tensor
    key_weight: torch.Tensor
    value_weight: torch.Tensor
    output_weight: torch.Tensor
    ln_x_weight: torch.Tensor
    ln_x_bias: torch.Tensor

    @functools.cached_property
    def mixes(self) -> torch.Tensor:
        """The six token-shift mixes stacked (r, w, k, v, a, g), (6, C): one op mixes all."""
        return torch.stack((self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))


@dataclass
class ChannelMixWeights(WeightGroup):
    """``blocks.N.ffn.*``: RWKV-7's FFN has no receptance gate."""

    x_k: torch.Tensor
    key_weight: torch.Tensor
    value_weight: torch.Tensor


class RWKV7(RecurrentModel):
    """An RWKV-7 model ready to run: ``forward(tokens, state) -> (logits, state)``."""

    generation = GENERATION
    time_mix_weights = TimeMixWeights
    channel_mix_weights = ChannelMixWeights
    rescales_in_fp16 = False
    optional_keys = frozenset(f"blocks.0.att.{name}" for name in ("v0", "v1", "v2"))
    variant_hint = "experimental variants (rwkv7a DeepEmbed, rwkv7b) are not supported"

    @classmethod
    def read_config(cls, tensors: dict[str, torch.Tensor]) -> RWKV7Config:
        return RWKV7Config.from_tensors(tensors)

    @classmethod
    def expected_shapes(cls, config: RWKV7Config) -> dict[str, tuple[int, ...]]:
        c, h, n = config.n_embd, config.n_head, config.head_size
        lora = {
            "w": config.decay_lora,
            "a": config.iclr_lora,
            "v": config.value_lora,
            "g": config.gate_lora,
        }
        return {
            "att.r_k": (h, n),
            **{f"att.{name}.weight": (c, c) for name in ("receptance", "key", "value", "output")},
            **{f"att.{kind}1": (c, width) for kind, width in lora.items()},
            **{f"att.{kind}2": (width, c) for kind, width in lora.items()},
        }

    @classmethod
    def prepare(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
        config = cls.read_config(tensors)
        if config.n_head * config.head_size != config.n_embd:
            raise CheckpointError(
                f"corrupt {LABEL} checkpoint: {config.n_head} heads x {config.head_size} "
                f"!= n_embd {config.n_embd}"
            )
        return super().prepare(tensors, dtype)

    def new_layer_state(self) -> WkvLayerState:
        return WkvLayerState.zeros(self.config, self.dtype)

    def time_mix(
        self,
        att: TimeMixWeights,
        x: torch.Tensor,
        state: WkvLayerState,
        v_first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Time mixing of the ln1-normed (T, C) input: the output (T, C), the new WKV state and
        ``v_first``.

        Here: token shift, the projections and the low-rank adapters. From there to the output
        projection (decay, in-context learning rate, removal key, value residual, the recurrence,
        ln_x, bonus, gate) is one op, ``time_mix7`` (kernels/time_mix7.py), which takes the
        one-token path of kernels/decode.py.

        The first layer is called with ``v_first`` None: its values (T, C) become ``v_first``,
        which it returns. Every later layer takes them, mixes them into its own values (the value
        residual) and returns them unchanged.
        """
        delta = previous_tokens(x, state.att_shift) - x  # (T, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, delta, in_front(att.mixes, x))  # 6 x (T, C)
        r = linear(xr, att.receptance_weight)
        k = linear(xk, att.key_weight)
        v = linear(xv, att.value_weight)
        gate = torch.sigmoid(xg @ att.g1) @ att.g2
        decay_lora = torch.tanh(xw @ att.w1) @ att.w2
        iclr_lora = (xa @ att.a1) @ att.a2  # in-context learning rate
        if v_first is None:  # the first layer
            v_first, value_residual = v, {}
        else:
            value_gate_lora = (xv @ att.v1) @ att.v2
            value_residual = {"v_first": v_first, "value_gate_lora": value_gate_lora, "v0": att.v0}
        mixed, wkv = time_mix7(
            state.att_wkv,
            r,
            k,
            v,
            gate,
            decay_lora,
            iclr_lora,
            w0=att.w0,
            a0=att.a0,
            k_k=att.k_k,
            k_a=att.k_a,
            r_k=att.r_k,
            ln_x_weight=att.ln_x_weight,
            ln_x_bias=att.ln_x_bias,
            eps=GROUP_NORM_EPS,
            **value_residual,
        )
        return linear(mixed, att.output_weight), {"att_wkv": wkv}, v_first

    def channel_mix(self, ffn: ChannelMixWeights, x: torch.Tensor, shift: torch.Tensor):
        xk = torch.addcmul(x, previous_tokens(x, shift) - x, ffn.x_k)
        hidden = torch.relu(linear(xk, ffn.key_weight)) ** 2  # (T, F)
        return linear(hidden, ffn.value_weight)
