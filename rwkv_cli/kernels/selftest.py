"""Checking compiled WKV kernels against their torch twins on random inputs.

``wkv_inputs`` makes the arguments of one generation's WKV, shaped and ranged like a model's;
``compare_with_torch`` runs compiled implementations and the torch references on the same inputs
and raises KernelSelfTestError where they differ. The kernels' ``self_test()`` functions (which
``rwkv doctor`` calls) and the tests use both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rwkv_cli.kernels.build import KernelSelfTestError
from rwkv_cli.kernels.wkv4 import wkv4_torch
from rwkv_cli.kernels.wkv5 import wkv5_sequential
from rwkv_cli.kernels.wkv7 import wkv7_sequential

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The three WKV recurrences: RWKV-4; RWKV-5 and 6 (one kernel); RWKV-7.
TORCH_REFERENCES: dict[str, Callable] = {
    "4": wkv4_torch,
    "5": wkv5_sequential,
    "7": wkv7_sequential,
}
# Both sides read the same (rounded) inputs and compute in float32, so they differ only by the
# order of float32 operations: about 1e-6 over a few dozen tokens.
TOLERANCE = 1e-4
EXP_MINUS_HALF = 0.6065306597126334  # RWKV-7 decays are exp(-exp(-0.5)·σ(·)) in (0.545, 1)


def wkv_inputs(
    generation: str,
    tokens: int,
    heads: int = 2,
    head_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    state_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Random arguments for ``generation``'s WKV, in the reference's order.

    Token inputs (k, v, r, kappa, a) are ``dtype``; the state, decays and bonuses are
    ``state_dtype``. Values come from a seeded CPU generator, so every device gets the same ones.
    RWKV-4 has ``heads * head_size`` channels.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def finish(*tensors: torch.Tensor, token_inputs: set[int]) -> tuple[torch.Tensor, ...]:
        return tuple(
            x.to(device=device, dtype=dtype if i in token_inputs else state_dtype)
            for i, x in enumerate(tensors)
        )

    shape = (tokens, heads, head_size)
    if generation == "4":
        c = heads * head_size
        aa, bb, pp = randn(c), torch.rand(c, generator=g, dtype=torch.float64) + 0.5, randn(c)
        w, u = -torch.exp(randn(c)), randn(c)
        return finish(aa, bb, pp, w, u, randn(tokens, c), randn(tokens, c), token_inputs={5, 6})
    state = randn(heads, head_size, head_size)
    if generation == "5":
        w = torch.exp(-torch.exp(randn(*shape) - 1))  # in (0, 1), mostly close to 1
        u = randn(heads, head_size) * 0.5
        return finish(
            state, randn(*shape), w, randn(*shape), randn(*shape), u, token_inputs={1, 3, 4}
        )
    if generation == "7":
        w = torch.exp(-EXP_MINUS_HALF * torch.sigmoid(randn(*shape) * 3))
        kappa = torch.nn.functional.normalize(randn(*shape), dim=-1)
        a = torch.sigmoid(randn(*shape))
        inputs = (state, randn(*shape), w, randn(*shape), randn(*shape), kappa, a)
        return finish(*inputs, token_inputs={1, 3, 4, 5, 6})
    raise ValueError(f"unknown WKV generation {generation!r}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``|actual - expected| / |expected|`` in float64 (Frobenius norms), on the CPU: either may
    live on a GPU."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def compare_with_torch(
    implementations: dict[str, Callable],
    device: torch.device | str,
    tokens: int = 33,
    dtypes: tuple[torch.dtype, ...] = INPUT_DTYPES,
) -> float:
    """Run each implementation (keyed by generation, with its torch reference's signature) and
    the torch reference on the same random inputs on ``device``, in every input dtype.

    Returns the worst relative error; raises KernelSelfTestError naming the first output that
    differs by more than TOLERANCE (or is not finite).
    """
    worst = 0.0
    for generation, implementation in implementations.items():
        for dtype in dtypes:
            inputs = wkv_inputs(generation, tokens, dtype=dtype, device=device)
            actual = implementation(*inputs)
            expected = TORCH_REFERENCES[generation](*inputs)
            for index, (got, want) in enumerate(zip(actual, expected, strict=True)):
                error = relative_error(got, want)
                if not error <= TOLERANCE:  # also catches nan
                    raise KernelSelfTestError(
                        f"the compiled WKV of RWKV-{generation} differs from the torch path with "
                        f"{str(dtype).removeprefix('torch.')} inputs: output {index} has relative "
                        f"error {error:.1e}",
                        hint="run with --kernel torch, and please report this",
                    )
                worst = max(worst, error)
    return worst
