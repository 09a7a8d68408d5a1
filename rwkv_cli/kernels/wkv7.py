"""The RWKV-7 WKV recurrence (a generalised delta rule), in plain torch.

Per head the state ``S`` is an ``N x N`` matrix indexed ``[value, key]``. For every token::

    S = S · diag(w) + (S · -κ) (κ ⊙ a)ᵀ + v kᵀ
    y = S r

The loop runs over time only; heads are batched. This is the reference every faster
implementation must match.
"""

from __future__ import annotations

import torch


def wkv7(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over T tokens.

    Args:
        state: (H, N, N) float32, indexed [head, value, key]; not modified.
        r, w, k, v, kappa, a: (T, H, N) receptance, decay (in (0, 1)), key, value,
            normalised removal key and in-context learning rate.

    Returns:
        y: (T, H, N) float32 outputs, and the new (H, N, N) state.
    """
    r, w, k, v, kappa, a = (x.float() for x in (r, w, k, v, kappa, a))
    removal = (-kappa).unsqueeze(-1)  # (T, H, N, 1)
    replacement = (kappa * a).unsqueeze(-2)  # (T, H, 1, N)
    decay = w.unsqueeze(-2)  # (T, H, 1, N): decays along the key index
    values = v.unsqueeze(-1)  # (T, H, N, 1)
    keys = k.unsqueeze(-2)  # (T, H, 1, N)
    receptance = r.unsqueeze(-1)  # (T, H, N, 1)

    y = torch.empty_like(r)
    for t in range(r.shape[0]):
        removed = (state @ removal[t]) @ replacement[t]  # (H, N, N)
        state = state * decay[t] + removed + values[t] @ keys[t]
        y[t] = (state @ receptance[t]).squeeze(-1)
    return y, state
