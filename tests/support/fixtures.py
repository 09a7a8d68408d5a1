"""Tiny random RWKV checkpoints in the exact official file layouts.

Shapes and initial value ranges follow BlinkDL's RWKV-7 training code (decay biases spread over
[-6.5, -1.5], mixing coefficients in (0, 1), k_k near 0.85, r_k near -0.04), with every LoRA
randomised so no code path multiplies by zero. Weights are stored as bf16, like official releases.
"""

from __future__ import annotations

import json
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


def flip_tensor_bytes(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of a safetensors file's tensor data."""
    contents = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(contents[:8], "little")
    middle = (data_start + len(contents)) // 2
    for index in range(middle, middle + count):
        contents[index] ^= 0xFF
    path.write_bytes(bytes(contents))


# --- RWKV-4, 5 and 6 -------------------------------------------------------------------------

PILE_VOCAB = 50277  # the 20B (GPT-NeoX) tokenizer of RWKV-4 Pile models
LEGACY_GENERATIONS = ("4", "5.0", "5.1", "5.2", "6")


class _Init:
    """Random tensors for one fixture, from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std + mean

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        return torch.rand(*shape, generator=self.gen) * (high - low) + low

    def linear(self, rows: int, columns: int) -> torch.Tensor:
        """An (out, in) weight whose outputs have about the spread of its inputs."""
        return self.normal(rows, columns, std=1 / math.sqrt(columns))


def _frame_tensors(
    init: _Init, n_layer: int, n_embd: int, vocab_size: int, ffn: int
) -> dict[str, torch.Tensor]:
    """Embedding, ln0, ln_out, head and every block's ln1/ln2 and FFN matrices (v4-v6 share)."""
    c = n_embd
    tensors = {
        "emb.weight": init.normal(vocab_size, c),
        "blocks.0.ln0.weight": init.uniform(c, low=0.8, high=1.2),
        "blocks.0.ln0.bias": init.normal(c, std=0.05),
        "ln_out.weight": init.uniform(c, low=0.8, high=1.2),
        "ln_out.bias": init.normal(c, std=0.05),
        "head.weight": init.normal(vocab_size, c, std=0.3),
    }
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        tensors.update(
            {
                p + "ln1.weight": init.uniform(c, low=0.8, high=1.2),
                p + "ln1.bias": init.normal(c, std=0.05),
                p + "ln2.weight": init.uniform(c, low=0.8, high=1.2),
                p + "ln2.bias": init.normal(c, std=0.05),
                p + "ffn.key.weight": init.linear(ffn, c),
                p + "ffn.receptance.weight": init.linear(c, c),
                p + "ffn.value.weight": init.linear(c, ffn),
            }
        )
    return tensors


def _depth(layer: int, n_layer: int) -> tuple[float, float]:
    """BlinkDL's init ratios: 0 -> 1 over the layers, and 1 -> almost 0."""
    return layer / max(n_layer - 1, 1), 1.0 - layer / n_layer


def _channel_ramp(n_embd: int) -> torch.Tensor:
    return (torch.arange(n_embd) / n_embd).view(1, 1, n_embd)  # (1, 1, C), 0 -> almost 1


def rwkv4_tensors(
    n_layer: int = 2,
    n_embd: int = 128,
    vocab_size: int = PILE_VOCAB,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-4 state dict with official names, shapes and dtype (RWKV-v4neo's init:
    decays spread over [-5, 3], time_first around log 0.3 with a zigzag, ramped mixing)."""
    init = _Init(seed)
    c = n_embd
    tensors = _frame_tensors(init, n_layer, c, vocab_size, 4 * c)
    ramp, ratio = _channel_ramp(c), torch.arange(c) / (c - 1)
    zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(c)]) * 0.5
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        deep, shallow = _depth(layer, n_layer)
        tensors.update(
            {
                p + "att.time_decay": -5
                + 8 * ratio ** (0.7 + 1.3 * deep)
                + init.normal(c, std=0.1),
                p + "att.time_first": math.log(0.3) + zigzag + init.normal(c, std=0.1),
                p + "att.time_mix_k": ramp**shallow,
                p + "att.time_mix_v": ramp**shallow + 0.3 * deep,
                p + "att.time_mix_r": ramp ** (0.5 * shallow),
                **{
                    p + f"att.{name}.weight": init.linear(c, c)
                    for name in ("key", "value", "receptance", "output")
                },
                p + "ffn.time_mix_k": ramp**shallow,
                p + "ffn.time_mix_r": ramp**shallow,
            }
        )
    return {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}


def rwkv5_tensors(
    version: str = "5.2",
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    vocab_size: int = WORLD_VOCAB,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-5.0, 5.1 or 5.2 state dict with official names, shapes and dtype.

    5.0 stores a per-head ``time_first`` (log of the bonus), 5.1 a per-head ``time_faaaa`` and
    the gate, 5.2 per-channel decay and bonus shaped (H, N) and an FFN of 3.5C.
    """
    init = _Init(seed)
    c, h = n_embd, n_embd // head_size
    ffn = int(3.5 * c) // 32 * 32 if version == "5.2" else 4 * c
    tensors = _frame_tensors(init, n_layer, c, vocab_size, ffn)
    ramp = _channel_ramp(c)
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        deep, shallow = _depth(layer, n_layer)
        if version == "5.2":
            ratio = (torch.arange(c) / (c - 1)).view(h, head_size)
            zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(c)]).view(h, head_size) * 0.1
            decay = -6 + 5 * ratio ** (0.7 + 1.3 * deep)
            bonus = {"att.time_faaaa": deep * (1 - ratio) + zigzag + 0.2}
        else:
            ratio = torch.arange(h) / max(h - 1, 1)
            decay = -6 + 5 * ratio ** (0.7 + 1.3 * deep)
            if version == "5.0":
                bonus = {"att.time_first": init.normal(h, std=0.3, mean=-1.0)}
            else:
                bonus = {"att.time_faaaa": deep * (1 - ratio) + 0.3}
        tensors.update(
            {
                p + "att.time_mix_k": ramp**shallow,
                p + "att.time_mix_v": ramp**shallow + 0.3 * deep,
                p + "att.time_mix_r": ramp ** (0.5 * shallow),
                p + "att.time_decay": decay + init.normal(*decay.shape, std=0.1),
                **{
                    p + name: value + init.normal(*value.shape, std=0.05)
                    for name, value in bonus.items()
                },
                **{
                    p + f"att.{name}.weight": init.linear(c, c)
                    for name in ("receptance", "key", "value", "output")
                },
                p + "att.ln_x.weight": init.uniform(c, low=0.5, high=1.0) * ((1 + layer) / n_layer),
                p + "att.ln_x.bias": init.normal(c, std=0.05),
                p + "ffn.time_mix_k": ramp**shallow,
                p + "ffn.time_mix_r": ramp**shallow,
            }
        )
        if version != "5.0":
            tensors[p + "att.time_mix_g"] = ramp ** (0.5 * shallow)
            tensors[p + "att.gate.weight"] = init.linear(c, c)
    return {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}


