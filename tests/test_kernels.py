"""The WKV kernels: the chunked RWKV-5/6 and RWKV-7 forms equal the token-by-token recurrences."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from rwkv_cli.kernels.wkv5 import CHUNK_LEN as WKV5_CHUNK_LEN
from rwkv_cli.kernels.wkv5 import wkv5, wkv5_chunked, wkv5_sequential
from rwkv_cli.kernels.wkv7 import wkv7, wkv7_chunked, wkv7_sequential
from tests.support.numerics import relative_error

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


@pytest.mark.parametrize("chunk_len", [1, 7, 64])
@pytest.mark.parametrize("tokens", [1, 100, 129])
def test_chunked_equals_sequential_in_float64(chunk_len, tokens) -> None:
    inputs = _inputs(tokens)
    expected_y, expected_state = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*inputs, chunk_len=chunk_len)
    assert relative_error(y, expected_y) < 1e-12
    assert relative_error(state, expected_state) < 1e-12


@pytest.mark.parametrize("chunk_len", [1, 7, 64, 128])
def test_chunked_float32_stays_close_to_the_float64_oracle(chunk_len) -> None:
    inputs = _inputs(300)
    expected_y, expected_state = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*(x.float() for x in inputs), chunk_len=chunk_len)
    assert y.dtype == state.dtype == torch.float32
    assert relative_error(y, expected_y) < 1e-5
    assert relative_error(state, expected_state) < 1e-5


def test_the_strongest_decay_stays_finite_over_long_chunks() -> None:
    inputs = list(_inputs(256))
    inputs[2] = torch.full_like(inputs[2], float(torch.exp(torch.tensor(-EXP_MINUS_HALF))))
    expected_y, _ = wkv7_sequential(*inputs)
    y, state = wkv7_chunked(*(x.float() for x in inputs), chunk_len=128)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    assert relative_error(y, expected_y) < 1e-5


def test_inputs_are_not_modified_and_outputs_are_contiguous() -> None:
    inputs = [x.float() for x in _inputs(70)]
    copies = [x.clone() for x in inputs]
    y, _ = wkv7(*inputs)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies, strict=True))
    assert y.is_contiguous() and y.shape == (70, 3, 64)


# RWKV-5/6. RWKV-6's decays are exp(-exp(x)) computed in float32: 1 for x below about -17,
# exactly 0 above about 4.6, subnormal in between near there.
EXTREME_DECAYS = {
    "zero": 0.0,
    "subnormal": 1e-40,
    "1e-30": 1e-30,
    "exp(-20)": 2.061153622438558e-09,
    "half": 0.5,
    "one minus 1e-7": 1 - 1e-7,
    "one": 1.0,
}


def _wkv5_inputs(tokens: int, heads: int = 3, size: int = 64, seed: int = 0, decays=None):
    """Random RWKV-5/6 recurrence inputs (float64); RWKV-6-like decays, or drawn from ``decays``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    shape = (tokens, heads, size)
    if decays is None:
        w = torch.exp(-torch.exp(randn(*shape) * 2 - 1))
    else:
        choice = torch.randint(len(decays), shape, generator=g)
        w = torch.tensor(decays, dtype=torch.float64)[choice]
    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    return randn(heads, size, size), r, w, k, v, randn(heads, size)


def _assert_close(actual: tuple, expected: tuple, tolerance: float) -> None:
    """Each of the outputs (y, state) within ``tolerance`` relative error of the expected one."""
    for got, want in zip(actual, expected, strict=True):
        assert relative_error(got, want) < tolerance


@pytest.mark.parametrize("chunk_len", [1, 7, 64])
@pytest.mark.parametrize("tokens", [1, 100, 150])
def test_wkv5_chunked_equals_sequential_in_float64(chunk_len, tokens) -> None:
    inputs = _wkv5_inputs(tokens)
    _assert_close(wkv5_chunked(*inputs, chunk_len=chunk_len), wkv5_sequential(*inputs), 1e-12)


