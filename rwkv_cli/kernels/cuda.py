"""The compiled CUDA WKV kernels: their extension, and wrappers with the torch references'
signatures.

The sources are ``rwkv_cli/csrc/cuda_*``: the kernels (``cuda_wkv_kernels.cuh``, plain CUDA, one
thread per channel for RWKV-4 and per value row of a head for RWKV-5 to 7, looping over the
tokens; the grid's second dimension runs over the sequences of a batch), their launchers
(``cuda_wkv{4,5,7}.cu``) and the torch binding (``cuda_wkv.cpp``, which checks devices, dtypes,
shapes and contiguity and registers ``torch.ops.rwkv_cli.wkv*_cuda``).
They are built on first use on a GPU (kernels/build.py), never at import.

The dispatchers (``wkv4`` in kernels/wkv4.py, ...) ask ``usable`` and call the wrappers here,
which bring the inputs into the kernels' layout: token inputs in one of fp32, fp16 or bf16
(mixed types are computed from fp32 copies), state, decay and bonus float32, all contiguous.
Outputs are float32, as the references return. Like the references, each takes one sequence or a
batch of B, whose state and token inputs carry a leading dimension B (the decay and bonus of RWKV-4
and the bonus of RWKV-5/6 are the model's, shared). kernels/selftest.py compares the kernels with
their torch twins.
"""

from __future__ import annotations

import torch

from rwkv_cli.kernels.build import (
    OPS_NAMESPACE,
    Extension,
    KernelBuildError,
    compiled_ops,
    kernel_choice,
)

EXTENSION = Extension(
    "rwkv_cli_cuda",
    ("cuda_wkv.cpp", "cuda_wkv4.cu", "cuda_wkv5.cu", "cuda_wkv7.cu"),
    cuda=True,
    headers=("cuda_wkv.h", "cuda_wkv_kernels.cuh"),
)
HEAD_SIZES = (16, 32, 64, 128)  # compiled in (csrc/cuda_wkv.h); every release uses 64
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def usable(state: torch.Tensor, *inputs: torch.Tensor, head_size: int | None = None) -> bool:
    """Whether to run a WKV with these arguments on the compiled kernels.

    Yes when the state is a float32 tensor on a CUDA device, no gradient is asked for (the
    kernels are forward-only), ``head_size`` is compiled in and the extension builds. With
    ``--kernel compiled`` a build failure or an unsupported head size raises KernelBuildError.
    """
    if not state.is_cuda or state.dtype != torch.float32:
        return False  # a float64 state is an accuracy oracle: the torch path runs it
    if torch.is_grad_enabled() and any(x.requires_grad for x in (state, *inputs)):
        return False
    if head_size is not None and head_size not in HEAD_SIZES:
        if kernel_choice() == "compiled":
            raise KernelBuildError(f"the CUDA kernels do not support head size {head_size}")
        return False
    return compiled_ops(EXTENSION) is not None


def wkv4(
    aa: torch.Tensor,
    bb: torch.Tensor,
    pp: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RWKV-4's WKV on the GPU; arguments and results as ``kernels.wkv4.wkv4_torch``."""
    k, v = _token_inputs(k, v)
    return tuple(_ops().wkv4_cuda(*_float32(aa, bb, pp, w, u), k, v))


def wkv5(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-5/6's WKV on the GPU; arguments and results as ``kernels.wkv5.wkv5_torch``."""
    r, k, v = _token_inputs(r, k, v)
    # RWKV-5's decay is the same for every token, and 5.0's decay and bonus for a whole head.
    state, w, u = _float32(
        state, torch.broadcast_to(w, r.shape), torch.broadcast_to(u, r.shape[-2:])
    )
    return tuple(_ops().wkv5_cuda(state, r, w, k, v, u))


def wkv7(
    state: torch.Tensor,
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kappa: torch.Tensor,
    a: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RWKV-7's WKV on the GPU; arguments and results as ``kernels.wkv7.wkv7_torch``."""
    r, k, v, kappa, a = _token_inputs(r, k, v, kappa, a)
    state, w = _float32(state, w)
    return tuple(_ops().wkv7_cuda(state, r, w, k, v, kappa, a))


def _ops():
    return getattr(torch.ops, OPS_NAMESPACE)


def _token_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Contiguous, in their common type if the kernels take it, else as float32."""
    dtype = tensors[0].dtype
    if dtype not in INPUT_DTYPES or any(x.dtype != dtype for x in tensors):
        dtype = torch.float32
    return [x.to(dtype).contiguous() for x in tensors]


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.to(torch.float32).contiguous() for x in tensors]
