"""Choosing the next token from the model's logits.

Everything here is a pure function: inputs are never modified, and all randomness comes from an
explicit ``torch.Generator`` that the caller owns, so a seed reproduces a generation exactly.

The order of operations in :func:`sample_token` is: temperature, then top-k, then top-p (nucleus)
on what is left, then one draw. Repetition penalties are applied to the logits beforehand with
:func:`apply_penalties`, using decayed occurrence counts kept by :func:`update_counts`.
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

from rwkv_cli.errors import InvalidInputError, ModelOutputError
from rwkv_cli.settings import MAX_SEED, SamplingParams  # where the parameters live (no torch)

# Fresh seeds are drawn from 63 bits so they stay positive in any signed 64-bit field (JSON
# readers, other languages) while leaving far more seeds than anyone will ever try.
_RANDOM_SEED_BITS = 63

# The float32 running total of the sorted probabilities carries rounding error, so a nucleus
# boundary that is reached exactly on paper (0.38 + 0.32 against top-p 0.7) can land a few ulps
# below it. Treating "within this much of top-p" as reached keeps such boundaries where the user
# expects; 1e-6 is roughly ten float32 ulps near 1 and far below any top-p anyone would type.
_TOP_P_SLACK = 1e-6

# Top-p first looks for the nucleus among this many most probable tokens, then among
# _CANDIDATE_GROWTH times as many, and so on; past 1/_CANDIDATE_GROWTH of the vocabulary it sorts
# everything instead, since a top-k that large costs about as much as a full sort.
_FIRST_CANDIDATES = 64
_CANDIDATE_GROWTH = 8


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """Return a CPU generator seeded with ``seed`` (or a fresh random seed) and the seed used."""
    if seed is None:
        seed = secrets.randbits(_RANDOM_SEED_BITS)
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator, seed


def new_counts(vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Occurrence counts for a fresh generation: float32 zeros of shape (vocab_size,)."""
    return torch.zeros(vocab_size, dtype=torch.float32, device=device)


def update_counts(counts: Tensor, token: int, decay: float) -> Tensor:
    """Return ``counts`` decayed by ``decay`` with one more occurrence of ``token``."""
    if not 0 <= token < counts.shape[0]:
        raise ValueError(f"token {token} is outside the vocabulary of size {counts.shape[0]}")
    updated = counts * decay
    updated[token] += 1.0
    return updated


def apply_penalties(logits: Tensor, counts: Tensor, params: SamplingParams) -> Tensor:
    """Return ``logits - presence * (counts > 0) - frequency * counts``.

    When both penalties are 0 this returns ``logits`` itself rather than a copy; it is never
    modified either way, but callers that edit the result in place should clone it first.
    ``counts`` is moved to the logits' device if needed (create it there to avoid the copy).
    """
    if params.presence_penalty == 0 and params.frequency_penalty == 0:
        return logits
    counts = counts.to(logits.device)
    seen = (counts > 0).to(torch.float32)
    return logits - params.presence_penalty * seen - params.frequency_penalty * counts


