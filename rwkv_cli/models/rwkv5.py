"""RWKV-5 "Eagle" (5.0, 5.1 and 5.2) in plain torch.

Time mixing is multi-head linear attention with a matrix-valued state per head and a fixed
per-channel decay (kernels/wkv5.py), followed by a GroupNorm (``ln_x``). The three releases
differ only in data, so one class serves them all, with a subclass per release:

- 5.0: decay and bonus per head, the bonus stored as ``time_first`` (its log), no gate;
- 5.1: adds the output gate ``silu(gate · x_g)`` (``gate.weight``, ``time_mix_g``);
- 5.2: decay and bonus (``time_faaaa``) per channel, shaped (H, N).

Sources: BlinkDL/RWKV-LM ``RWKV-v5/src/model.py`` and the official ``rwkv`` package
(docs/DESIGN.md sections 3-4). The rest of the model is the frame every generation shares
(models/frame.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_cli.errors import CheckpointError
from rwkv_cli.kernels.linear import linear
from rwkv_cli.kernels.wkv5 import wkv5
from rwkv_cli.loading.checkpoint import layer_count
from rwkv_cli.models.channel_mix import ChannelMixWeights, gated_channel_mix
from rwkv_cli.models.frame import RecurrentModel, WkvLayerState
from rwkv_cli.models.token_shift import lerp_inputs, previous_tokens
from rwkv_cli.models.validate import tensor_shape
from rwkv_cli.models.weight_groups import WeightGroup

GROUP_NORM_EPS = 64e-5  # ln_x epsilon of RWKV-5 to 7: training's 1e-5 on x / 8, i.e. 64e-5 on x
_GATE_KEYS = ("att.time_mix_g", "att.gate.weight")


@dataclass(frozen=True)
class RWKV5Config:
    """Dimensions of an RWKV-5 or RWKV-6 model, all read from tensor shapes."""

    n_layer: int
    n_embd: int
    n_head: int
    head_size: int
    vocab_size: int
    ffn_size: int

    @staticmethod
    def read_base(tensors: dict[str, torch.Tensor], head_key: str, label: str) -> dict[str, int]:
        """The dimensions every matrix-state generation has; heads from ``head_key``'s rows."""
        vocab_size, n_embd = tensor_shape(tensors, "emb.weight", 2, label)
        if head_key not in tensors or tensors[head_key].dim() == 0:
            raise CheckpointError(f"incomplete {label} checkpoint: no {head_key} tensor")
        n_head = tensors[head_key].shape[0]
        if n_head == 0 or n_embd % n_head:
            raise CheckpointError(
                f"corrupt {label} checkpoint: {n_head} heads do not divide n_embd {n_embd}"
            )
        return {
            "n_layer": layer_count(tensors),
            "n_embd": n_embd,
            "n_head": n_head,
            "head_size": n_embd // n_head,
            "vocab_size": vocab_size,
            "ffn_size": tensor_shape(tensors, "blocks.0.ffn.key.weight", 2, label)[0],
        }


@dataclass
class TimeMixWeights(WeightGroup):
    """``blocks.N.att.*``; linear weights are (out, in). 5.0 has no gate."""

    time_mix_k: torch.Tensor
    time_mix_v: torch.Tensor
    time_mix_r: torch.Tensor
    time_mix_g: torch.Tensor | None
    time_decay: torch.Tensor  # float32, (H,) or (H, N); the decay is exp(-exp(time_decay))
    time_faaaa: torch.Tensor  # float32, (H,) or (H, N): the current token's bonus u
    key_weight: torch.Tensor
    value_weight: torch.Tensor
    receptance_weight: torch.Tensor
    gate_weight: torch.Tensor | None
    output_weight: torch.Tensor
    ln_x_weight: torch.Tensor  # float32
    ln_x_bias: torch.Tensor  # float32


