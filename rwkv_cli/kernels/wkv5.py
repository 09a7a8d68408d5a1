"""The RWKV-5/6 WKV recurrence (linear attention with per-channel decay), in plain torch.

Per head the state ``S`` is an ``N x N`` matrix indexed ``[value, key]`` (the layout of RWKV-7 and
of BlinkDL's state-tuning files). For every token, with decay ``w`` and bonus ``u`` acting along
the key index::

    y = S r + (Σ_k u_k r_k k_k) v        (the current token counts with weight u instead of 1)
    S = S · diag(w) + v kᵀ

RWKV-5 has one decay per channel (or per head) for all tokens; RWKV-6 computes one per token.

``wkv5_sequential`` runs that loop token by token: the reference, and the one-token path.
``wkv5_chunked`` computes the same thing a chunk of tokens at a time with no per-token Python
loop, which is what makes prefill fast without a compiler. ``wkv5_torch``, the torch twin, picks
one by the one-token rule (kernels/decode.py). ``wkv5`` runs a compiled kernel where one builds:
CUDA for inputs on a GPU (kernels/cuda.py), C++ on the CPU (kernels/cpu_ops.py), which runs the
recurrence token by token faster than either torch form; else ``wkv5_torch``.

The chunked form. Within a chunk, with ``S0`` the state before it and ``D_t`` the product of the
decays of its tokens up to t (``D_0 = 1``), unrolling the recurrence gives::

    y_t   = S0 (r_t ⊙ D_{t-1}) + Σ_{i<t} ((r_t ⊙ D_{t-1} / D_i) · k_i) v_i + (Σ u ⊙ r_t ⊙ k_t) v_t
    S_end = S0 · diag(D_L) + Σ_i v_i (k_i ⊙ D_L / D_i)ᵀ

Nothing in a chunk but the ``S0`` terms depends on earlier chunks, so the rest is computed for
many chunks at once (``BLOCK_LEN`` tokens), and the loop over chunks only carries the state: a
scaling and two small batched matrix products per chunk.

Decays are handled as logarithms, and every factor ``D_a / D_b`` (a ≥ b) is the exponential of
a difference of cumulative sums, at most 0, so nothing overflows however strong the decays.
RWKV-7's chunked form instead splits ``D_t / D_i`` into a query and a key factor around the
chunk's midpoint; that needs decays bounded below, and RWKV-6's ``exp(-exp(x))`` in float32 turns
subnormal, then 0, for x above about 4.5. Without the split, the pair terms ``Σ_{i<t}`` take an
(L, L, N) tensor per chunk, so chunks are kept short. The cumulative sums are taken in float64 so
that a strong decay early in a chunk costs no precision later in it; see ``LOG_DECAY_FLOOR`` for
decays of (nearly) 0. In float32 the result is as accurate as the token-by-token loop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwkv_cli.kernels import cpu_ops, cuda
from rwkv_cli.kernels.decode import is_decode

CHUNK_LEN = 6  # tokens per chunk: among the fastest on a 2-core CPU for 12 and 32 heads of 64
# Median ms for 512 tokens (benchmarks/bench_wkv5.py: 2 threads, RWKV-6-like decays):
#   chunk length       4     6     8     16     32    token by token
#   12 heads of 64    8.0   7.1   7.7   10.3   27.6       21.3
#   32 heads of 64   19.3  20.5  22.7   48.7   97.5       44.8
# 4 to 8 stay within about 10% of each other, which is the noise of the shared machine; longer
# chunks lose, as the pair tensor grows with the chunk length.

# Logarithms of decays, and of their products, are clamped to at least -60 before use.
# exp(-60) ≈ 9e-27 scales the earlier tokens' terms to some 19 orders of magnitude below
# float32's resolution (6e-8), so whether such a factor is exp(-60) or smaller (or exactly 0,
# whose logarithm is -inf) changes no result unless the state outweighs the newest tokens' terms
# by 1e19. It also keeps exp() out of float32's subnormal range (below exp(-87)), slow on CPUs.
# Under autograd, the gradient with respect to a decay below exp(-60) is taken as 0 (through
# RWKV-6's w = exp(-exp(x)) the gradient with respect to x is below 1e-24 there anyway).
LOG_DECAY_FLOOR = -60.0
# Tokens whose within-chunk terms are computed at once. Bounds the memory those take (the pair
# tensors are 4·BLOCK_LEN·L·H·N bytes: 6 MiB for 32 heads of 64) and keeps them in the CPU's
# cache; 512 tokens in one block took about 1.5 times as long as blocks of 64 to 256.
BLOCK_LEN = 128


def wkv5(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over T tokens: compiled where a kernel builds (CUDA on a GPU, C++ on the
    CPU), else ``wkv5_torch``.

    Args:
        state: (H, N, N) float32, indexed [head, value, key]; not modified.
        r, w, k, v: (T, H, N) receptance, decay (in [0, 1]), key and value.
        u: (H, N) bonus for the current token.

    A batch of B sequences, state (B, H, N, N) and r, w, k, v (B, T, H, N), runs the compiled
    kernels too.

    Returns:
        y: (T, H, N) float32 outputs (batched: (B, T, H, N)), and the new (H, N, N) state.
    """
    if cuda.usable(state, r, w, k, v, u, head_size=r.shape[-1]):  # one sequence or a batch
        return cuda.wkv5(state, r, w, k, v, u)
    if cpu_ops.usable(state):  # one sequence or a batch
        return cpu_ops.kernels().wkv5(state, r, w, k, v, u)
    return wkv5_torch(state, r, w, k, v, u)


