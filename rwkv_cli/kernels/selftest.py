"""Checking the compiled kernels against their torch twins on random inputs.

``cpu_self_test`` and ``cuda_self_test`` build the compiled kernels of one device type and compare
every op with its twin; ``rwkv doctor`` runs them. ``wkv_inputs`` makes the arguments of one
generation's WKV, shaped and ranged like a model's; ``compare_with_torch`` runs compiled WKV
implementations and the torch references on the same inputs and raises KernelSelfTestError where
they differ. The tests use both too.

This module imports the op modules; they never import it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rwkv_cli.kernels import cpu_ops, cuda
from rwkv_cli.kernels.build import KernelBuildError, KernelSelfTestError, load_extension
from rwkv_cli.kernels.linear import quantize_int4, quantize_int8
from rwkv_cli.kernels.time_mix7 import EXP_MINUS_HALF, time_mix7_torch
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
# The CPU's projections and RWKV-7 time mixing: both sides compute in float32 from the same
# inputs, over a single token (a few rows each computed alone, for projections); only the order
# of operations differs.
ONE_TOKEN_TOLERANCE = 1e-5
GROUP_NORM_EPS = 64e-5  # as RWKV-7's ln_x
# Rows of input the projections are checked with: one token; odd counts, which leave a row over
# after the kernel's pairs of rows; and more than one group of 16 rows.
GEMV_ROWS = (1, 2, 3, 5, 16, 17)
# The arguments of each WKV (by position, as ``wkv_inputs`` makes them) that are the layer's
# weights: every sequence of a batch shares them, while the rest get a leading batch dimension.
SHARED_INPUTS: dict[str, frozenset[int]] = {
    "4": frozenset({3, 4}),  # w, u
    "5": frozenset({5}),  # u
    "7": frozenset(),
}
SELF_TEST_BATCH = 3  # sequences the kernels' batch dimension is checked with


def cpu_self_test() -> str:
    """Build the CPU kernels (whatever the kernel choice) and compare each with its torch twin on
    random inputs. Returns a one-line summary; raises KernelBuildError when they do not build and
    KernelSelfTestError when a result differs."""
    ops = cpu_ops.CpuKernels(load_extension(cpu_ops.EXTENSION, retry=True))
    recurrences = {"4": ops.wkv4, "5": ops.wkv5}
    wkv_errors = [
        compare_with_torch(recurrences, device="cpu"),
        compare_with_torch(recurrences, device="cpu", tokens=1, batch=SELF_TEST_BATCH),
    ]
    worst = max([*_gemv_errors(ops), *_time_mix_errors(ops), *wkv_errors])
    return (
        "projections of 1 to 17 rows (fp32, bf16, fp16, int8), RWKV-7 one-token time mixing "
        "and the RWKV-4 and 5/6 recurrences, alone and batched, match the torch path "
        f"(largest relative error {worst:.0e})"
    )


def cuda_self_test() -> str:
    """Build the CUDA kernels (whatever the kernel choice) and compare each WKV with its torch
    twin on small random inputs on the current GPU, with fp32, fp16 and bf16 inputs.

    Returns a one-line summary, as ``cpu_self_test``. Raises KernelBuildError when there is no
    GPU or the kernels do not build, and KernelSelfTestError when a result differs.
    """
    if not torch.cuda.is_available():
        raise KernelBuildError("no CUDA GPU is available")
    load_extension(cuda.EXTENSION, retry=True)
    worst = compare_with_torch({"4": cuda.wkv4, "5": cuda.wkv5, "7": cuda.wkv7}, device="cuda")
    return (
        "RWKV-4, 5/6 and 7 kernels match the torch path with fp32, fp16 and bf16 inputs "
        f"(largest relative error {worst:.0e})"
    )


def wkv_inputs(
    generation: str,
    tokens: int,
    heads: int = 2,
    head_size: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    state_dtype: torch.dtype = torch.float32,
    batch: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random arguments for ``generation``'s WKV, in the reference's order.

    Token inputs (k, v, r, kappa, a) are ``dtype``; the state, decays and bonuses are
    ``state_dtype``. Values come from a seeded CPU generator, so every device gets the same ones.
    RWKV-4 has ``heads * head_size`` channels. With ``batch``, the arguments of that many
    sequences: a leading batch dimension on all but the ``SHARED_INPUTS``.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def finish(*tensors: torch.Tensor, token_inputs: set[int]) -> tuple[torch.Tensor, ...]:
        return tuple(
            x.to(device=device, dtype=dtype if i in token_inputs else state_dtype)
            for i, x in enumerate(tensors)
        )

    lead = () if batch is None else (batch,)  # the batch dimension
    shape = (*lead, tokens, heads, head_size)
    if generation == "4":
        c = heads * head_size
        aa, bb = randn(*lead, c), torch.rand(*lead, c, generator=g, dtype=torch.float64) + 0.5
        pp, w, u = randn(*lead, c), -torch.exp(randn(c)), randn(c)
        k, v = randn(*lead, tokens, c), randn(*lead, tokens, c)
        return finish(aa, bb, pp, w, u, k, v, token_inputs={5, 6})
    state = randn(*lead, heads, head_size, head_size)
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


def one_sequence(generation: str, inputs: tuple[torch.Tensor, ...], row: int) -> tuple:
    """The arguments of sequence ``row`` alone, out of a batch's (``wkv_inputs`` with batch)."""
    shared = SHARED_INPUTS[generation]
    return tuple(x if index in shared else x[row] for index, x in enumerate(inputs))


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
    batch: int | None = None,
) -> float:
    """Run each implementation (keyed by generation, with its torch reference's signature) and
    the torch reference on the same random inputs on ``device``, in every input dtype, for one
    sequence or ``batch`` sequences (``wkv_inputs``).

    Returns the worst relative error; raises KernelSelfTestError naming the first output that
    differs by more than TOLERANCE (or is not finite).
    """
    worst = 0.0
    for generation, implementation in implementations.items():
        for dtype in dtypes:
            inputs = wkv_inputs(generation, tokens, dtype=dtype, device=device, batch=batch)
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


