"""The RWKV-4 WKV recurrence in its numerically stable form, in plain torch.

Per channel, WKV is a decaying weighted average of past values with weights ``e^k``:
``wkv_t = (Σ_{i<t} e^{(t-1-i)w + k_i} v_i + e^{u + k_t} v_t) / (same without v)``, with
``w = -exp(time_decay) < 0`` and the bonus ``u = time_first`` for the current token. The state
keeps numerator ``aa`` and denominator ``bb`` scaled by ``e^-pp``, ``pp`` being the largest
exponent seen, so no ``exp`` ever overflows (docs/DESIGN.md section 4)::

    out:    p = max(pp, u+k);  wkv = (e^(pp-p)·aa + e^(u+k-p)·v) / (e^(pp-p)·bb + e^(u+k-p))
    update: p = max(pp+w, k);  aa = e^(pp+w-p)·aa + e^(k-p)·v;  bb = e^(pp+w-p)·bb + e^(k-p)
            pp = p

``wkv4_torch`` loops over time only, with channels batched: the reference every faster
implementation must match. ``wkv4`` runs a compiled kernel where one builds (CUDA on a GPU,
kernels/cuda.py, for one sequence or a batch; C++ on the CPU, kernels/cpu_ops.py), else
``wkv4_torch``.
"""

from __future__ import annotations

import torch

from rwkv_cli.kernels import cpu_ops, cuda

INITIAL_MAX = -1e30  # pp of an empty state: "no exponent seen yet", e^(pp - p) is then 0


def wkv4(
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The recurrence over T tokens (arguments and results as ``wkv4_torch``), for one sequence
    or a batch: the compiled kernel of the inputs' device where it builds, else ``wkv4_torch``."""
    if cuda.usable(aa, bb, pp, w, u, k, v):  # one sequence or a batch
        return cuda.wkv4(aa, bb, pp, w, u, k, v)
    if cpu_ops.usable(aa, bb, pp, w, u):  # one sequence or a batch
        return cpu_ops.kernels().wkv4(aa, bb, pp, w, u, k, v)
    return wkv4_torch(aa, bb, pp, w, u, k, v)


def wkv4_torch(
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the recurrence over T tokens.

    Args:
        aa, bb, pp: (C,) float32 state (scaled numerator, denominator, exponent); not modified.
        w: (C,) float32 decay ``-exp(time_decay)``; u: (C,) float32 bonus ``time_first``.
        k, v: (T, C) keys and values.
        For a batch of B sequences the state is (B, C) and k, v are (B, T, C).

    Returns:
        y: (T, C) float32 outputs (batched: (B, T, C)), and the new aa, bb, pp.
    """
    k, v = k.float().movedim(-2, 0), v.float().movedim(-2, 0)  # time first: (T, ..., C)
    y = torch.empty_like(k)
    for t in range(k.shape[0]):
        kt, vt = k[t], v[t]
        current = u + kt
        top = torch.maximum(pp, current)
        past, now = torch.exp(pp - top), torch.exp(current - top)
        y[t] = (past * aa + now * vt) / (past * bb + now)
        decayed = pp + w
        top = torch.maximum(decayed, kt)
        past, now = torch.exp(decayed - top), torch.exp(kt - top)
        aa = past * aa + now * vt
        bb = past * bb + now
        pp = top
    return y.movedim(0, -2), aa, bb, pp
