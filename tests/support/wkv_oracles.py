"""Naive float64 WKV loops, written from the formulas (docs/DESIGN.md section 4): the oracles
the kernels and their torch twins are both measured against. Same arguments as the references.
Also the arguments of a batch of sequences, for the kernels' batch dimension."""

from __future__ import annotations

import torch

from rwkv_cli.kernels.selftest import wkv_inputs

# Positions (in the references' signatures) of the arguments that are the model's, shared by the
# sequences of a batch: RWKV-4's decay and bonus, RWKV-5/6's bonus.
SHARED_ARGUMENTS = {"4": (3, 4), "5": (5,), "7": ()}


def wkv4_oracle(aa, bb, pp, w, u, k, v):
    """RWKV-4 without the running maximum: numerator and denominator kept as plain sums.

    Returns y and the state as (numerator, denominator) = (aa·e^pp, bb·e^pp).
    """
    aa, bb, pp, w, u, k, v = (x.double().cpu() for x in (aa, bb, pp, w, u, k, v))
    numerator, denominator = aa * torch.exp(pp), bb * torch.exp(pp)
    y = torch.empty_like(k)
    for t in range(k.shape[0]):
        now = torch.exp(u + k[t])
        y[t] = (numerator + now * v[t]) / (denominator + now)
        numerator = torch.exp(w) * numerator + torch.exp(k[t]) * v[t]
        denominator = torch.exp(w) * denominator + torch.exp(k[t])
    return y, numerator, denominator


def wkv5_oracle(state, r, w, k, v, u):
    state, r, w, k, v, u = (x.double().cpu().clone() for x in (state, r, w, k, v, u))
    u = torch.broadcast_to(u, r.shape[1:])
    y = torch.empty_like(r)
    for t in range(r.shape[0]):
        for h in range(r.shape[1]):
            bonus = (r[t, h] * u[h] * k[t, h]).sum() * v[t, h]
            y[t, h] = state[h] @ r[t, h] + bonus
            state[h] = state[h] * w[t, h] + torch.outer(v[t, h], k[t, h])
    return y, state


def wkv7_oracle(state, r, w, k, v, kappa, a):
    state, r, w, k, v, kappa, a = (x.double().cpu().clone() for x in (state, r, w, k, v, kappa, a))
    y = torch.empty_like(r)
    for t in range(r.shape[0]):
        for h in range(r.shape[1]):
            removed = torch.outer(state[h] @ -kappa[t, h], kappa[t, h] * a[t, h])
            state[h] = state[h] * w[t, h] + removed + torch.outer(v[t, h], k[t, h])
            y[t, h] = state[h] @ r[t, h]
    return y, state


def as_oracle_state(generation: str, outputs: tuple) -> tuple:
    """A WKV's outputs in the oracle's form (RWKV-4's scaled state as plain sums)."""
    if generation != "4":
        return outputs
    y, aa, bb, pp = (x.double().cpu() for x in outputs)
    return y, aa * torch.exp(pp), bb * torch.exp(pp)


ORACLES = {"4": wkv4_oracle, "5": wkv5_oracle, "7": wkv7_oracle}


def batched_wkv_inputs(generation: str, batch: int, tokens: int, **options) -> tuple[tuple, list]:
    """WKV arguments of ``batch`` sequences (``selftest.wkv_inputs`` with a seed each, options
    passed on) and each sequence's own: (batched arguments, [arguments of sequence b]).

    The state and token inputs are stacked along a leading batch dimension; the model's shared
    arguments are the first sequence's, for every sequence.
    """
    shared = SHARED_ARGUMENTS[generation]
    first, *rest = (wkv_inputs(generation, tokens, seed=seed, **options) for seed in range(batch))
    sequences = [first]
    for inputs in rest:
        sequences.append(tuple(first[i] if i in shared else x for i, x in enumerate(inputs)))
    batched = tuple(
        first[i] if i in shared else torch.stack([inputs[i] for inputs in sequences])
        for i in range(len(first))
    )
    return batched, sequences
