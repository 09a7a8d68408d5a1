"""The model frame every RWKV generation runs in, from token ids to logits.

RWKV-4 to 7 differ in their time mixing, their channel mixing and their layer state. Everything
around those is the same, and lives in :class:`RecurrentModel`: checkpoint validation and weight
preparation (models/validate.py, models/prepare.py), ln0 folded into the embedding, pre-norm
residual blocks (ln1 -> time mixing, ln2 -> channel mixing), ln_out and the head, the fp16
rescaling of RWKV-4 to 6, moving the weights between devices, and the one-token step as a CUDA
graph on a GPU (models/decode_graph.py), for one sequence and per batch-size bucket. A
generation module supplies its config, weight groups, per-layer state and the two mixings.

Activations are (T, C) for one sequence. ``forward_batch`` steps B sequences by one token each:
activations are then (B, 1, C) and every state tensor has a leading batch dimension (B, ...).
The mixings take either, as the ops they call do (kernels/decode.py says which paths run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from rwkv_cli.kernels.build import kernel_choice
from rwkv_cli.kernels.decode import is_decode
from rwkv_cli.kernels.linear import Weight, linear
from rwkv_cli.loading.checkpoint import GENERATION_NAMES
from rwkv_cli.models import decode_graph
from rwkv_cli.models.prepare import (
    RESCALE_LAYER,
    compute_tensor,
    dense_dtype,
    fold_ln0,
    prepared_tensor,
)
from rwkv_cli.models.validate import check_keys, check_shapes, check_tokens
from rwkv_cli.models.weight_groups import Block, NormWeights, WeightGroup, prepared_weight
from rwkv_cli.state import State


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


class RecurrentModel:
    """The model frame every generation shares: ``forward(tokens, state) -> (logits, state)``.

    Subclasses set the class attributes and implement ``read_config``, ``expected_shapes``,
    ``new_layer_state``, ``time_mix`` and ``channel_mix``.
    """

    generation: ClassVar[str]
    time_mix_weights: ClassVar[type[WeightGroup]]
    channel_mix_weights: ClassVar[type[WeightGroup]]
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
        # The projections' weight format (int4 models keep an int8 head)
        key = blocks[0].ffn.key_weight
        self.weight_dtype = key.dtype
        # prepare() scaled the weights to match
        self.rescaled = self.rescales_in_fp16 and self.weight_dtype == torch.float16
        self.fingerprint = ""  # set by the loader, which sees the checkpoint's raw tensors
        # One-token CUDA graphs by kernel choice and batch-size bucket (None: one sequence), each
        # None where capture failed; see decode_graph.py.
        self._graphs: dict[tuple[str, int | None], decode_graph.OneTokenGraph | None] = {}

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
        self, att: Any, x: torch.Tensor, state: Any, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Time mixing of the ln1-normed (T, C) input: the output (T, C), the new values of the
        layer state's recurrent ``att_*`` fields (the frame records the token shifts), and the
        ``v_first`` for the next layer.

        ``v_first`` is RWKV-7's value residual: the first layer's values (T, C), which every
        later layer mixes into its own. The frame passes None to the first layer, and to every
        later one what the layer before returned. Generations before RWKV-7 return None.
        """
        raise NotImplementedError

    def channel_mix(self, ffn: Any, x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Channel mixing of the ln2-normed (T, C) input."""
        raise NotImplementedError

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
        """Checkpoint tensors, validated, in the layout the model runs on (see
        ``prepare.prepared_tensor``), ln0 folded into the embedding (and dropped). This is what
        the converted-weights cache stores."""
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
        rescale_layer = cls.rescale_layer if cls.rescales_in_fp16 else None
        prepared = {}
        for name, tensor in tensors.items():
            if not name.startswith("blocks.0.ln0."):
                prepared |= prepared_tensor(name, tensor, dtype, cls.float32_keys, rescale_layer)
        prepared["emb.weight"] = fold_ln0(tensors).to(dense_dtype(dtype))
        return prepared

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
        """A prepared tensor as this generation computes with it (``prepare.compute_tensor``)."""
        return compute_tensor(name, tensor, dtype, cls.float32_keys)

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
                group.move_to(device)
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

        The input state is left untouched. Call with one token to decode, many to prefill. On a
        GPU the one-token path (kernels/decode.py) runs as a CUDA graph (decode_graph.py).
        """
        check_tokens(tokens, self.vocab_size)
        if is_decode(len(tokens)) and (graph := self._one_token_graph()) is not None:
            return graph(tokens, state)
        return self.step_ids(torch.as_tensor(tokens, device=self.device), state)

    @torch.inference_mode()
    def forward_batch(self, tokens: Sequence[int], state: State) -> tuple[torch.Tensor, State]:
        """One token for each of B sequences at once: ``tokens[b]`` follows row b of ``state``.

        ``state`` is a batched state: every tensor of it has a leading batch dimension of B rows
        (batching/states.py stacks and splits them). Returns the next-token logits (B, V) and
        the new batched state; the input state is left untouched. Each row's logits equal those
        of its own ``forward`` up to float rounding (the products are summed in another order).
        On a GPU the step runs as the CUDA graph of the batch's size bucket (decode_graph.py).
        """
        check_tokens(tokens, self.vocab_size)
        bucket = decode_graph.batch_bucket(len(tokens))
        if (graph := self._one_token_graph(bucket)) is not None:
            return graph(tokens, state)
        ids = torch.as_tensor(tokens, device=self.device).unsqueeze(-1)  # (B, 1)
        return self.step_ids(ids, state)

    def step_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """``forward`` for token ids already in a tensor on the model's device, unchecked: (T,)
        for one sequence, or (B, 1) and a batched state as ``forward_batch``."""
        x, new_state = self._run_ids(ids, state)  # (T, C) or (B, 1, C)
        return self._logits(x[..., -1, :]), new_state

    def sequence_logits(
        self, tokens: Sequence[int], state: State | None = None
    ) -> tuple[torch.Tensor, State]:
        """The logits after every token (T, V), for perplexity and training: unlike ``forward``
        this keeps autograd on, so gradients reach weights that require them."""
        check_tokens(tokens, self.vocab_size)
        x, new_state = self._run_ids(torch.as_tensor(tokens, device=self.device), state)
        return self._logits(x), new_state

    def _one_token_graph(self, rows: int | None = None) -> decode_graph.OneTokenGraph | None:
        """The CUDA graph of the one-token step for the current kernel choice, of one sequence
        or of a batch-size bucket of ``rows`` sequences, captured on first use; None off the
        GPU, when graphs are off or when capture failed."""
        if not decode_graph.graphs_enabled(self.device):
            return None
        key = (kernel_choice(), rows)
        if key not in self._graphs:
            self._graphs[key] = decode_graph.capture(self, rows)
        return self._graphs[key]

    def _run_ids(self, ids: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        """The final residual stream (T, C) and the new state after the token ids ``ids`` (T,);
        for a batch, ids (B, T), residual stream (B, T, C) and a batched ``state``."""
        state = state if state is not None else self.new_state()
        rows = self.embedding[ids.reshape(-1)]  # filerows.FileRows takes 1-D indices only
        x = rows.view(*ids.shape, -1).to(device=self.device, dtype=self.dtype)  # (..., T, C)
        v_first = None  # RWKV-7's value residual: the first layer's values (see time_mix)
        new_layers = []
        for index, (block, layer_state) in enumerate(zip(self.blocks, state.layers, strict=True)):
            x, new_layer, v_first = self._block(block, x, layer_state, v_first)
            new_layers.append(new_layer)
            if self.rescaled and (index + 1) % self.rescale_layer == 0:
                x = x / 2
        return x, State(generation=self.generation, layers=new_layers)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.config.n_embd,), *self.ln_out)
        return linear(x, self.head).float()  # (..., V)

    def _block(
        self, block: Block, x: torch.Tensor, state: Any, v_first: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any, torch.Tensor | None]:
        size = (self.config.n_embd,)
        normed = F.layer_norm(x, size, block.norms.ln1_weight, block.norms.ln1_bias)
        mixed, att_state, v_first = self.time_mix(block.att, normed, state, v_first)
        x = x + mixed
        ffn_normed = F.layer_norm(x, size, block.norms.ln2_weight, block.norms.ln2_bias)
        x = x + self.channel_mix(block.ffn, ffn_normed, state.ffn_shift)
        shifts = {"att_shift": _last_token(normed), "ffn_shift": _last_token(ffn_normed)}
        new_state = dataclasses.replace(state, **shifts, **att_state)
        return x, new_state, v_first


def _last_token(x: torch.Tensor) -> torch.Tensor:
    """The last token's row of x (..., T, C), for the state: copied, so that the state does not
    keep the whole (T, C) activations alive, unless that row is all of them (one token)."""
    last = x[..., -1, :]
    return last if is_decode(x.shape[-2]) else last.clone()