def rwkv6_tensors(
    n_layer: int = 2,
    n_embd: int = 128,
    head_size: int = 64,
    vocab_size: int = WORLD_VOCAB,
    mix_lora: int = 32,
    decay_lora: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.Tensor]:
    """A random RWKV-6 state dict with official names, shapes and dtype; both LoRAs non-zero."""
    init = _Init(seed)
    c, h = n_embd, n_embd // head_size
    tensors = _frame_tensors(init, n_layer, c, vocab_size, int(3.5 * c) // 32 * 32)
    ramp, ratio = _channel_ramp(c), torch.arange(c) / (c - 1)
    zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(c)]) * 0.1
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        deep, shallow = _depth(layer, n_layer)
        decay = -6 + 5 * ratio ** (0.7 + 1.3 * deep)
        tensors.update(
            {
                p + "att.time_maa_x": 1 - ramp**shallow,
                p + "att.time_maa_w": 1 - ramp**shallow,
                p + "att.time_maa_k": 1 - ramp**shallow,
                p + "att.time_maa_v": 1 - (ramp**shallow + 0.3 * deep),
                p + "att.time_maa_r": 1 - ramp ** (0.5 * shallow),
                p + "att.time_maa_g": 1 - ramp ** (0.5 * shallow),
                p + "att.time_maa_w1": init.normal(c, 5 * mix_lora, std=0.1),
                p + "att.time_maa_w2": init.normal(5, mix_lora, c, std=0.1),
                p + "att.time_decay": (decay + init.normal(c, std=0.1)).view(1, 1, c),
                p + "att.time_decay_w1": init.normal(c, decay_lora, std=0.1),
                p + "att.time_decay_w2": init.normal(decay_lora, c, std=0.1),
                p + "att.time_faaaa": (deep * (1 - ratio) + zigzag + 0.2).view(h, head_size),
                **{
                    p + f"att.{name}.weight": init.linear(c, c)
                    for name in ("receptance", "key", "value", "output", "gate")
                },
                p + "att.ln_x.weight": init.uniform(c, low=0.5, high=1.0) * ((1 + layer) / n_layer),
                p + "att.ln_x.bias": init.normal(c, std=0.05),
                p + "ffn.time_maa_k": 1 - ramp**shallow,
                p + "ffn.time_maa_r": 1 - ramp**shallow,
            }
        )
    return {name: tensor.to(dtype).contiguous() for name, tensor in tensors.items()}