def _one_token_error(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    error = relative_error(actual, expected)
    if not error <= ONE_TOKEN_TOLERANCE:  # also catches NaN
        raise KernelSelfTestError(f"compiled {name} differs from the torch path ({error:.1e})")
    return error


def _gemv_errors(ops: cpu_ops.CpuKernels) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(203, 77, generator=generator)  # odd sizes: the tails are checked too
    quantized = quantize_int8(weight)
    quantized4 = quantize_int4(weight[:, :64])  # int4 rows are whole groups
    errors = []
    for rows in GEMV_ROWS:
        x = torch.randn(rows, 77, generator=generator)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            narrow = weight.to(dtype)
            expected = F.linear(x, narrow.float())
            actual = ops.gemv(x, narrow, None)
            errors.append(_one_token_error(actual, expected, f"{dtype} gemv over {rows} rows"))
        for name, matrix in (("int8", quantized), ("int4", quantized4)):
            expected = F.linear(x[:, : matrix.shape[1]], matrix.dequantize())
            actual = ops.gemv(x[:, : matrix.shape[1]].contiguous(), matrix.values, matrix.scale)
            errors.append(_one_token_error(actual, expected, f"{name} gemv over {rows} rows"))
    return errors


# RWKV-7 time mixing's arguments: the state, the token's six inputs (r, k, v, gate, decay and
# in-context learning rate LoRAs) and the layer's by name.
TimeMixArguments = tuple[torch.Tensor, tuple[torch.Tensor, ...], dict]
# The layer's arguments that hold one row per sequence (the rest are the layer's weights).
_TIME_MIX_PER_SEQUENCE = ("v_first", "value_gate_lora")


def time_mix_inputs(
    batch: int | None, first_layer: bool, heads: int = 3, head_size: int = 16, seed: int = 1
) -> TimeMixArguments:
    """Random arguments of RWKV-7's one-token time mixing (``time_mix7_torch``) in the first
    layer (no value residual) or a later one; with ``batch``, of that many sequences (a leading
    batch dimension on the state, the token's inputs and the value residual's)."""
    generator = torch.Generator().manual_seed(seed)
    lead, channels = (() if batch is None else (batch,)), heads * head_size

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    state = randn(*lead, heads, head_size, head_size)
    inputs = tuple(randn(*lead, 1, channels) for _ in range(6))
    layer = {name: randn(channels) for name in ("w0", "a0", "k_k", "k_a")}
    layer |= {"ln_x_weight": randn(channels), "ln_x_bias": randn(channels)}
    layer |= {"r_k": randn(heads, head_size), "eps": GROUP_NORM_EPS}
    if not first_layer:
        layer |= {name: randn(*lead, 1, channels) for name in _TIME_MIX_PER_SEQUENCE}
        layer["v0"] = randn(channels)
    return state, inputs, layer


def time_mix_sequence(arguments: TimeMixArguments, row: int) -> TimeMixArguments:
    """The arguments of sequence ``row`` alone, out of a batch's (``time_mix_inputs``)."""
    state, inputs, layer = arguments
    rows = {name: layer[name][row] for name in _TIME_MIX_PER_SEQUENCE if name in layer}
    return state[row], tuple(x[row] for x in inputs), layer | rows


def _time_mix_errors(ops: cpu_ops.CpuKernels) -> list[float]:
    """RWKV-7's time mixing in a later layer (with the value residual) and in the first, for
    one sequence and a batch."""
    errors = []
    for batch in (None, SELF_TEST_BATCH):
        for first_layer in (False, True):
            state, inputs, layer = time_mix_inputs(batch, first_layer)
            expected = time_mix7_torch(state, *inputs, **layer)
            actual = ops.time_mix7(state, *inputs, **layer)
            for got, want, name in zip(actual, expected, ("output", "state"), strict=True):
                errors.append(_one_token_error(got, want, f"RWKV-7 time mixing {name}"))
    return errors
