"""What the RWKV generations share: weight groups named after checkpoint keys, checkpoint
validation, token shift, and the model frame of RWKV-4, 5 and 6.

RWKV-4, 5 and 6 differ only in their time mixing (and v6 in how channel mixing interpolates with
the previous token). Everything around it is the same, and lives in :class:`RecurrentModel`:
ln0 folded into the embedding, pre-norm residual blocks (ln1 -> time mixing, ln2 -> channel
mixing with a receptance gate), ln_out and the head, and the fp16 rescaling of the official
package. A generation module supplies its config, weight groups, per-layer state and time mixing.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rwkv_cli.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from rwkv_cli.kernels.build import kernel_choice
from rwkv_cli.kernels.linear import QuantizedMatrix, Weight, linear, quantize_int8
from rwkv_cli.loading.checkpoint import GENERATION_NAMES
from rwkv_cli.models import decode_graph
from rwkv_cli.state import State

# fp16 tops out at 65504, and the residual stream of RWKV-4/5/6 grows layer after layer, so a
# deep model overflows in fp16. So in fp16, like the official package, the residual is halved
# after every 6th layer and the weights that write into it (att.output and ffn.value of layer i)
# are divided by 2 ** (i // 6) to match. Every read of the residual goes through a LayerNorm, which
# does not see the scale, so the logits are unchanged up to rounding.
RESCALE_LAYER = 6
_RESCALED_WEIGHTS = ("att.output.weight", "ffn.value.weight")
# Projection matrices, kept (out, in) as checkpoints store them, are the bulk of the weights: they
# alone take the weight format asked for (float32, 16-bit or int8; see kernels/linear.py).
_PROJECTIONS = ("receptance.weight", "key.weight", "value.weight", "output.weight", "gate.weight")
SCALE_SUFFIX = ".scale"  # an int8 projection's per-row scales are stored under its name + this

MERGED_STATE_HINT = (
    "this model has a state-tuning state merged in: pass the base model, and the time_state "
    "tensors as a file of their own with --state"
)
MODEL_KEYS = frozenset({"emb.weight", "head.weight", "ln_out.weight", "ln_out.bias"})
FIRST_BLOCK_KEYS = frozenset({"ln0.weight", "ln0.bias"})  # block 0's extra LayerNorm, folded


def is_projection(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` is a projection matrix (or the head)."""
    return name == "head.weight" or name.endswith(_PROJECTIONS)


def checkpoint_key(field_name: str) -> str:
    """Map a weight field to its checkpoint suffix: ``ln_x_weight`` -> ``ln_x.weight``."""
    for suffix in ("_weight", "_bias"):
        if field_name.endswith(suffix):
            return field_name[: -len(suffix)] + "." + suffix[1:]
    return field_name


@dataclass
class WeightGroup:
    """Base for weight groups whose fields are named after checkpoint keys."""

    @classmethod
    def checkpoint_keys(cls) -> list[str]:
        return [checkpoint_key(field.name) for field in dataclasses.fields(cls)]

    @classmethod
    def take(cls, prepared: dict[str, torch.Tensor], prefix: str):
        """This group's tensors from a prepared dict; absent ones are None."""
        return cls(
            **{
                field.name: prepared_weight(prepared, prefix + checkpoint_key(field.name))
                for field in dataclasses.fields(cls)
            }
        )


def prepared_weight(prepared: dict[str, torch.Tensor], name: str) -> Weight | None:
    """The tensor ``name`` of a prepared dict, as a QuantizedMatrix if it has int8 scales."""
    scale = prepared.get(name + SCALE_SUFFIX)
    if scale is not None:
        return QuantizedMatrix(prepared[name], scale)
    return prepared.get(name)


@dataclass
class NormWeights(WeightGroup):
    """``blocks.N.ln1`` / ``ln2``: the pre-norms of time mixing and channel mixing."""

    ln1_weight: torch.Tensor
    ln1_bias: torch.Tensor
    ln2_weight: torch.Tensor
    ln2_bias: torch.Tensor