@pytest.mark.parametrize("chunk_len", [1, 7, WKV5_CHUNK_LEN, 64, 512])
def test_wkv5_chunked_float32_is_as_accurate_as_the_sequential_loop(chunk_len) -> None:
    inputs = _wkv5_inputs(300)
    outputs = wkv5_chunked(*(x.float() for x in inputs), chunk_len=chunk_len)
    assert all(x.dtype == torch.float32 for x in outputs)
    _assert_close(outputs, wkv5_sequential(*inputs), 1e-6)  # the float32 loop: about 2e-7


@pytest.mark.parametrize("chunk_len", [WKV5_CHUNK_LEN, 64])
@pytest.mark.parametrize(
    "decays",
    [[value] for value in EXTREME_DECAYS.values()] + [list(EXTREME_DECAYS.values())],
    ids=[*EXTREME_DECAYS, "all mixed"],
)
def test_wkv5_extreme_decays_stay_finite_and_accurate(chunk_len, decays) -> None:
    inputs = [x.float() for x in _wkv5_inputs(200, decays=decays)]
    outputs = wkv5_chunked(*inputs, chunk_len=chunk_len)
    assert all(torch.isfinite(x).all() for x in outputs)
    # The oracle reads the same float32 inputs: 1 - 1e-7 is 1 - 1.19e-7 in float32, and that
    # rounding alone moves the float64 result by more than the kernel's own error.
    _assert_close(outputs, wkv5_sequential(*(x.double() for x in inputs)), 1e-6)


def test_wkv5_rwkv5_decay_expanded_over_time_and_half_precision_tokens() -> None:
    state, r, w, k, v, u = _wkv5_inputs(40)
    w = w[0].expand_as(r)  # RWKV-5: one decay per channel for every token, a stride-0 view
    r, k, v = (x.to(torch.bfloat16) for x in (r, k, v))
    state, w, u = state.float(), w.float(), u.float()
    outputs = wkv5(state, r, w, k, v, u)
    assert all(x.dtype == torch.float32 for x in outputs)
    _assert_close(outputs, wkv5_sequential(state, r, w, k, v, u), 1e-6)


@pytest.mark.parametrize("tokens", [1, 5, 70])
def test_wkv5_inputs_are_not_modified_and_outputs_are_contiguous(tokens) -> None:
    inputs = [x.float() for x in _wkv5_inputs(tokens)]
    copies = [x.clone() for x in inputs]
    y, state = wkv5(*inputs)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies, strict=True))
    assert y.is_contiguous() and y.shape == (tokens, 3, 64)
    assert state.is_contiguous() and state.shape == (3, 64, 64)


def _wkv5_gradients(kernel, inputs) -> tuple[torch.Tensor, ...]:
    inputs = [x.clone().requires_grad_() for x in inputs]
    y, state = kernel(*inputs)
    return torch.autograd.grad((y * torch.sin(y)).sum() + state.square().sum(), inputs)


def test_wkv5_chunked_gradients_equal_the_loops() -> None:
    state, r, w, k, v, u = _wkv5_inputs(40, heads=2, size=8)
    inputs = (state, r, w.clamp(min=0.05), k, v, u)  # no decay below the floor: all exact
    chunked = _wkv5_gradients(partial(wkv5_chunked, chunk_len=7), inputs)
    for got, want in zip(chunked, _wkv5_gradients(wkv5_sequential, inputs), strict=True):
        assert relative_error(got, want) < 1e-12


def test_wkv5_chunked_gradients_stay_finite_for_decays_of_zero() -> None:
    inputs = _wkv5_inputs(40, heads=2, size=8, decays=list(EXTREME_DECAYS.values()))
    gradients = _wkv5_gradients(partial(wkv5_chunked, chunk_len=7), inputs)
    assert all(torch.isfinite(g).all() for g in gradients)