def legacy_tensors(generation: str, **options) -> dict[str, torch.Tensor]:
    """The fixture of ``generation`` ("4", "5.0", "5.1", "5.2" or "6")."""
    if generation == "4":
        return rwkv4_tensors(**options)
    if generation == "6":
        return rwkv6_tensors(**options)
    return rwkv5_tensors(version=generation, **options)


# --- every generation --------------------------------------------------------------------------

GENERATIONS = (*LEGACY_GENERATIONS, "7")


def generation_tensors(generation: str, **options) -> dict[str, torch.Tensor]:
    """The fixture of any generation in ``GENERATIONS``: ``rwkv7_tensors`` or ``legacy_tensors``
    (both take n_layer, n_embd, vocab_size, seed and dtype)."""
    if generation == "7":
        return rwkv7_tensors(**options)
    return legacy_tensors(generation, **options)


# transformers' RwkvForCausalLM names (its converter only renames; values are unchanged).
_TRANSFORMERS_NAMES = (
    ("emb.", "embeddings."),
    ("blocks.0.ln0.", "blocks.0.pre_ln."),
    (".att.", ".attention."),
    (".ffn.", ".feed_forward."),
    (".time_mix_k", ".time_mix_key"),
    (".time_mix_v", ".time_mix_value"),
    (".time_mix_r", ".time_mix_receptance"),
)


def write_transformers_rwkv4(
    directory: Path, tensors: dict[str, torch.Tensor], safetensors: bool = True
) -> Path:
    """Write RWKV-4 ``tensors`` as a Hugging Face transformers repo (``RWKV/rwkv-4-169m-pile``
    style: config.json and fp32 ``model.safetensors`` or ``pytorch_model.bin``); returns the
    weights file."""
    directory.mkdir(parents=True, exist_ok=True)
    renamed = {}
    for name, tensor in tensors.items():
        if name != "head.weight":
            for old, new in _TRANSFORMERS_NAMES:
                name = name.replace(old, new)
            name = "rwkv." + name
        renamed[name] = tensor.float().contiguous()
    vocab_size, n_embd = tensors["emb.weight"].shape
    config = {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": vocab_size,
        "hidden_size": n_embd,
        "attention_hidden_size": n_embd,
        "intermediate_size": tensors["blocks.0.ffn.key.weight"].shape[0],
        "num_hidden_layers": 1
        + max(int(name.split(".")[1]) for name in tensors if name.startswith("blocks.")),
        "context_length": 1024,
        "layer_norm_epsilon": 1e-5,
        "rescale_every": 6,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    if safetensors:
        return write_safetensors(directory / "model.safetensors", renamed)
    return write_pth(directory / "pytorch_model.bin", renamed)