def wkv5_torch(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In plain torch (same arguments and results as ``wkv5``): sequential on the one-token
    path (kernels/decode.py), else chunked (one sequence only)."""
    if is_decode(r.shape[-3]):
        return wkv5_sequential(state, r, w, k, v, u)
    return wkv5_chunked(state, r, w, k, v, u)


def wkv5_sequential(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (same arguments and results as ``wkv5``, batched too); computes in
    ``state``'s dtype."""
    u = u.to(state.dtype)
    # Time first, (T, ..., H, N), so that row t is one token of every sequence.
    r, w, k, v = (x.to(state.dtype).movedim(-3, 0) for x in (r, w, k, v))
    bonus = (r * u * k).sum(-1, keepdim=True) * v  # (T, ..., H, N): the current token's own term
    decay = w.unsqueeze(-2)  # (T, H, 1, N): decays along the key index
    values = v.unsqueeze(-1)  # (T, H, N, 1)
    keys = k.unsqueeze(-2)  # (T, H, 1, N)
    receptance = r.unsqueeze(-1)  # (T, H, N, 1)

    y = torch.empty_like(r)
    for t in range(r.shape[0]):
        y[t] = (state @ receptance[t]).squeeze(-1) + bonus[t]
        state = state * decay[t] + values[t] @ keys[t]
    return y.movedim(0, -3), state


def wkv5_chunked(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    chunk_len: int = CHUNK_LEN,
    block_len: int = BLOCK_LEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk by chunk (same arguments and results as ``wkv5``); computes in ``state``'s dtype.

    Chunks of ``chunk_len`` tokens are processed ``block_len`` tokens (whole chunks) at a time.
    """
    r, w, k, v, u = (x.to(state.dtype) for x in (r, w, k, v, u))
    log_w = torch.log(w.clamp(min=math.exp(LOG_DECAY_FLOOR)))  # no log(0), nor its gradient
    block_len = max(block_len // chunk_len, 1) * chunk_len
    outputs = []
    for start in range(0, r.shape[0], block_len):
        part = slice(start, start + block_len)
        y, state = _block(state, r[part], log_w[part], k[part], v[part], u, chunk_len)
        outputs.append(y)
    return torch.cat(outputs), state


def _block(
    state: torch.Tensor,
    r: torch.Tensor,
    log_w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    chunk_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over one block of whole chunks: r, log_w, k, v (T, H, N), u (H, N)."""
    tokens, heads, size = r.shape
    # Padding tokens with r = k = v = 0 and decay 1 (log 0) change neither outputs nor state.
    r, log_w, k, v = (_split_into_chunks(x, chunk_len) for x in (r, log_w, k, v))

    # log D_t, summed in float64 then rounded once: float32 partial sums would carry an absolute
    # error of about |log D_t|·6e-8 into every ratio D_{t-1} / D_i, however close t and i are.
    log_decay = torch.cumsum(log_w.double(), dim=2)  # (C, H, L, N)
    inclusive = log_decay.to(r.dtype)
    rounding = (log_decay - inclusive).to(r.dtype)  # what that rounding lost, for the pair terms
    y = _within_chunks(r, inclusive, rounding, k, v, u)
    r_start = r * _decay(_shift(inclusive))  # (C, H, L, N): r_t ⊙ D_{t-1}
    k_end = k * _decay((log_decay[:, :, -1:] - log_decay).to(r.dtype))  # k_i ⊙ D_L / D_i
    chunk_decay = _decay(inclusive[:, :, -1:])  # (C, H, 1, N): D_L along the key index
    values = v.transpose(2, 3)  # (C, H, N, L)

    for c in range(r.shape[0]):
        y[c] += r_start[c] @ state.transpose(1, 2)  # (H, L, N): S0 (r_t ⊙ D_{t-1}) as rows
        # S_end = S0 · diag(D_L) + Σ_i v_i (k_i ⊙ D_L / D_i)ᵀ
        state = torch.baddbmm(state * chunk_decay[c], values[c], k_end[c])
    return y.transpose(1, 2).reshape(-1, heads, size)[:tokens], state  # (T, H, N)


def _split_into_chunks(x: torch.Tensor, chunk_len: int) -> torch.Tensor:
    """(T, H, N) -> (C, H, L, N), zero-padded to whole chunks of L = chunk_len tokens."""
    x = F.pad(x, (0, 0, 0, 0, 0, -x.shape[0] % chunk_len))
    return x.view(-1, chunk_len, *x.shape[1:]).transpose(1, 2)


def _shift(x: torch.Tensor) -> torch.Tensor:
    """Along the chunk (dim 2), row t gets row t-1 and row 0 gets 0: log D_t -> log D_{t-1}."""
    return F.pad(x[:, :, :-1], (0, 0, 1, 0))


def _decay(log_decay: torch.Tensor) -> torch.Tensor:
    """The decay factor for a log-decay of at most 0 (see LOG_DECAY_FLOOR)."""
    return torch.exp(log_decay.clamp(min=LOG_DECAY_FLOOR))


def _within_chunks(
    r: torch.Tensor,
    inclusive: torch.Tensor,
    rounding: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """The outputs' terms from the chunk's own tokens.

    Every tensor is (C, H, L, N) and u (H, N); ``inclusive`` holds log D_t rounded to r's dtype,
    ``rounding`` what the rounding lost. That correction is folded into r and k, so the pair
    tensor is a difference of two correctly rounded numbers, accurate to r's dtype's resolution.
    """
    chunk_len = r.shape[2]
    r_pair = r * torch.exp(_shift(rounding))
    k_pair = k * torch.exp(-rounding)
    # (C, H, L_t, L_i, N): log(D_{t-1} / D_i), at most 0 where i < t; the rest is masked below.
    pair_decay = _shift(inclusive).unsqueeze(3) - inclusive.unsqueeze(2)
    pair_decay.clamp_(LOG_DECAY_FLOOR, 0.0).exp_()  # in place, with autograd's consent
    pair_keys = pair_decay * k_pair.unsqueeze(2)  # k_i ⊙ D_{t-1} / D_i
    scores = (pair_keys @ r_pair.unsqueeze(-1)).squeeze(-1)  # (C, H, L_t, L_i)
    earlier = torch.ones(chunk_len, chunk_len, dtype=torch.bool, device=r.device).tril(-1)
    scores = torch.where(earlier, scores, 0.0)
    bonus = (r * u.unsqueeze(1) * k).sum(-1, keepdim=True) * v  # the current token's own term
    return scores @ v + bonus
