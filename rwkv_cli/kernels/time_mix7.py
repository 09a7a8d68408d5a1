"""RWKV-7's time mixing between the input projections and the output projection, in plain torch.

From one layer's projections and the outputs of its low-rank adapters, per token::

    w = exp(-e^-0.5 · σ(w0 + decay_lora))                decay, in (0.545, 1)
    a = σ(a0 + iclr_lora)                                 in-context learning rate
    κ = normalize(k ⊙ k_k) per head                       removal key
    k = k ⊙ (1 + (a - 1) ⊙ k_a)
    v = v + (v_first - v) ⊙ σ(v0 + value_gate_lora)       value residual (not in layer 0)
    y, S = WKV-7(S, r, w, k, v, κ, a)                     the recurrence, kernels/wkv7.py
    out = (GroupNorm(y)·ln_x + (Σ_head r ⊙ k ⊙ r_k)·v) ⊙ gate

(docs/DESIGN.md section 4). ``time_mix7_torch`` computes that for any number of tokens: the
torch twin. ``time_mix7`` runs the compiled CPU kernel instead (csrc/cpu_rwkv7.cpp, through
kernels/cpu_ops.py) on the one-token path (kernels/decode.py), where it takes the inputs, for
one sequence or one token of each of a batch of sequences: in torch one token's time mixing is
some forty small operations, whose fixed costs add up to milliseconds per token while the
arithmetic takes microseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_cli.kernels import cpu_ops
from rwkv_cli.kernels.decode import is_decode
from rwkv_cli.kernels.wkv7 import wkv7

EXP_MINUS_HALF = 0.6065306597126334  # exp(-0.5): decay w = exp(-exp(-0.5)·σ(·)) in (0.545, 1)


def time_mix7(
    state: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    decay_lora: torch.Tensor,
    iclr_lora: torch.Tensor,
    **layer: torch.Tensor | float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time mixing over T tokens: the compiled CPU kernel on the one-token path
    (kernels/decode.py) where it takes the inputs, else ``time_mix7_torch``; arguments (the
    layer's by name) and results as ``time_mix7_torch``, for one sequence or a batch."""
    inputs = (state, r, k, v, gate, decay_lora, iclr_lora)
    tensors = [*inputs, *(x for x in layer.values() if isinstance(x, torch.Tensor))]
    if is_decode(r.shape[-2]) and cpu_ops.usable(*tensors):
        return cpu_ops.kernels().time_mix7(*inputs, **layer)
    return time_mix7_torch(*inputs, **layer)


def time_mix7_torch(
    state: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    decay_lora: torch.Tensor,
    iclr_lora: torch.Tensor,
    *,
    w0: torch.Tensor,
    a0: torch.Tensor,
    k_k: torch.Tensor,
    k_a: torch.Tensor,
    r_k: torch.Tensor,
    ln_x_weight: torch.Tensor,
    ln_x_bias: torch.Tensor,
    eps: float,
    v_first: torch.Tensor | None = None,
    value_gate_lora: torch.Tensor | None = None,
    v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Time mixing over T tokens, from the projections to the output projection's input.

    Args:
        state: (H, N, N) float32 WKV state, indexed [head, value, key]; not modified.
        r, k, v, gate: (T, C) receptance, key, value and output gate, C = H·N.
        decay_lora, iclr_lora: (T, C) outputs of the decay and in-context learning rate
            adapters, before their biases.
        w0, a0, k_k, k_a, ln_x_weight, ln_x_bias: (C,) the layer's biases, key scales and
            GroupNorm; r_k: (H, N) or (C,) the current token's bonus weights.
        eps: the GroupNorm's epsilon.
        v_first, value_gate_lora, v0: the value residual: the first layer's values (T, C), the
            value gate adapter's output (T, C) and its bias (C,). None in the first layer,
            whose values are not mixed.

    A batch of B sequences has state (B, H, N, N) and (B, T, C) inputs and output.

    Returns:
        The output projection's input (T, C) in r's dtype, and the new (H, N, N) state
        (batched: (B, T, C) and (B, H, N, N)).
    """
    h, n = state.shape[-3:-1]
    heads = (*r.shape[:-1], h, n)  # (..., T, H, N)
    w = torch.exp(-EXP_MINUS_HALF * torch.sigmoid((w0 + decay_lora).float()))
    a = torch.sigmoid(a0 + iclr_lora)  # in-context learning rate
    kappa = F.normalize((k * k_k).view(heads), dim=-1)  # removal key, unit per head
    k = k * (1 + (a - 1) * k_a)
    if v_first is not None:
        v = v + (v_first - v) * torch.sigmoid(v0 + value_gate_lora)

    y, state = wkv7(
        state, r.view(heads), w.view(heads), k.view(heads), v.view(heads), kappa, a.view(heads)
    )
    # GroupNorm takes (rows, C): one row per token of every sequence.
    y = F.group_norm(y.reshape(-1, h * n).to(r.dtype), h, ln_x_weight, ln_x_bias, eps=eps)
    bonus = (r * k * r_k.reshape(-1)).view(heads).sum(-1, keepdim=True) * v.view(heads)
    return (y.view(r.shape) + bonus.view(r.shape)) * gate, state
