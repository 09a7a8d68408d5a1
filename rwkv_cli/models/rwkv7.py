"""RWKV-7 "Goose" in plain torch.

The math follows shared/DESIGN.md section 4 (sources: BlinkDL/RWKV-LM ``RWKV-v7/rwkv_v7_demo.py``
and the official ``rwkv`` package). One code path serves prefill (T tokens, every projection batched
over the chunk) and decode (T = 1); only the WKV recurrence loops over time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_cli.checkpoint import layer_count
from rwkv_cli.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from rwkv_cli.kernels.wkv7 import wkv7
from rwkv_cli.state import State

GENERATION = "7"
GROUP_NORM_EPS = 64e-5  # ln_x epsilon used by every RWKV-7 release (1e-5 times head size 64)
EXP_MINUS_HALF = (
    0.6065306597126334  # exp(-0.5): decay w = exp(-exp(-0.5) * sigmoid(...)) in (0.545, 1)
)


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
        vocab_size, n_embd = _shape(tensors, "emb.weight", 2)
        n_head, head_size = _shape(tensors, "blocks.0.att.r_k", 2)
        return cls(
            n_layer=layer_count(tensors),
            n_embd=n_embd,
            n_head=n_head,
            head_size=head_size,
            vocab_size=vocab_size,
            ffn_size=_shape(tensors, "blocks.0.ffn.key.weight", 2)[0],
            decay_lora=_shape(tensors, "blocks.0.att.w1", 2)[1],
            iclr_lora=_shape(tensors, "blocks.0.att.a1", 2)[1],
            value_lora=_value_lora_width(tensors),
            gate_lora=_shape(tensors, "blocks.0.att.g1", 2)[1],
        )

    def describe(self) -> str:
        return f"RWKV-7 L{self.n_layer} D{self.n_embd}"


def _shape(tensors: dict[str, torch.Tensor], name: str, dims: int) -> tuple[int, ...]:
    if name not in tensors:
        raise CheckpointError(f"incomplete RWKV-7 checkpoint: no {name} tensor")
    shape = tuple(tensors[name].shape)
    if len(shape) != dims:
        raise CheckpointError(f"corrupt RWKV-7 checkpoint: {name} has shape {list(shape)}")
    return shape


def _value_lora_width(tensors: dict[str, torch.Tensor]) -> int:
    """Width of the value-residual LoRA; block 0 may lack it, and a 1-layer model never uses it."""
    for name in ("blocks.0.att.v1", "blocks.1.att.v1"):
        if name in tensors:
            return _shape(tensors, name, 2)[1]
    return 0


def _checkpoint_key(field_name: str) -> str:
    """Map a weight field to its checkpoint suffix: ``ln_x_weight`` -> ``ln_x.weight``."""
    for suffix in ("_weight", "_bias"):
        if field_name.endswith(suffix):
            return field_name[: -len(suffix)] + "." + suffix[1:]
    return field_name


@dataclass
class _Weights:
    """Base for weight groups whose fields are named after checkpoint keys."""

    @classmethod
    def checkpoint_keys(cls) -> list[str]:
        return [_checkpoint_key(field.name) for field in dataclasses.fields(cls)]

    @classmethod
    def take(cls, prepared: dict[str, torch.Tensor], prefix: str):
        """This group's tensors from a prepared dict (``RWKV7.prepare``); absent ones are None."""
        return cls(
            **{
                field.name: prepared.get(prefix + _checkpoint_key(field.name))
                for field in dataclasses.fields(cls)
            }
        )


