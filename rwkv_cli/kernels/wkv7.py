"""The RWKV-7 WKV recurrence (a generalised delta rule), in plain torch.

Per head the state ``S`` is an ``N x N`` matrix indexed ``[value, key]``. For every token::

    S = S · diag(w) + (S · α) βᵀ + v kᵀ        with α = -κ and β = κ ⊙ a
    y = S r

``wkv7_sequential`` runs that loop token by token: the reference, and the one-token path.
``wkv7_chunked`` computes the same thing a chunk of tokens at a time with batched matrix
products and no per-token Python loop, which is what makes prefill fast. ``wkv7_torch``, the
torch twin, picks one by the one-token rule (kernels/decode.py). ``wkv7`` runs the compiled CUDA
kernel for inputs on a GPU where it builds (kernels/cuda.py; one sequence or a batch), else
``wkv7_torch``. (On the CPU,
one token's recurrence runs inside RWKV-7's fused time mixing, kernels/time_mix7.py.)

The chunked form. Within a chunk, with ``S0`` the state before it and ``D_t`` the product of the
decays up to token t, unrolling the recurrence gives::

    S_t = S0 · diag(D_t) + Σ_{i≤t} (u_i β_iᵀ + v_i k_iᵀ) · diag(D_t / D_i)     u_t = S_{t-1} α_t

Every ``u_t`` depends linearly on the earlier ones, so all of them come from one unit lower
triangular solve ``(I - A) U = (α ⊙ D_{t-1}) S0ᵀ + B V``, where for i < t
``A[t,i] = (α_t ⊙ D_{t-1} / D_i)·β_i`` and ``B[t,i] = (α_t ⊙ D_{t-1} / D_i)·k_i``. Outputs and
the final state follow from ``U``, ``V`` and similar masked products. The ratios ``D_t / D_i``
are factored around the chunk's midpoint so neither factor leaves float32's range (decays are at
least exp(-exp(-0.5)) ≈ 0.545 per token).
"""

from __future__ import annotations

import torch

from rwkv_cli.kernels import cuda
from rwkv_cli.kernels.decode import is_decode

CHUNK_LEN = 64  # tokens per chunk: fastest on a 2-core AVX2 CPU (see README), accurate to ~1e-6


def wkv7(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over T tokens: compiled on a GPU where the kernel builds, else
    ``wkv7_torch``.

    Args:
        state: (H, N, N) float32, indexed [head, value, key]; not modified.
        r, w, k, v, kappa, a: (T, H, N) receptance, decay (in (0, 1)), key, value,
            normalised removal key and in-context learning rate.

    A batch of B sequences, state (B, H, N, N) and the rest (B, T, H, N), runs the CUDA kernel
    on a GPU too, else ``wkv7_torch``.

    Returns:
        y: (T, H, N) float32 outputs (batched: (B, T, H, N)), and the new (H, N, N) state.
    """
    if cuda.usable(state, r, w, k, v, kappa, a, head_size=r.shape[-1]):  # one sequence or a batch
        return cuda.wkv7(state, r, w, k, v, kappa, a)
    return wkv7_torch(state, r, w, k, v, kappa, a)


def wkv7_torch(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In plain torch (same arguments and results as ``wkv7``): sequential on the one-token
    path (kernels/decode.py), else chunked (one sequence only)."""
    if is_decode(r.shape[-3]):
        return wkv7_sequential(state, r, w, k, v, kappa, a)
    return wkv7_chunked(state, r, w, k, v, kappa, a)


def wkv7_sequential(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (same arguments and results as ``wkv7``, batched too); computes in
    ``state``'s dtype."""
    # Time first, (T, ..., H, N), so that row t is one token of every sequence.
    r, w, k, v, kappa, a = (x.to(state.dtype).movedim(-3, 0) for x in (r, w, k, v, kappa, a))
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
    return y.movedim(0, -3), state


def wkv7_chunked(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
    chunk_len: int = CHUNK_LEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk by chunk (same arguments and results as ``wkv7``); computes in ``state``'s dtype."""
    dtype = state.dtype
    # (H, T, N): heads first, so every product below is a batched matmul over heads.
    r, w, k, v, kappa, a = (x.to(dtype).transpose(0, 1) for x in (r, w, k, v, kappa, a))
    alpha, beta = -kappa, kappa * a
    log_w = torch.log(w)
    outputs = []
    for start in range(0, r.shape[1], chunk_len):
        part = slice(start, start + chunk_len)
        y, state = _chunk(
            state, r[:, part], log_w[:, part], k[:, part], v[:, part], alpha[:, part], beta[:, part]
        )
        outputs.append(y)
    return torch.cat(outputs, dim=1).transpose(0, 1).contiguous(), state  # (T, H, N)


def _chunk(
    state: torch.Tensor,
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of L tokens; every argument (H, L, N), state (H, N, N)."""
    length = r.shape[1]
    inclusive = torch.cumsum(log_w, dim=1)  # log D_t
    exclusive = inclusive - log_w  # log D_{t-1}
    middle = inclusive[:, length // 2 : length // 2 + 1]  # the reference point for ratios
    state_t = state.transpose(1, 2)  # (H, N_k, N_v): row vectors times S0ᵀ

    # Query-side vectors scaled by decay since the reference, key-side by the inverse.
    alpha_q = alpha * torch.exp(exclusive - middle)
    r_q = r * torch.exp(inclusive - middle)
    beta_k = beta * torch.exp(middle - inclusive)
    k_k = k * torch.exp(middle - inclusive)

    ones = torch.ones(length, length, dtype=r.dtype, device=r.device)
    strict = torch.tril(ones, diagonal=-1)
    inclusive_mask = torch.tril(ones)
    a_beta = (alpha_q @ beta_k.transpose(1, 2)) * strict  # (H, L, L)
    a_key = (alpha_q @ k_k.transpose(1, 2)) * strict
    from_state = (alpha * torch.exp(exclusive)) @ state_t  # (H, L, N_v)
    identity = torch.eye(length, dtype=r.dtype, device=r.device)
    u = torch.linalg.solve_triangular(
        identity - a_beta, from_state + a_key @ v, upper=False, unitriangular=True
    )  # (H, L, N_v)

    y = (r * torch.exp(inclusive)) @ state_t
    y = y + ((r_q @ beta_k.transpose(1, 2)) * inclusive_mask) @ u
    y = y + ((r_q @ k_k.transpose(1, 2)) * inclusive_mask) @ v

    to_end = torch.exp(inclusive[:, -1:] - inclusive)  # D_L / D_i, at most 1
    state = (
        state * torch.exp(inclusive[:, -1]).unsqueeze(1)
        + u.transpose(1, 2) @ (beta * to_end)
        + v.transpose(1, 2) @ (k * to_end)
    )
    return y, state
