"""RWKV-7 "Goose" in plain torch.

The math follows shared/DESIGN.md section 4 (sources: BlinkDL/RWKV-LM ``RWKV-v7/rwkv_v7_demo.py``
and the official ``rwkv`` package). RWKV-7 runs in the frame all generations share
(``common.RecurrentModel``); what is its own: the delta-rule time mixing with its LoRAs, the
value residual from layer 0 (passed between layers within one forward), and a channel mixing
without a receptance gate. No fp16 rescaling is needed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_cli.errors import CheckpointError
from rwkv_cli.kernels import cpu_ops
from rwkv_cli.kernels.linear import linear
from rwkv_cli.kernels.wkv7 import wkv7
from rwkv_cli.loading.checkpoint import layer_count
from rwkv_cli.models.common import (
    RecurrentModel,
    WeightGroup,
    WkvLayerState,
    previous_tokens,
    tensor_shape,
)

GENERATION = "7"
GROUP_NORM_EPS = 64e-5  # ln_x epsilon used by every RWKV-7 release (1e-5 times head size 64)
EXP_MINUS_HALF = (
    0.6065306597126334  # exp(-0.5): decay w = exp(-exp(-0.5) * sigmoid(...)) in (0.545, 1)
)
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


@dataclass(frozen=True)
class MixInputs:
    """What time mixing computes from one layer's input before the recurrence: the projections
    (T, C), the low-rank adapters' outputs before their biases, and the first layer's values."""

    r: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor  # the output gate
    decay: torch.Tensor
    iclr: torch.Tensor  # in-context learning rate
    value_gate: torch.Tensor | None  # None in layer 0, whose values are not mixed
    v_first: torch.Tensor


def _fused_ops(x: torch.Tensor) -> cpu_ops.CpuKernels | None:
    """The compiled kernels when one float32 token on the CPU can take the fused step, else
    None."""
    if x.shape[0] != 1 or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if torch.is_grad_enabled():
        return None
    return cpu_ops.kernels()


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
        self, att: TimeMixWeights, x: torch.Tensor, state: WkvLayerState, carry: dict
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        delta = previous_tokens(x, state.att_shift) - x  # (T, C)
        xr, xw, xk, xv, xa, xg = torch.addcmul(x, delta, att.mixes.unsqueeze(1))  # 6 x (T, C)
        v = linear(xv, att.value_weight)
        carry.setdefault("v_first", v)  # the first layer's values feed every later layer
        inputs = MixInputs(
            r=linear(xr, att.receptance_weight),
            k=linear(xk, att.key_weight),
            v=v,
            g=torch.sigmoid(xg @ att.g1) @ att.g2,
            decay=torch.tanh(xw @ att.w1) @ att.w2,
            iclr=(xa @ att.a1) @ att.a2,
            value_gate=None if carry["v_first"] is v else (xv @ att.v1) @ att.v2,
            v_first=carry["v_first"],
        )
        ops = _fused_ops(x)
        mix = mix_projections if ops is None else functools.partial(mix_projections_compiled, ops)
        mixed, wkv = mix(att, state.att_wkv, inputs)
        return linear(mixed, att.output_weight), {"att_wkv": wkv}

    def channel_mix(self, ffn: ChannelMixWeights, x: torch.Tensor, shift: torch.Tensor):
        xk = x + (previous_tokens(x, shift) - x) * ffn.x_k
        hidden = torch.relu(linear(xk, ffn.key_weight)) ** 2  # (T, F)
        return linear(hidden, ffn.value_weight)


def mix_projections(
    att: TimeMixWeights, wkv_state: torch.Tensor, inputs: MixInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time mixing from the projections to the output projection's input (T, C), and the new
    (H, N, N) WKV state: decay, in-context learning rate, removal key, value residual, the
    recurrence, ln_x and the current token's bonus, all gated."""
    r, k, v = inputs.r, inputs.k, inputs.v
    t, (h, n) = r.shape[0], wkv_state.shape[:2]
    w = torch.exp(-EXP_MINUS_HALF * torch.sigmoid((att.w0 + inputs.decay).float()))
    a = torch.sigmoid(att.a0 + inputs.iclr)  # in-context learning rate
    kappa = F.normalize((k * att.k_k).view(t, h, n), dim=-1)  # removal key, unit per head
    k = k * (1 + (a - 1) * att.k_a)
    if inputs.value_gate is not None:
        v = v + (inputs.v_first - v) * torch.sigmoid(att.v0 + inputs.value_gate)

    heads = (t, h, n)
    y, wkv = wkv7(
        wkv_state,
        r.view(heads),
        w.view(heads),
        k.view(heads),
        v.view(heads),
        kappa,
        a.view(heads),
    )
    y = F.group_norm(
        y.view(t, h * n).to(r.dtype), h, att.ln_x_weight, att.ln_x_bias, eps=GROUP_NORM_EPS
    )
    bonus = (r * k * att.r_k.reshape(-1)).view(heads).sum(-1, keepdim=True) * v.view(heads)
    return (y + bonus.view(t, h * n)) * inputs.g, wkv


def mix_projections_compiled(
    ops: cpu_ops.CpuKernels, att: TimeMixWeights, wkv_state: torch.Tensor, inputs: MixInputs
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mix_projections`` for one float32 token on the CPU, as one compiled operation."""
    vectors = {
        "r": inputs.r,
        "k": inputs.k,
        "v": inputs.v,
        "decay_lora": inputs.decay,
        "iclr_lora": inputs.iclr,
        "gate": inputs.g,
        "w0": att.w0,
        "a0": att.a0,
        "k_k": att.k_k,
        "k_a": att.k_a,
        "r_k": att.r_k.reshape(-1),
        "ln_weight": att.ln_x_weight,
        "ln_bias": att.ln_x_bias,
    }
    value_mix = (  # layer 0 mixes no first-layer values into its own
        None if inputs.value_gate is None else (inputs.value_gate, inputs.v_first, att.v0)
    )
    mixed, wkv = ops.rwkv7_time_mix_one(wkv_state, vectors, value_mix, GROUP_NORM_EPS)
    return mixed.unsqueeze(0), wkv