def wkv_output(
    att: WeightGroup, y: torch.Tensor, n_head: int, dtype: torch.dtype, xg: torch.Tensor | None
) -> torch.Tensor:
    """GroupNorm per head (``ln_x``), the optional gate ``silu(gate · xg)``, then ``output``.

    ``y`` is the (T, H, N) float32 WKV output; returns (T, C) in ``dtype`` (batched: (B, T, ...)).
    """
    rows = y.flatten(-2)  # (..., T, C)
    # GroupNorm takes (rows, C): one row per token of every sequence.
    y = F.group_norm(
        rows.reshape(-1, rows.shape[-1]),
        n_head,
        att.ln_x_weight,
        att.ln_x_bias,
        eps=GROUP_NORM_EPS,
    )
    y = y.view(rows.shape).to(dtype)
    if xg is not None:
        y = y * F.silu(linear(xg, att.gate_weight))
    return linear(y, att.output_weight)


class RWKV5(RecurrentModel):
    """An RWKV-5 model ready to run; use the subclass of its release (5.0, 5.1, 5.2)."""

    time_mix_weights = TimeMixWeights
    channel_mix_weights = ChannelMixWeights
    channel_mix = staticmethod(gated_channel_mix)
    float32_keys = ("att.time_decay", "att.time_faaaa", "att.ln_x.weight", "att.ln_x.bias")
    has_gate: bool
    per_channel_decay: bool

    @classmethod
    def read_config(cls, tensors: dict[str, torch.Tensor]) -> RWKV5Config:
        return RWKV5Config(**RWKV5Config.read_base(tensors, "blocks.0.att.time_decay", cls.label()))

    @classmethod
    def block_keys(cls) -> list[str]:
        keys = super().block_keys()
        return keys if cls.has_gate else [key for key in keys if key not in _GATE_KEYS]

    @classmethod
    def normalize(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Early releases store the bonus as its log, ``time_first``; use ``u = exp`` of it."""
        normalized = {}
        for name, tensor in tensors.items():
            bonus_name = name.removesuffix(".att.time_first") + ".att.time_faaaa"
            if name.endswith(".att.time_first") and bonus_name not in tensors:
                normalized[bonus_name] = torch.exp(tensor.float())
            else:
                normalized[name] = tensor
        return normalized

    @classmethod
    def expected_shapes(cls, config: RWKV5Config) -> dict[str, tuple[int, ...]]:
        c, h, n = config.n_embd, config.n_head, config.head_size
        decay = (h, n) if cls.per_channel_decay else (h,)
        linear = ("key", "value", "receptance", "output", "gate")
        return {
            "att.time_decay": decay,
            "att.time_faaaa": decay,
            **{f"att.{name}.weight": (c, c) for name in linear},
        }

    def new_layer_state(self) -> WkvLayerState:
        return WkvLayerState.zeros(self.config, self.dtype)

    def time_mix(
        self, att: TimeMixWeights, x: torch.Tensor, state: WkvLayerState, v_first: None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], None]:
        h, n = self.config.n_head, self.config.head_size
        mixes = (att.time_mix_k, att.time_mix_v, att.time_mix_r)
        if self.has_gate:
            mixes += (att.time_mix_g,)
        xk, xv, xr, *gate_input = lerp_inputs(x, previous_tokens(x, state.att_shift), mixes)
        heads = (*x.shape[:-1], h, n)  # (..., T, H, N)
        r = linear(xr, att.receptance_weight).view(heads)
        k = linear(xk, att.key_weight).view(heads)
        v = linear(xv, att.value_weight).view(heads)
        # (H,) per head or (H, N) per channel -> (H, N)
        decay = torch.exp(-torch.exp(att.time_decay)).reshape(h, -1).expand(h, n)
        bonus = att.time_faaaa.reshape(h, -1).expand(h, n)
        y, wkv = wkv5(state.att_wkv, r, decay.expand(heads), k, v, bonus)
        xg = gate_input[0] if gate_input else None
        return wkv_output(att, y, h, x.dtype, xg), {"att_wkv": wkv}, None


# Named after the release numbers, RWKV5_0 is RWKV-5.0.
class RWKV5_0(RWKV5):
    """RWKV-5.0: per-head decay and bonus, no gate."""

    generation = "5.0"
    has_gate = False
    per_channel_decay = False


class RWKV5_1(RWKV5):
    """RWKV-5.1: 5.0 plus the output gate."""

    generation = "5.1"
    has_gate = True
    per_channel_decay = False


class RWKV5_2(RWKV5):
    """RWKV-5.2: gate, and decay and bonus per channel."""

    generation = "5.2"
    has_gate = True
    per_channel_decay = True
