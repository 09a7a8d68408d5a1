"""How well a model predicts a text: perplexity and bits per byte (``rwkv perplexity``).

The text is read once, as the model would read a document, after the tokenizer's end-of-text
token (which separates documents in RWKV's training data), so every token of the text is
predicted from the ones before it. The model's log-probability of each token is summed in float64;
perplexity is ``exp(-mean log p)`` over the tokens, and bits per byte is the same sum in bits
over the text's UTF-8 bytes, which compares models whose tokenizers cut the text differently.
The logits of a chunk of tokens are computed together (one matrix product for the head), so a
text costs about as much as reading it as a prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from rwkv_cli.models import Model

CHUNK_TOKENS = 256  # tokens whose logits are held at once: 64 MiB for a 65536-token vocabulary


@dataclass(frozen=True)
class Perplexity:
    """The result of scoring a text."""

    tokens: int  # tokens predicted
    text_bytes: int  # UTF-8 bytes of the text
    negative_log_likelihood: float  # summed over the tokens, in nats
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.negative_log_likelihood / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.negative_log_likelihood / math.log(2) / self.text_bytes

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def score_text(
    model: Model,
    tokens: Sequence[int],
    text_bytes: int,
    end_of_text: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> Perplexity:
    """Score ``tokens`` (the text's, ``text_bytes`` long in UTF-8), read after the token
    ``end_of_text``: see the module docstring. ``on_progress(done, total)`` follows the tokens
    scored."""
    if not tokens:
        raise ValueError("there is no token to score")
    started = time.perf_counter()
    inputs = [end_of_text, *tokens[:-1]]  # each input predicts the token at the same position
    state, total = None, 0.0
    with torch.inference_mode():
        for start in range(0, len(tokens), CHUNK_TOKENS):
            logits, state = model.sequence_logits(inputs[start : start + CHUNK_TOKENS], state)
            targets = torch.as_tensor(tokens[start : start + CHUNK_TOKENS], device=logits.device)
            log_probs = torch.log_softmax(logits, dim=-1)  # (T, V)
            total -= log_probs.gather(-1, targets.unsqueeze(-1)).double().sum().item()
            if on_progress is not None:
                on_progress(min(start + CHUNK_TOKENS, len(tokens)), len(tokens))
    return Perplexity(len(tokens), text_bytes, total, time.perf_counter() - started)
