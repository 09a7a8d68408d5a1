"""The RWKV-5/6 WKV recurrence (linear attention with per-channel decay), in plain torch.

Per head the state ``S`` is an ``N x N`` matrix indexed ``[value, key]`` (the layout of RWKV-7 and
of BlinkDL's state-tuning files). For every token, with decay ``w`` and bonus ``u`` acting along
the key index::

    y = S r + (Σ_k u_k r_k k_k) v        (the current token counts with weight u instead of 1)
    S = S · diag(w) + v kᵀ

RWKV-5 has one decay per channel (or per head) for all tokens; RWKV-6 computes one per token.
The loop runs over time only; heads are batched. This is the reference every faster
implementation must match.
"""

from __future__ import annotations

import torch


def wkv5(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over T tokens.

    Args:
        state: (H, N, N) float32, indexed [head, value, key]; not modified.
        r, w, k, v: (T, H, N) receptance, decay (in (0, 1)), key and value.
        u: (H, N) bonus for the current token.

    Returns:
        y: (T, H, N) float32 outputs, and the new (H, N, N) state.
    """
    r, w, k, v, u = (x.float() for x in (r, w, k, v, u))
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # (T, H, N): the current token's own term
    decay = w.unsqueeze(-2)  # (T, H, 1, N): decays along the key index
    values = v.unsqueeze(-1)  # (T, H, N, 1)
    keys = k.unsqueeze(-2)  # (T, H, 1, N)
    receptance = r.unsqueeze(-1)  # (T, H, N, 1)

    y = torch.empty_like(r)
    for t in range(r.shape[0]):
        y[t] = (state @ receptance[t]).squeeze(-1) + bonus[t]
        state = state * decay[t] + values[t] @ keys[t]
    return y, state
