"""Tiny random RWKV checkpoints in the exact official file layouts.

Shapes and initial value ranges follow BlinkDL's RWKV-7 training code (decay biases spread over
[-6.5, -1.5], mixing coefficients in (0, 1), k_k near 0.85, r_k near -0.04), with every LoRA
randomised so no code path multiplies by zero. Weights are stored as bf16, like official releases.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

WORLD_VOCAB = 65536


def rwkv7_tensors(
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    vocab_size: int = WORLD_VOCAB,
    lora: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict with official names, shapes and dtype."""
    gen = torch.Generator().manual_seed(seed)
    c, ffn = n_embd, 4 * n_embd
    n_head = n_embd // head_size

    def normal(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std + mean

    def uniform(*shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * (high - low) + low

    tensors = {
        "emb.weight": normal(vocab_size, c),
        "blocks.0.ln0.weight": uniform(c, low=0.8, high=1.2),
        "blocks.0.ln0.bias": normal(c, std=0.05),
        "ln_out.weight": uniform(c, low=0.8, high=1.2),
        "ln_out.bias": normal(c, std=0.05),
        "head.weight": normal(vocab_size, c, std=0.3),
    }
    ratio = torch.arange(c) / (c - 1)
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        depth = layer / max(n_layer - 1, 1)
        decay = -7 + 5 * ratio ** (0.85 + depth**0.5) + 0.5
        tensors.update(
            {
                p + "ln1.weight": uniform(c, low=0.8, high=1.2),
                p + "ln1.bias": normal(c, std=0.05),
                p + "ln2.weight": uniform(c, low=0.8, high=1.2),
                p + "ln2.bias": normal(c, std=0.05),
                **{p + f"att.x_{m}": uniform(1, 1, c) for m in "rwkvag"},
                p + "att.w0": (decay + normal(c, std=0.1)).view(1, 1, c),
                p + "att.w1": normal(c, lora, std=0.1),
                p + "att.w2": normal(lora, c, std=0.1),
                p + "att.a0": normal(1, 1, c, std=0.5),
                p + "att.a1": normal(c, lora, std=0.1),
                p + "att.a2": normal(lora, c, std=0.1),
                p + "att.v0": normal(1, 1, c, std=0.5, mean=1.0),
                p + "att.v1": normal(c, lora, std=0.1),
                p + "att.v2": normal(lora, c, std=0.1),
                p + "att.g1": normal(c, lora, std=0.1),
                p + "att.g2": normal(lora, c, std=0.1),
                p + "att.k_k": normal(1, 1, c, std=0.05, mean=0.85),
                p + "att.k_a": normal(1, 1, c, std=0.05, mean=1.0),
                p + "att.r_k": normal(n_head, head_size, std=0.05, mean=-0.04),
                **{
                    p + f"att.{name}.weight": normal(c, c, std=1 / math.sqrt(c))
                    for name in ("receptance", "key", "value", "output")
                },
                p + "att.ln_x.weight": uniform(c, low=0.5, high=1.0) * ((1 + layer) / n_layer),
                p + "att.ln_x.bias": normal(c, std=0.05),
                p + "ffn.x_k": uniform(1, 1, c),
                p + "ffn.key.weight": normal(ffn, c, std=1 / math.sqrt(c)),
                p + "ffn.value.weight": normal(c, ffn, std=1 / math.sqrt(ffn)),
            }
        )
    return {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}


def write_pth(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    torch.save(tensors, path)
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, path)
    return path