def sample_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Choose one token id from 1-D ``logits`` of shape (V,).

    Tokens whose logit is -inf are never chosen. ``generator`` is drawn from only when more than
    one token remains after filtering, so temperature 0 (argmax) leaves it untouched.
    """
    probs, token_ids = sampling_distribution(logits, params)  # (K,), (K,)
    if probs.shape[0] == 1:
        return int(token_ids[0])
    choice = int(torch.multinomial(probs, 1, generator=generator))
    return int(token_ids[choice])


def sampling_distribution(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """The tokens :func:`sample_token` may choose and their probabilities, as ``(probs, ids)``.

    Both are 1-D float32/int64 CPU tensors of the same length K; ``probs`` sums to 1 and may hold
    zeros for -inf logits. The work over the whole vocabulary is done in float32 where the logits
    are; only the candidates (one id when greedy, a few dozen for top-p) are read back to the
    CPU, in one copy, and drawn from there with the caller's generator, so a seed gives the same
    tokens whatever device produced the logits.
    """
    if logits.dim() != 1:
        raise ValueError(f"logits must be 1-D (vocab,), got shape {tuple(logits.shape)}")
    logits = logits.detach().float()
    top = logits.max()
    if params.temperature == 0:
        top, token_id = _read_back(top, torch.argmax(logits))
        _require_finite(top)
        return torch.ones(1), token_id.reshape(1)

    # Subtracting the max before dividing keeps a tiny temperature from overflowing to inf.
    tempered = (logits - top) / params.temperature  # (V,)
    vocab_size = tempered.shape[0]
    if 0 < params.top_k < vocab_size:
        kept_logits, token_ids = torch.topk(tempered, params.top_k)  # (k,), most probable first
        top, kept_logits, token_ids = _read_back(top, kept_logits, token_ids)
        probs = torch.softmax(kept_logits, dim=0)
    elif params.top_p < 1:
        top, probs, token_ids = _most_probable(top, torch.softmax(tempered, dim=0), params.top_p)
    else:
        top, probs = _read_back(top, torch.softmax(tempered, dim=0))
        token_ids = torch.arange(vocab_size)
    _require_finite(top)

    if params.top_p < 1:
        size = _nucleus_size(probs, params.top_p)
        probs, token_ids = probs[:size], token_ids[:size]
        probs = probs / probs.sum()
    return probs, token_ids


def token_logprobs(logits: Tensor, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``token`` under softmax(``logits``) (1-D, (V,)), and the ``top``
    most probable tokens with theirs, most probable first; read back in one copy."""
    logprobs = torch.log_softmax(logits.detach().float(), dim=0)  # (V,)
    best, ids = torch.topk(logprobs, top)  # (top,), (top,)
    chosen, best, ids = _read_back(logprobs[token], best, ids)
    return float(chosen), list(zip(ids.tolist(), best.tolist(), strict=True))


def _most_probable(top: Tensor, probs: Tensor, top_p: float) -> tuple[Tensor, Tensor, Tensor]:
    """The most probable of ``probs``, descending with their ids: at least the top-p nucleus;
    read back to the CPU with ``top``.

    The nucleus is usually a few dozen tokens, so this looks at a small top-k first and widens it
    only when that falls short; at V = 65536 a top-64 costs about 1/60 of a full sort.
    """
    vocab_size = probs.shape[0]
    size = _FIRST_CANDIDATES
    while size * _CANDIDATE_GROWTH <= vocab_size:
        top_host, top_probs, token_ids = _read_back(top, *torch.topk(probs, size))
        if _count_short_of(top_probs, top_p) < size:
            return top_host, top_probs, token_ids
        size *= _CANDIDATE_GROWTH
    return _read_back(top, *torch.sort(probs, descending=True, stable=True))


def _read_back(*tensors: Tensor) -> list[Tensor]:
    """``tensors`` on the CPU, from a GPU in one copy (one wait): float64 holds float32 values
    and token ids exactly."""
    if all(tensor.device.type == "cpu" for tensor in tensors):
        return list(tensors)
    flat = torch.cat([tensor.reshape(-1).double() for tensor in tensors]).cpu()
    parts = flat.split([tensor.numel() for tensor in tensors])
    return [part.to(t.dtype).view(t.shape) for part, t in zip(parts, tensors, strict=True)]


def _require_finite(top: Tensor) -> None:
    # The largest logit is -inf when every token is banned, +inf or nan when the model misbehaved.
    if not torch.isfinite(top):
        raise ModelOutputError(
            f"cannot sample the next token: the model's largest score is {top.item()}",
            hint="16-bit weights can overflow: try --dtype fp32; if that fails too, the "
            "checkpoint's weights are damaged",
        )


def _nucleus_size(sorted_probs: Tensor, top_p: float) -> int:
    """How many of the descending ``sorted_probs`` it takes for their sum to reach ``top_p``.

    That is the entries still short of top_p plus the one that reaches it: at least one token,
    and all of them when even their total falls short.
    """
    return min(_count_short_of(sorted_probs, top_p) + 1, sorted_probs.shape[0])


def _count_short_of(sorted_probs: Tensor, top_p: float) -> int:
    """How many leading entries of the descending ``sorted_probs`` have a running total < top_p."""
    cumulative = torch.cumsum(sorted_probs, dim=0)
    return int((cumulative < top_p - _TOP_P_SLACK).sum())
