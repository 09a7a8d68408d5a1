"""The compiled CPU kernels (``csrc/cpu_*.cpp``), each with a torch twin that means the same:

- ``gemv``: one token's projection with float32, bfloat16, float16 or int8 weights, streamed at
  close to the memory bandwidth (twin: ``torch.nn.functional.linear``; see kernels/linear.py);
- ``rwkv7_time_mix_one``: RWKV-7's time mixing between the projections for one token, in one
  pass (twin: ``models.rwkv7.mix_projections``);
- ``wkv4_cpu``: the RWKV-4 recurrence (twin: ``kernels.wkv4.wkv4_torch``);
- ``wkv5_cpu``: the RWKV-5/6 recurrence (twins: ``kernels.wkv5.wkv5_sequential`` and
  ``wkv5_chunked``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_cli.kernels.build import Extension, KernelSelfTestError, compiled_ops, load_extension

EXTENSION = Extension("rwkv_cpu", ("cpu_gemv.cpp", "cpu_rwkv7.cpp", "cpu_wkv4.cpp", "cpu_wkv5.cpp"))
TOLERANCE = 1e-5  # both sides compute in float32 from the same inputs; only the order differs


def self_test() -> str:
    """Build the CPU kernels (whatever the kernel choice) and compare each with its torch twin on
    random inputs. Returns a one-line summary; raises KernelBuildError when they do not build and
    KernelSelfTestError when a result differs (``rwkv doctor`` calls this)."""
    from rwkv_cli.kernels.selftest import compare_with_torch  # it imports the dispatchers

    load_extension(EXTENSION, retry=True)
    wkv_error = compare_with_torch({"4": wkv4, "5": wkv5}, device="cpu")
    worst = max([*_gemv_errors(), _time_mix_error(), wkv_error])
    return (
        "matrix-vector products (fp32, bf16, fp16, int8), RWKV-7 one-token time mixing and the "
        f"RWKV-4 and 5/6 recurrences match the torch path (largest relative error {worst:.0e})"
    )


def wkv4(
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """RWKV-4's WKV compiled; arguments and results as ``kernels.wkv4.wkv4_torch``."""
    k, v = (x.float().contiguous() for x in (k, v))
    return tuple(torch.ops.rwkv_cli.wkv4_cpu(aa, bb, pp, w, u, k, v))


def wkv5(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """RWKV-5/6's WKV compiled; arguments and results as ``kernels.wkv5.wkv5``."""
    r, w, k, v, u = (x.float().contiguous() for x in (r, w, k, v, u))
    return tuple(torch.ops.rwkv_cli.wkv5_cpu(state, r, w, k, v, u))


def usable(*tensors: torch.Tensor):
    """The compiled ops, if they can take these float32 CPU tensors (and no gradient is asked
    for: the kernels are forward-only); else None."""
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in tensors):
        return None
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return None
    return compiled_ops(EXTENSION)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor, name: str) -> float:
    error = ((actual.double() - expected.double()).norm() / expected.double().norm()).item()
    if not error <= TOLERANCE:  # also catches NaN
        raise KernelSelfTestError(f"compiled {name} differs from the torch path ({error:.1e})")
    return error


def _gemv_errors() -> list[float]:
    from rwkv_cli.kernels.linear import quantize_int8  # linear.py imports this module

    ops = torch.ops.rwkv_cli
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(203, 77, generator=generator)  # odd sizes: the tails are checked too
    x = torch.randn(1, 77, generator=generator)
    errors = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        narrow = weight.to(dtype)
        expected = F.linear(x, narrow.float())
        errors.append(_relative_error(ops.gemv(x, narrow, None), expected, f"{dtype} gemv"))
    quantized = quantize_int8(weight)
    expected = F.linear(x, quantized.dequantize())
    actual = ops.gemv(x, quantized.values, quantized.scale)
    errors.append(_relative_error(actual, expected, "int8 gemv"))
    return errors


def _time_mix_error() -> float:
    from rwkv_cli.models.rwkv7 import (  # the model module imports this one
        MixInputs,
        TimeMixWeights,
        mix_projections,
        mix_projections_compiled,
    )

    heads, size = 3, 16
    channels = heads * size
    generator = torch.Generator().manual_seed(1)

    def vector() -> torch.Tensor:
        return torch.randn(channels, generator=generator)

    att = TimeMixWeights(**{name: vector() for name in TimeMixWeights.__dataclass_fields__})
    att.r_k = att.r_k.view(heads, size)
    state = torch.randn(heads, size, size, generator=generator)
    inputs = MixInputs(
        **{name: vector().unsqueeze(0) for name in ("r", "k", "v", "g", "v_first")},
        decay=vector(),
        iclr=vector(),
        value_gate=vector(),
    )
    expected = mix_projections(att, state, inputs)
    actual = mix_projections_compiled(torch.ops.rwkv_cli, att, state, inputs)
    return max(
        _relative_error(actual[0], expected[0], "RWKV-7 time mixing output"),
        _relative_error(actual[1], expected[1], "RWKV-7 time mixing state"),
    )