@dataclass
class WkvLayerState:
    """State of one layer of a model with a matrix-valued WKV state (RWKV-5, 6 and 7)."""

    att_shift: torch.Tensor  # (C,) last ln1 output, for time mixing's token shift
    att_wkv: torch.Tensor  # (H, N, N) float32, indexed [head, value, key]
    ffn_shift: torch.Tensor  # (C,) last ln2 output, for channel mixing's token shift

    @classmethod
    def zeros(cls, config: Any, dtype: torch.dtype) -> WkvLayerState:
        """The empty state of one layer: shifts in the model's dtype, the WKV state float32."""
        c, h, n = config.n_embd, config.n_head, config.head_size
        return cls(
            att_shift=torch.zeros(c, dtype=dtype),
            att_wkv=torch.zeros(h, n, n, dtype=torch.float32),
            ffn_shift=torch.zeros(c, dtype=dtype),
        )


def previous_tokens(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Token shift: row t holds x[t-1], row 0 the last input of the previous call."""
    return torch.cat((shift.unsqueeze(0), x[:-1]))  # (T, C)


def lerp_inputs(
    x: torch.Tensor, prev: torch.Tensor, mixes: Iterable[torch.Tensor]
) -> list[torch.Tensor]:
    """RWKV-4/5 token mixing ``x·μ + x_prev·(1-μ)`` for each μ in ``mixes``, each (T, C)."""
    return [torch.lerp(prev, x, mix) for mix in mixes]


def squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(size for size in shape if size != 1)


def tensor_shape(
    tensors: dict[str, torch.Tensor], name: str, dims: int, label: str
) -> tuple[int, ...]:
    """The shape of ``tensors[name]`` without its size-1 dims, which must leave ``dims`` dims."""
    if name not in tensors:
        raise CheckpointError(f"incomplete {label} checkpoint: no {name} tensor")
    shape = squeezed(tensors[name].shape)
    if len(shape) != dims:
        raise CheckpointError(
            f"corrupt {label} checkpoint: {name} has shape {list(tensors[name].shape)}"
        )
    return shape


def check_keys(
    tensors: dict[str, torch.Tensor],
    n_layer: int,
    block_keys: Iterable[str],
    label: str,
    hint: str | None = None,
    optional: Iterable[str] = (),
) -> None:
    """Refuse checkpoints with missing tensors or tensors this implementation would ignore;
    ``optional`` names tensors that may be absent."""
    block_keys = list(block_keys)
    expected = set(MODEL_KEYS) | {f"blocks.0.{key}" for key in FIRST_BLOCK_KEYS}
    for index in range(n_layer):
        expected |= {f"blocks.{index}.{key}" for key in block_keys}
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:3]) + (" ..." if len(unexpected) > 3 else "")
        if any(name.endswith(".att.time_state") for name in unexpected):
            hint = MERGED_STATE_HINT
        raise UnsupportedModelError(
            f"unsupported {label} variant: unexpected tensors {shown}", hint=hint
        )
    missing = sorted(expected - set(tensors) - set(optional))
    if missing:
        raise CheckpointError(f"incomplete {label} checkpoint: missing {missing[0]}")


def check_shapes(
    tensors: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    default: tuple[int, ...],
    label: str,
) -> None:
    """Every tensor must have the shape its key suffix implies (``default`` for the rest).

    ``expected`` is keyed by the name without ``blocks.N.``; size-1 dims are ignored, so a
    ``(1, 1, C)`` mixing vector matches ``(C,)``.
    """
    for name, tensor in tensors.items():
        suffix = name.split(".", 2)[2] if name.startswith("blocks.") else name
        want = expected.get(suffix, default)
        if squeezed(tensor.shape) != squeezed(want):
            raise CheckpointError(
                f"corrupt {label} checkpoint: {name} has shape {list(tensor.shape)}, "
                f"expected {list(want)}"
            )


def check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    if not tokens:
        raise ValueError("forward() needs at least one token")
    if max(tokens) >= vocab_size or min(tokens) < 0:
        raise InvalidInputError(f"token id out of range for vocabulary {vocab_size}")


def fold_ln0(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embedding with block 0's ln0 applied (float32): every token's input is normalised by
    it first, so applying it to the table once saves a LayerNorm per forward."""
    embedding = tensors["emb.weight"].float()
    weight, bias = (tensors[f"blocks.0.ln0.{name}"].float() for name in ("weight", "bias"))
    return F.layer_norm(embedding, (embedding.shape[1],), weight, bias)


def _dense(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the tensors that are not quantized, for a model prepared in ``dtype``."""
    return torch.float32 if dtype == torch.int8 else dtype


def _forget_derived(group: WeightGroup) -> None:
    """Drop the values a weight group derived from its fields (``functools.cached_property``,
    such as stacked mixes): they are made again, from the moved fields, when next used."""
    for name, attribute in vars(type(group)).items():
        if isinstance(attribute, functools.cached_property):
            group.__dict__.pop(name, None)


@dataclass
class Block:
    norms: NormWeights
    att: Any  # the generation's time-mixing weight group
    ffn: Any  # the generation's channel-mixing weight group


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


def channel_mix(ffn: Any, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RWKV-4/5/6 channel mixing: ``σ(R·xr) ⊙ V·relu(K·xk)²``."""
    xk, xr = ffn.mixed_inputs(x, previous_tokens(x, shift))
    hidden = torch.relu(linear(xk, ffn.key_weight)) ** 2  # (T, F)
    return torch.sigmoid(linear(xr, ffn.receptance_weight)) * linear(hidden, ffn.value_weight)


class RecurrentModel:
    """The model frame RWKV-4, 5 and 6 share: ``forward(tokens, state) -> (logits, state)``.

    Subclasses set the class attributes and implement ``read_config``, ``expected_shapes``,
    ``new_layer_state`` and ``time_mix``.
    """

    generation: ClassVar[str]
    time_mix_weights: ClassVar[type[WeightGroup]]
    channel_mix_weights: ClassVar[type[WeightGroup]] = ChannelMixWeights
    float32_keys: ClassVar[tuple[str, ...]] = ()  # block key suffixes kept in float32
    rescale_layer: ClassVar[int] = RESCALE_LAYER
    rescales_in_fp16: ClassVar[bool] = True  # RWKV-7 needs no rescaling (official package)
    optional_keys: ClassVar[frozenset[str]] = frozenset()  # tensors a checkpoint may lack
    variant_hint: ClassVar[str | None] = None  # hint for checkpoints with unexpected tensors

    def __init__(
        self,
        config: Any,
        embedding: torch.Tensor,
        blocks: list[Block],
        ln_out: tuple[torch.Tensor, torch.Tensor],
        head: Weight,
    ) -> None:
        self.config = config
        self.embedding = embedding  # (V, C), ln0 already applied; rows are cast when looked up
        self.blocks = blocks
        self.ln_out = ln_out
        self.head = head  # (V, C)
        self.dtype = ln_out[0].dtype  # of the activations; projections may be stored narrower
        self.weight_dtype = head.values.dtype if isinstance(head, QuantizedMatrix) else head.dtype
        # prepare() scaled the weights to match
        self.rescaled = self.rescales_in_fp16 and self.weight_dtype == torch.float16
        self.fingerprint = ""  # set by the loader, which sees the checkpoint's raw tensors
        # One-token CUDA graphs by kernel choice (None: capture failed); see decode_graph.py.
        self._graphs: dict[str, decode_graph.OneTokenGraph | None] = {}

    # --- what each generation supplies -----------------------------------------------------

    @classmethod
    def read_config(cls, tensors: dict[str, torch.Tensor]) -> Any:
        """The model's dimensions, read from tensor shapes (works on prepared tensors too)."""
        raise NotImplementedError

    @classmethod
    def expected_shapes(cls, config: Any) -> dict[str, tuple[int, ...]]:
        """Shapes by key suffix (without ``blocks.N.``) of every tensor that is not (C,)."""
        raise NotImplementedError

    @classmethod
    def normalize(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewrite equivalent checkpoint spellings into the one the model runs on."""
        return tensors

    def new_layer_state(self) -> Any:
        raise NotImplementedError

    def time_mix(
        self, att: Any, x: torch.Tensor, state: Any, carry: dict
    ) -> tuple[torch.Tensor, dict]:
        """Time mixing of the ln1-normed (T, C) input: the output (T, C) and the new values of
        the layer state's recurrent ``att_*`` fields (the frame records the token shifts).
        ``carry`` passes values from layer to layer within one forward (RWKV-7's first values)."""
        raise NotImplementedError

    def channel_mix(self, ffn: Any, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Channel mixing of the ln2-normed (T, C) input."""
        return channel_mix(ffn, x, shift)

    # --- the shared frame --------------------------------------------------------------------

    @classmethod
    def label(cls) -> str:
        return GENERATION_NAMES[cls.generation]

    @classmethod
    def block_keys(cls) -> list[str]:
        return [
            *NormWeights.checkpoint_keys(),
            *("att." + key for key in cls.time_mix_weights.checkpoint_keys()),
            *("ffn." + key for key in cls.channel_mix_weights.checkpoint_keys()),
        ]

    @classmethod
    def prepare(
        cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Checkpoint tensors, validated, in the layout the model runs on.

        ln0 is folded into the embedding (and dropped), (1, 1, C) vectors become (C,), decay
        parameters and ln_x stay float32 and the rest is cast to ``dtype``. For float16 the
        residual-writing weights are rescaled (see RESCALE_LAYER). With ``torch.int8`` the
        projections and the head are quantized (their scales stored under ``name.scale``) and
        the rest is float32. This is what the converted-weights cache stores.
        """
        tensors = cls.normalize(tensors)
        config = cls.read_config(tensors)
        check_keys(
            tensors,
            config.n_layer,
            cls.block_keys(),
            cls.label(),
            hint=cls.variant_hint,
            optional=cls.optional_keys,
        )
        c = config.n_embd
        shapes = {
            "emb.weight": (config.vocab_size, c),
            "head.weight": (config.vocab_size, c),
            "ffn.key.weight": (config.ffn_size, c),
            "ffn.value.weight": (c, config.ffn_size),
            "ffn.receptance.weight": (c, c),
            **cls.expected_shapes(config),
        }
        check_shapes(tensors, shapes, (c,), cls.label())
        prepared = {}
        for name, tensor in tensors.items():
            if not name.startswith("blocks.0.ln0."):
                prepared |= cls._prepare_tensor(name, tensor, dtype)
        prepared["emb.weight"] = fold_ln0(tensors).to(_dense(dtype))
        return prepared

    @classmethod
    def _prepare_tensor(
        cls, name: str, tensor: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        if tensor.dim() == 3 and tensor.shape[:2] == (1, 1):
            tensor = tensor.reshape(-1)  # (1, 1, C) -> (C,)
        parts = name.split(".", 2)
        suffix = parts[2] if parts[0] == "blocks" else name
        if suffix in cls.float32_keys:
            return {name: tensor.float().contiguous()}
        if cls.rescales_in_fp16 and dtype == torch.float16 and suffix in _RESCALED_WEIGHTS:
            tensor = tensor.float() / 2 ** (int(parts[1]) // cls.rescale_layer)
        if is_projection(name) and dtype == torch.int8:
            quantized = quantize_int8(tensor)
            return {name: quantized.values, name + SCALE_SUFFIX: quantized.scale}
        return {name: tensor.to(_dense(dtype)).contiguous()}

    @classmethod
    def from_prepared(
        cls, prepared: dict[str, torch.Tensor], compute_dtype: torch.dtype | None = None
    ):
        """Build the model around prepared tensors without copying them (they may be mmapped).

        ``compute_dtype`` is the dtype of the activations (default: that of the stored vectors);
        the vectors and small matrices are cast to it, the projections, head and embedding stay
        as stored. On a CPU, 16-bit weights run fastest with float32 activations.
        """
        if compute_dtype is not None:
            prepared = {
                name: cls._for_compute(name, tensor, compute_dtype)
                for name, tensor in prepared.items()
            }
        config = cls.read_config(prepared)
        blocks = [
            Block(
                norms=NormWeights.take(prepared, f"blocks.{index}."),
                att=cls.time_mix_weights.take(prepared, f"blocks.{index}.att."),
                ffn=cls.channel_mix_weights.take(prepared, f"blocks.{index}.ffn."),
            )
            for index in range(config.n_layer)
        ]
        ln_out = (prepared["ln_out.weight"], prepared["ln_out.bias"])
        head = prepared_weight(prepared, "head.weight")
        return cls(config, prepared["emb.weight"], blocks, ln_out, head)

    @classmethod
    def _for_compute(cls, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` cast to the activation dtype, unless it stays as stored: projections and
        their scales, the embedding (cast row by row) and the float32 keys."""
        suffix = name.split(".", 2)[2] if name.startswith("blocks.") else name
        stays = (
            is_projection(name)
            or name.endswith(SCALE_SUFFIX)
            or name == "emb.weight"
            or suffix in cls.float32_keys
        )
        return tensor if stays else tensor.to(dtype)

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        """Build the model from a checkpoint's tensors (validated first)."""
        return cls.from_prepared(cls.prepare(tensors, dtype))

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def describe(self) -> str:
        return f"{self.label()} L{self.config.n_layer} D{self.config.n_embd}"

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def to(self, device: torch.device | str) -> RecurrentModel:
        """Move the weights to ``device``, in place like ``nn.Module.to``; returns the model.
        States the model makes from then on are on ``device`` too."""
        device = torch.device(device)
        self.embedding, self.head = self.embedding.to(device), self.head.to(device)
        self.ln_out = tuple(tensor.to(device) for tensor in self.ln_out)
        for block in self.blocks:
            for group in (block.norms, block.att, block.ffn):
                for field in dataclasses.fields(group):
                    value = getattr(group, field.name)
                    if value is not None:
                        setattr(group, field.name, value.to(device))
                _forget_derived(group)
        self._graphs.clear()
        return self

    def new_state(self) -> State:
        """The state a model starts from (all zeros, but RWKV-4's running maximum), on the
        model's device."""
        layers = [self.new_layer_state() for _ in range(self.config.n_layer)]
        return State(generation=self.generation, layers=layers).to(self.device)

    @torch.inference_mode()
    def forward(
        self, tokens: Sequence[int], state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """Consume ``tokens`` after ``state``; return the next-token logits (V,) and the new state.

        The input state is left untouched. Call with one token to decode, many to prefill.
        On a GPU one token runs as a CUDA graph (decode_graph.py).
        """
        check_tokens(tokens, self.vocab_size)
        if len(tokens) == 1 and (graph := self._one_token_graph()) is not None:
            return graph(int(tokens[0]), state)
        return self.step_ids(torch.as_tensor(tokens, device=self.device), state)

    def step_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """``forward`` for token ids already in a 1-D tensor on the model's device, unchecked."""
        x, new_state = self._run_ids(ids, state)
        return self._logits(x[-1]), new_state

    def sequence_logits(
        self, tokens: Sequence[int], state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """The logits after every token (T, V), for perplexity and training: unlike ``forward``
        this keeps autograd on, so gradients reach weights that require them."""
        check_tokens(tokens, self.vocab_size)
        x, new_state = self._run_ids(torch.as_tensor(tokens, device=self.device), state)
        return self._logits(x), new_state

    def _one_token_graph(self) -> decode_graph.OneTokenGraph | None:
        """The CUDA graph of the one-token step for the current kernel choice, captured on first
        use; None off the GPU, when graphs are off or when capture failed."""
        if not decode_graph.graphs_enabled(self.device):
            return None
        choice = kernel_choice()
        if choice not in self._graphs:
            self._graphs[choice] = decode_graph.capture(self)
        return self._graphs[choice]

    def _run_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """The final residual stream (T, C) and the new state after the token ``ids``."""
        state = state if state is not None else self.new_state()
        x = self.embedding[ids].to(device=self.device, dtype=self.dtype)  # (T, C)
        carry: dict = {}
        new_layers = []
        for index, (block, layer_state) in enumerate(zip(self.blocks, state.layers, strict=True)):
            x, new_layer = self._block(block, x, layer_state, carry)
            new_layers.append(new_layer)
            if self.rescaled and (index + 1) % self.rescale_layer == 0:
                x = x / 2
        return x, State(generation=self.generation, layers=new_layers)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.config.n_embd,), *self.ln_out)
        return linear(x, self.head).float()  # (..., V)

    def _block(
        self, block: Block, x: torch.Tensor, state: Any, carry: dict
    ) -> tuple[torch.Tensor, Any]:
        size = (self.config.n_embd,)
        normed = F.layer_norm(x, size, block.norms.ln1_weight, block.norms.ln1_bias)
        mixed, att_state = self.time_mix(block.att, normed, state, carry)
        x = x + mixed
        ffn_normed = F.layer_norm(x, size, block.norms.ln2_weight, block.norms.ln2_bias)
        x = x + self.channel_mix(block.ffn, ffn_normed, state.ffn_shift)
        # Clones, so the state does not keep the whole (T, C) activations alive.
        shifts = {"att_shift": normed[-1].clone(), "ffn_shift": ffn_normed[-1].clone()}
        new_state = dataclasses.replace(state, **shifts, **att_state)
        return x, new_state
