"""The compiled CPU kernels (``csrc/cpu_*.cpp``), each with a torch twin that means the same:

- ``gemv``: the projection of a few rows (one token, or one token of each of a few sequences)
  with float32, bfloat16, float16, int8 or packed int4 weights, each weight read once for all
  rows, at
  close to the memory bandwidth (twin: ``torch.nn.functional.linear``; see kernels/linear.py);
- ``time_mix7``: RWKV-7's time mixing between the projections for one token, in one pass
  (twin: ``kernels.time_mix7.time_mix7_torch``);
- ``wkv4``: the RWKV-4 recurrence (twin: ``kernels.wkv4.wkv4_torch``);
- ``wkv5``: the RWKV-5/6 recurrence (twin: ``kernels.wkv5.wkv5_torch``).

The last three take one sequence or a batch of B (a leading batch dimension on the state and the
token inputs, as ``RecurrentModel.forward_batch`` passes them): each sequence of a batch gets the
same bits it gets alone.

The kernels are a plain shared library with a C interface (kernels/build.py builds it), called
through ctypes. ``CpuKernels`` is the only way in: it checks each argument's type, shape and
layout, allocates the outputs as tensors and passes data pointers, so a wrong argument is a
ValueError here, never a wild pointer in C. The dispatchers (``wkv4`` in kernels/wkv4.py, ...)
ask ``usable`` and then call ``kernels()``. kernels/selftest.py compares every kernel with its
twin.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from rwkv_cli.kernels.build import Extension, compiled_ops

EXTENSION = Extension(
    "rwkv_cpu",
    ("cpu_gemv.cpp", "cpu_rwkv7.cpp", "cpu_wkv4.cpp", "cpu_wkv5.cpp"),
    headers=("cpu_kernels.h",),
)

_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_GEMV_SYMBOLS = {
    torch.float32: "rwkv_gemv_f32",
    torch.bfloat16: "rwkv_gemv_bf16",
    torch.float16: "rwkv_gemv_f16",
    torch.int8: "rwkv_gemv_i8",
    torch.uint8: "rwkv_gemv_i4",  # int4 packed two a byte
}
INT4_GROUP = 64  # weights per int4 scale: kInt4Group in csrc/cpu_gemv.cpp
_SIGNATURES = {
    **{symbol: [_POINTER] * 4 + [_SIZE] * 3 for symbol in _GEMV_SYMBOLS.values()},
    "rwkv_wkv4": [_POINTER] * 11 + [_SIZE] * 3,
    "rwkv_wkv5": [_POINTER] * 7 + [_SIZE] * 4,
    "rwkv_rwkv7_time_mix_one": [_POINTER] * 19 + [_SIZE] * 3 + [ctypes.c_float],
}


class CpuKernels:
    """The compiled CPU kernels of one loaded library, with tensor arguments."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._library = library
        for symbol, argtypes in _SIGNATURES.items():
            function = getattr(library, symbol)
            function.argtypes, function.restype = argtypes, None

    def gemv(
        self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y (B, out) = x (B, in) @ weight (out, in)ᵀ, times ``scale`` (out,) per row when given
        (required for int8 weights). int4 weights are uint8 (out, in / 2), two a byte, with
        ``scale`` (out, in / INT4_GROUP) (kernels/linear.py). x is float32; y is float32. Each
        weight is read from memory once per 16 rows of x, and row b of y has the same bits
        whatever B is: meant for a few rows (``decode.SMALL_BATCH_ROWS``)."""
        if x.dim() != 2 or x.dtype != torch.float32:
            raise ValueError("gemv: x must be float32 (B, in)")
        symbol = _GEMV_SYMBOLS.get(weight.dtype)
        if symbol is None:
            raise ValueError("gemv: weights must be float32, bfloat16, float16, int8 or int4")
        int4 = weight.dtype == torch.uint8
        n_in = weight.shape[-1] * (2 if int4 else 1)
        if weight.dim() != 2 or n_in != x.shape[1]:
            raise ValueError(f"gemv: weight must be (out, in) with in = {x.shape[1]}")
        if int4 and n_in % INT4_GROUP:
            raise ValueError(f"gemv: int4 rows must be a multiple of {INT4_GROUP} weights")
        if weight.dtype in (torch.int8, torch.uint8) and scale is None:
            raise ValueError("gemv: int8 and int4 weights need a scale")
        _require_cpu(weight, "weight", contiguous=True)
        if scale is not None:
            scale = scale.contiguous()
            per_row = n_in // INT4_GROUP if int4 else 1
            _require_float32(scale, weight.shape[0] * per_row, "scale")
        x = x.contiguous()
        _require_cpu(x, "x")
        rows, n_out = x.shape[0], weight.shape[0]
        y = x.new_empty(rows, n_out)
        getattr(self._library, symbol)(
            x.data_ptr(), weight.data_ptr(), _pointer(scale), y.data_ptr(), rows, n_in, n_out
        )
        return y

    def wkv4(
        self,
        aa: torch.Tensor,
        bb: torch.Tensor,
        pp: torch.Tensor,
        w: torch.Tensor,
        u: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """RWKV-4's WKV; arguments and results as ``kernels.wkv4.wkv4_torch``, batched too."""
        k, v = (x.float().contiguous() for x in (k, v))
        aa, bb, pp = (x.contiguous() for x in (aa, bb, pp))  # a batch's rows may be views
        if k.dim() not in (2, 3) or v.shape != k.shape:
            raise ValueError("wkv4: k and v must be (T, C) or (B, T, C)")
        *batch, tokens, channels = k.shape
        sequences = math.prod(batch)
        for tensor, name in ((aa, "aa"), (bb, "bb"), (pp, "pp")):
            _require_float32(tensor, sequences * channels, name)
        _require_float32(w, channels, "w")
        _require_float32(u, channels, "u")
        y, state = torch.empty_like(k), [torch.empty_like(aa) for _ in range(3)]
        self._library.rwkv_wkv4(
            *(x.data_ptr() for x in (aa, bb, pp, w, u, k, v, y, *state)),
            sequences,
            tokens,
            channels,
        )
        return y, *state

    def wkv5(
        self,
        state: torch.Tensor,
        r: torch.Tensor,
        w: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        u: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RWKV-5/6's WKV; arguments and results as ``kernels.wkv5.wkv5``, batched too."""
        r, w, k, v, u = (x.float().contiguous() for x in (r, w, k, v, u))
        state = state.contiguous()  # a batch's rows may be views
        sequences, heads, n = _state_shape(state, "wkv5")
        batch = state.shape[:-3]  # () for one sequence
        if r.dim() != state.dim() or r.shape[:-3] != batch or r.shape[-2:] != (heads, n):
            raise ValueError("wkv5: r must be (T, H, N), or (B, T, H, N), matching the state")
        if any(x.shape != r.shape for x in (w, k, v)):
            raise ValueError("wkv5: r, w, k and v must have one shape")
        _require_float32(u, heads * n, "u")
        y, next_state = torch.empty_like(r), state.clone()
        self._library.rwkv_wkv5(
            *(x.data_ptr() for x in (next_state, r, w, k, v, u, y)),
            sequences,
            r.shape[-3],
            heads,
            n,
        )
        return y, next_state

    def time_mix7(
        self,
        state: torch.Tensor,
        r: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor,
        decay_lora: torch.Tensor,
        iclr_lora: torch.Tensor,
        *,
        eps: float,
        **layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's RWKV-7 time mixing; arguments (the layer's by name) and results as
        ``kernels.time_mix7.time_mix7_torch``, every tensor float32: state (H, N, N) and the
        token's inputs (1, C), or for B sequences (B, H, N, N) and (B, 1, C)."""
        state = state.contiguous()  # a batch's rows may be views
        sequences, heads, n = _state_shape(state, "time_mix7")
        channels = heads * n
        named = {"r": r, "k": k, "v": v, "gate": gate, "decay_lora": decay_lora}
        named |= {"iclr_lora": iclr_lora, **layer}
        named = {name: None if x is None else x.contiguous() for name, x in named.items()}
        missing = [name for name in _TIME_MIX_VECTORS if named.get(name) is None]
        unknown = sorted(set(named) - set(_TIME_MIX_ORDER))
        if missing or unknown:
            raise ValueError(f"time_mix7: missing {missing}, unknown {unknown}")
        if len({named.get(name) is None for name in _VALUE_RESIDUAL}) > 1:
            raise ValueError("time_mix7: v_first, value_gate_lora and v0 go together")
        for name, tensor in named.items():
            if tensor is not None:
                per_token = name in _TIME_MIX_TOKEN_INPUTS
                _require_float32(tensor, sequences * channels if per_token else channels, name)
        out = state.new_empty(*state.shape[:-3], 1, channels)  # (1, C) or (B, 1, C)
        new_state = torch.empty_like(state)
        self._library.rwkv_rwkv7_time_mix_one(
            state.data_ptr(),
            *(_pointer(named.get(name)) for name in _TIME_MIX_ORDER),
            out.data_ptr(),
            new_state.data_ptr(),
            sequences,
            heads,
            n,
            eps,
        )
        return out, new_state


# The vectors time mixing always takes, and those of the value residual: all None in the first
# layer (null pointers to the C function), or none.
_TIME_MIX_VECTORS = (
    "r", "k", "v", "decay_lora", "iclr_lora", "gate", "w0", "a0", "k_k", "k_a", "r_k",
    "ln_x_weight", "ln_x_bias",
)  # fmt: skip
_VALUE_RESIDUAL = ("v_first", "value_gate_lora", "v0")
# Those with one row per sequence (B, 1, C); the others are the layer's (C,), shared by the batch.
_TIME_MIX_TOKEN_INPUTS = frozenset(
    ("r", "k", "v", "gate", "decay_lora", "iclr_lora", "v_first", "value_gate_lora")
)
# The C function's pointer arguments after the state, in its order.
_TIME_MIX_ORDER = (
    "r", "k", "v", "decay_lora", "iclr_lora", "value_gate_lora", "v_first", "gate", "w0", "a0",
    "v0", "k_k", "k_a", "r_k", "ln_x_weight", "ln_x_bias",
)  # fmt: skip


def _state_shape(state: torch.Tensor, op: str) -> tuple[int, int, int]:
    """(sequences, heads, n) of a float32 WKV state (H, N, N), or (B, H, N, N) for a batch."""
    if state.dim() not in (3, 4) or state.shape[-1] != state.shape[-2]:
        raise ValueError(f"{op}: state must be (H, N, N) or (B, H, N, N)")
    *batch, heads, n, _ = state.shape
    sequences = math.prod(batch)
    _require_float32(state, sequences * heads * n * n, "state")
    return sequences, heads, n


def _require_cpu(tensor: torch.Tensor, name: str, contiguous: bool = False) -> None:
    if tensor.device.type != "cpu" or (contiguous and not tensor.is_contiguous()):
        raise ValueError(f"{name} must be a {'contiguous ' if contiguous else ''}CPU tensor")


def _require_float32(tensor: torch.Tensor, numel: int, name: str) -> None:
    """A contiguous float32 CPU tensor of ``numel`` elements, as the kernels read it."""
    if tensor.dtype != torch.float32 or tensor.numel() != numel:
        raise ValueError(f"{name} must be float32 with {numel} elements")
    _require_cpu(tensor, name, contiguous=True)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def kernels() -> CpuKernels | None:
    """The compiled CPU kernels, following the kernel choice (``build.compiled_ops``), or None
    for the torch path."""
    library = compiled_ops(EXTENSION)
    return None if library is None else _wrap(library)


@functools.cache
def _wrap(library: ctypes.CDLL) -> CpuKernels:
    return CpuKernels(library)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether to run an op with these arguments on the compiled kernels: yes when they are
    float32 CPU tensors, no gradient is asked for (the kernels are forward-only) and the kernels
    build (following the kernel choice)."""
    if any(x.device.type != "cpu" or x.dtype != torch.float32 for x in tensors):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return kernels() is not None