def _prepare(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Drop the (1, 1, C) broadcast dims of mixing vectors; cast to the compute dtype."""
    if tensor.dim() == 3 and tensor.shape[:2] == (1, 1):
        tensor = tensor.reshape(-1)
    return tensor.to(dtype).contiguous()


@dataclass
class TimeMixWeights(_Weights):
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


@dataclass
class ChannelMixWeights(_Weights):
    """``blocks.N.ffn.*``: RWKV-7's FFN has no receptance gate."""

    x_k: torch.Tensor
    key_weight: torch.Tensor
    value_weight: torch.Tensor


@dataclass
class NormWeights(_Weights):
    """``blocks.N.ln1`` / ``ln2``: the pre-norms of time mixing and channel mixing."""

    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor


@dataclass
class Block:
    norms: NormWeights
    att: TimeMixWeights
    ffn: ChannelMixWeights


@dataclass
class LayerState:
    """RWKV-7 state of one layer."""

    att_shift: torch.Tensor  # (C,) last ln1 output, for time mixing's token shift
    att_wkv: torch.Tensor  # (H, N, N) float32, indexed [head, value, key]
    ffn_shift: torch.Tensor  # (C,) last ln2 output, for channel mixing's token shift


_MODEL_KEYS = {"emb.weight", "head.weight", "ln_out.weight", "ln_out.bias"}
_FIRST_BLOCK_KEYS = {"ln0.weight", "ln0.bias"}
_FIRST_BLOCK_OPTIONAL = {"att.v0", "att.v1", "att.v2"}


def _block_keys() -> set[str]:
    return (
        set(NormWeights.checkpoint_keys())
        | {"att." + key for key in TimeMixWeights.checkpoint_keys()}
        | {"ffn." + key for key in ChannelMixWeights.checkpoint_keys()}
    )


def check_keys(tensors: dict[str, torch.Tensor], n_layer: int) -> None:
    """Refuse checkpoints with missing tensors or tensors this implementation would ignore."""
    block_keys = _block_keys()
    expected = set(_MODEL_KEYS)
    for index in range(n_layer):
        expected |= {f"blocks.{index}.{key}" for key in block_keys}
    expected |= {f"blocks.0.{key}" for key in _FIRST_BLOCK_KEYS}
    optional = {f"blocks.0.{key}" for key in _FIRST_BLOCK_OPTIONAL}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        raise UnsupportedModelError(
            f"unsupported RWKV-7 variant: unexpected tensors {shown}",
            hint="experimental variants (rwkv7a DeepEmbed, rwkv7b) are not supported",
        )
    missing = sorted(expected - optional - set(tensors))
    if missing:
        raise CheckpointError(f"incomplete RWKV-7 checkpoint: missing {missing[0]}")


def check_shapes(tensors: dict[str, torch.Tensor], config: RWKV7Config) -> None:
    """Every tensor must have the shape the dimensions imply; catches corrupt files early."""
    c, f, h, n = config.n_embd, config.ffn_size, config.n_head, config.head_size
    if h * n != c:
        raise CheckpointError(f"corrupt RWKV-7 checkpoint: {h} heads x {n} != n_embd {c}")
    lora = {
        "w": config.decay_lora,
        "a": config.iclr_lora,
        "v": config.value_lora,
        "g": config.gate_lora,
    }
    expected = {
        "emb.weight": (config.vocab_size, c),
        "head.weight": (config.vocab_size, c),
        "att.r_k": (h, n),
        "ffn.key.weight": (f, c),
        "ffn.value.weight": (c, f),
        **{f"att.{name}.weight": (c, c) for name in ("receptance", "key", "value", "output")},
        **{f"att.{kind}1": (c, width) for kind, width in lora.items()},
        **{f"att.{kind}2": (width, c) for kind, width in lora.items()},
    }
    for name, tensor in tensors.items():
        suffix = name.split(".", 2)[2] if name.startswith("blocks.") else name
        want = expected.get(suffix, (c,))
        if _squeezed(tensor.shape) != _squeezed(want):
            raise CheckpointError(
                f"corrupt RWKV-7 checkpoint: {name} has shape {list(tensor.shape)}, "
                f"expected {list(want)}"
            )


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


class RWKV7:
    """An RWKV-7 model ready to run: ``forward(tokens, state) -> (logits, state)``."""

    generation = GENERATION

    def __init__(
        self,
        config: RWKV7Config,
        embedding: torch.Tensor,
        blocks: list[Block],
        ln_out: tuple[torch.Tensor, torch.Tensor],
        head: torch.Tensor,
    ) -> None:
        self.config = config
        self.embedding = embedding  # (V, C), ln0 already applied
        self.blocks = blocks
        self.ln_out = ln_out
        self.head = head  # (V, C)
        self.dtype = embedding.dtype
        self.fingerprint = ""  # set by the loader, which sees the checkpoint's raw tensors

    @staticmethod
    def prepare(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Checkpoint tensors, validated, in the layout the model runs on.

        ln0 is folded into the embedding (and dropped), (1, 1, C) mixing vectors become (C,), and
        everything is cast to ``dtype``. This is what the converted-weights cache stores.
        """
        config = RWKV7Config.from_tensors(tensors)
        check_keys(tensors, config.n_layer)
        check_shapes(tensors, config)
        ln0 = [tensors[name].float() for name in ("blocks.0.ln0.weight", "blocks.0.ln0.bias")]
        prepared = {
            name: _prepare(tensor, dtype)
            for name, tensor in tensors.items()
            if not name.startswith("blocks.0.ln0.")
        }
        embedding = F.layer_norm(tensors["emb.weight"].float(), (config.n_embd,), *ln0)
        prepared["emb.weight"] = embedding.to(dtype)
        return prepared

    @classmethod
    def from_prepared(cls, prepared: dict[str, torch.Tensor]) -> RWKV7:
        """Build the model around prepared tensors without copying them (they may be mmapped)."""
        config = RWKV7Config.from_tensors(prepared)
        blocks = [
            Block(
                norms=NormWeights.take(prepared, f"blocks.{index}."),
                att=TimeMixWeights.take(prepared, f"blocks.{index}.att."),
                ffn=ChannelMixWeights.take(prepared, f"blocks.{index}.ffn."),
            )
            for index in range(config.n_layer)
        ]
        ln_out = (prepared["ln_out.weight"], prepared["ln_out.bias"])
        return cls(config, prepared["emb.weight"], blocks, ln_out, prepared["head.weight"])

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> RWKV7:
        """Build the model from a checkpoint's tensors (validated first)."""
        return cls.from_prepared(cls.prepare(tensors, dtype))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def describe(self) -> str:
        return self.config.describe()

    def new_state(self) -> State:
        """The all-zero state a model starts from."""
        c, h, n = self.config.n_embd, self.config.n_head, self.config.head_size
        layers = [
            LayerState(
                att_shift=torch.zeros(c, dtype=self.dtype),
                att_wkv=torch.zeros(h, n, n, dtype=torch.float32),
                ffn_shift=torch.zeros(c, dtype=self.dtype),
            )
            for _ in range(self.config.n_layer)
        ]
        return State(generation=GENERATION, layers=layers)

    @torch.inference_mode()
    def forward(
        self, tokens: Sequence[int], state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """Consume ``tokens`` after ``state``; return the next-token logits (V,) and the new state.

        The input state is left untouched. Call with one token to decode, many to prefill.
        """
        if not tokens:
            raise ValueError("forward() needs at least one token")
        if max(tokens) >= self.config.vocab_size or min(tokens) < 0:
            raise InvalidInputError(f"token id out of range for vocabulary {self.vocab_size}")
        state = state if state is not None else self.new_state()
        x = self.embedding[torch.as_tensor(tokens)]  # (T, C)
        v_first = None
        new_layers = []
        for block, layer_state in zip(self.blocks, state.layers, strict=True):
            x, new_layer, v_first = self._block(block, x, layer_state, v_first)
            new_layers.append(new_layer)
        x = F.layer_norm(x[-1], (self.config.n_embd,), *self.ln_out)
        logits = F.linear(x, self.head).float()  # (V,)
        return logits, State(generation=GENERATION, layers=new_layers)

    def _block(
        self,
        block: Block,
        x: torch.Tensor,
        state: LayerState,
        v_first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, LayerState, torch.Tensor]:
        size = (self.config.n_embd,)
        normed = F.layer_norm(x, size, block.norms.ln1_weight, block.norms.ln1_bias)
        mixed, wkv, v_first = self._time_mix(block.att, normed, state, v_first)
        x = x + mixed
        att_shift = normed[-1]
        normed = F.layer_norm(x, size, block.norms.ln2_weight, block.norms.ln2_bias)
        x = x + _channel_mix(block.ffn, normed, state.ffn_shift)
        new_state = LayerState(att_shift=att_shift, att_wkv=wkv, ffn_shift=normed[-1])
        return x, new_state, v_first

    def _time_mix(
        self,
        att: TimeMixWeights,
        x: torch.Tensor,
        state: LayerState,
        v_first: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output (T, C), new wkv state, v_first)."""
        t, h, n = x.shape[0], self.config.n_head, self.config.head_size
        delta = _previous(x, state.att_shift) - x  # (T, C)
        xr, xw, xk, xv, xa, xg = (
            x + delta * mix for mix in (att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g)
        )
        r = F.linear(xr, att.receptance_weight)
        k = F.linear(xk, att.key_weight)
        v = F.linear(xv, att.value_weight)
        decay_logit = att.w0 + torch.tanh(xw @ att.w1) @ att.w2
        w = torch.exp(-EXP_MINUS_HALF * torch.sigmoid(decay_logit.float()))
        a = torch.sigmoid(att.a0 + (xa @ att.a1) @ att.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ att.g1) @ att.g2  # output gate

        kappa = F.normalize((k * att.k_k).view(t, h, n), dim=-1)  # removal key, unit per head
        k = k * (1 + (a - 1) * att.k_a)
        if v_first is None:  # first layer: its values feed every later layer's residual
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(att.v0 + (xv @ att.v1) @ att.v2)

        heads = (t, h, n)
        y, wkv = wkv7(
            state.att_wkv,
            r.view(heads),
            w.view(heads),
            k.view(heads),
            v.view(heads),
            kappa,
            a.view(heads),
        )
        y = F.group_norm(
            y.view(t, h * n).to(x.dtype), h, att.ln_x_weight, att.ln_x_bias, eps=GROUP_NORM_EPS
        )
        bonus = (r * k * att.r_k.reshape(-1)).view(heads).sum(-1, keepdim=True) * v.view(heads)
        out = F.linear((y + bonus.view(t, h * n)) * g, att.output_weight)
        return out, wkv, v_first


def _previous(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Token shift: row t holds x[t-1], row 0 the last input of the previous call."""
    return torch.cat((shift.unsqueeze(0), x[:-1]))  # (T, C)


def _channel_mix(ffn: ChannelMixWeights, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    xk = x + (_previous(x, shift) - x) * ffn.x_k
    hidden = torch.relu(F.linear(xk, ffn.key_weight)) ** 2  # (T, F)
    return F.linear(hidden, ffn.value_weight)
