"""Preparing checkpoint tensors for a model: the layout it runs on, and the dtype of each tensor.

A model's ``prepare`` validates a checkpoint (models/validate.py) and passes every tensor through
``prepared_tensor``; what it returns is what the converted-weights cache stores. When the model
is built, ``compute_tensor`` casts the small tensors to the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_cli.kernels.linear import INT4, INT4_GROUP, quantize_int4, quantize_int8
from rwkv_cli.models.weight_groups import SCALE_SUFFIX, block_suffix, is_projection

# fp16 tops out at 65504, and the residual stream of RWKV-4/5/6 grows layer after layer, so a
# deep model overflows in fp16. So in fp16, like the official package, the residual is halved
# after every 6th layer and the weights that write into it (att.output and ffn.value of layer i)
# are divided by 2 ** (i // 6) to match. Every read of the residual goes through a LayerNorm, which
# does not see the scale, so the logits are unchanged up to rounding.
RESCALE_LAYER = 6
_RESCALED_WEIGHTS = ("att.output.weight", "ffn.value.weight")


def fold_ln0(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embedding with block 0's ln0 applied (float32): every token's input is normalised by
    it first, so applying it to the table once saves a LayerNorm per forward."""
    embedding = tensors["emb.weight"].float()
    weight, bias = (tensors[f"blocks.0.ln0.{name}"].float() for name in ("weight", "bias"))
    return F.layer_norm(embedding, (embedding.shape[1],), weight, bias)


def dense_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the tensors that are not quantized, for a model prepared in ``dtype``."""
    return torch.float32 if dtype in (torch.int8, INT4) else dtype


def prepared_tensor(
    name: str,
    tensor: torch.Tensor,
    dtype: torch.dtype,
    float32_keys: tuple[str, ...],
    rescale_layer: int | None,
) -> dict[str, torch.Tensor]:
    """One checkpoint tensor as the model runs on it, under its name (and an int8 projection's
    scales under ``name.scale``).

    (1, 1, C) vectors become (C,); ``float32_keys`` (block key suffixes) stay float32; the rest
    is cast to ``dtype``. For float16 with a ``rescale_layer`` the residual-writing weights are
    rescaled (see RESCALE_LAYER). With ``torch.int8`` the projections and the head are quantized
    and the rest is float32; with ``INT4`` the projections are quantized to int4 and the head
    (whose errors reach every logit directly) and any matrix whose rows are not whole int4
    groups to int8.
    """
    if tensor.dim() == 3 and tensor.shape[:2] == (1, 1):
        tensor = tensor.reshape(-1)  # (1, 1, C) -> (C,)
    suffix = block_suffix(name)
    if suffix in float32_keys:
        return {name: tensor.float().contiguous()}
    if rescale_layer is not None and dtype == torch.float16 and suffix in _RESCALED_WEIGHTS:
        tensor = tensor.float() / 2 ** (int(name.split(".")[1]) // rescale_layer)
    if is_projection(name) and dtype in (torch.int8, INT4):
        int4 = dtype == INT4 and name != "head.weight" and tensor.shape[1] % INT4_GROUP == 0
        quantized = quantize_int4(tensor) if int4 else quantize_int8(tensor)
        return {name: quantized.values, name + SCALE_SUFFIX: quantized.scale}
    return {name: tensor.to(dense_dtype(dtype)).contiguous()}


def compute_tensor(
    name: str, tensor: torch.Tensor, dtype: torch.dtype, float32_keys: tuple[str, ...]
) -> torch.Tensor:
    """A prepared tensor cast to the activation dtype, unless it stays as stored: projections
    and their scales, the embedding (cast row by row) and the ``float32_keys``."""
    stays = (
        is_projection(name)
        or name.endswith(SCALE_SUFFIX)
        or name == "emb.weight"
        or block_suffix(name) in float32_keys
    )
    return tensor if stays else tensor.to(dtype)
