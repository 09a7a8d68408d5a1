"""The WKV kernels: the chunked RWKV-7 form equals the token-by-token recurrence."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.kernels.wkv7 import wkv7, wkv7_chunked, wkv7_sequential

EXP_MINUS_HALF = 0.6065306597126334


def _inputs(tokens: int, heads: int = 3, size: int = 64, decay_spread: float = 3.0, seed: int = 0):
    """Random recurrence inputs shaped like the model's; decays span RWKV-7's whole range."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (tokens, heads, size)
    w = torch.exp(-EXP_MINUS_HALF * torch.sigmoid(randn(*shape) * decay_spread))
    kappa = torch.nn.functional.normalize(randn(*shape), dim=-1)
    a = torch.sigmoid(randn(*shape))
    return randn(heads, size, size), randn(*shape), w, randn(*shape), randn(*shape), kappa, a


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("chunk_len", [1, 7, 64])
@pytest.mark.parametrize("tokens", [1, 100, 129])
def test_chunked_equals_sequential_in_float64(chunk_len, tokens) -> None:
    inputs = _inputs(tokens)
    expected_y, expected_state = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*inputs, chunk_len=chunk_len)
    assert _relative_error(y, expected_y) < 1e-12
    assert _relative_error(state, expected_state) < 1e-12


@pytest.mark.parametrize("chunk_len", [1, 7, 64, 128])
def test_chunked_float32_stays_close_to_the_float64_oracle(chunk_len) -> None:
    inputs = _inputs(300)
    expected_y, expected_state = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*(x.float() for x in inputs), chunk_len=chunk_len)
    assert y.dtype == state.dtype == torch.float32
    assert _relative_error(y, expected_y) < 1e-5
    assert _relative_error(state, expected_state) < 1e-5


def test_the_strongest_decay_stays_finite_over_long_chunks() -> None:
    inputs = list(_inputs(256))
    inputs[2] = torch.full_like(inputs[2], float(torch.exp(torch.tensor(-EXP_MINUS_HALF))))
    expected_y, _ = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*(x.float() for x in inputs), chunk_len=128)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert _relative_error(y, expected_y) < 1e-5


def test_inputs_are_not_modified_and_outputs_are_contiguous() -> None:
    inputs = [x.float() for x in _inputs(70)]
    copies = [x.clone() for x in inputs]
    y, _ = wkv7(*inputs)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies, strict=True))
    assert y.is_contiguous() and y.shape == (70, 3, 64)
