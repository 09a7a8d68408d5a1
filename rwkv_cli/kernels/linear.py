"""Projections ``y = x Wᵀ`` with weights in float32, 16-bit floats or int8, on any device.

Projection matrices are kept (out, in), as checkpoints store them. For a few rows of input on a
CPU (one token, or one token of each of up to ``SMALL_BATCH_ROWS`` sequences decoding together,
kernels/decode.py; narrow weights up to ``NARROW_GEMV_ROWS``) the compiled ``gemv`` kernel
(csrc/cpu_gemv.cpp) streams each weight row once for up to 16 rows at close to the memory
bandwidth, whatever the weight format: that is what decoding is bound by. Torch has no fast CPU
path for 16-bit or int8 weights, so everything else (many tokens, no compiler, other devices)
converts the weights to the input's dtype and uses ``torch.nn.functional.linear``; for many
tokens that conversion costs little next to the product itself.

int8 weights are quantized per output row: ``W ≈ scale[o] · q[o, :]`` with ``q`` in [-127, 127]
and ``scale[o] = max |W[o, :]| / 127``. int4 weights are quantized per group of ``INT4_GROUP``
weights of a row, ``q`` in [-7, 7] and ``scale = max |group| / 7``, and packed two a byte.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rwkv_cli.kernels import cpu_ops
from rwkv_cli.kernels.decode import is_small_batch

INT8_MAX = 127
INT4_MAX = 7  # symmetric: -8, which has no positive twin, is not used
INT4_GROUP = 64  # weights of a row per int4 scale (kInt4Group in csrc/cpu_gemv.cpp)
INT4_OFFSET = 8  # stored nibble = q + 8
# The weight format "int4" where a torch dtype names one (--dtype int4, converted-cache names):
# torch has no plain 4-bit dtype; its quantized 4-bit-pairs dtype stands for ours.
INT4 = torch.quint4x2
GEMV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8)
# Rows up to which narrow (16-bit or int8) weights take the gemv kernel, 16 rows per pass over
# the weights, rather than being widened whole to float32 for a GEMM: widening costs a pass over
# the matrix and a float32 copy (page faults included: ~0.3 s for the 0.1B head), so the kernel's
# extra passes win up to about 64 rows (0.1B shape: a 3072 x 768 bf16 matrix times 48 rows took
# 3.9 ms against 6.7 widened, 64 rows about even; the head 41 against 120 ms at 48 rows).
NARROW_GEMV_ROWS = 64


@dataclass(frozen=True)
class QuantizedMatrix:
    """An (out, in) matrix as int8 values (out, in) with one float32 scale per output row
    (out,), or as int4 values packed two a byte, uint8 (out, in / 2), with one float32 scale per
    ``INT4_GROUP`` weights, (out, in / INT4_GROUP): weight 2j in the low nibble of byte j, 2j + 1
    in the high one."""

    values: torch.Tensor
    scale: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        """The weight format: torch.int8, or ``INT4``."""
        return INT4 if self.values.dtype == torch.uint8 else self.values.dtype

    @property
    def shape(self) -> torch.Size:
        rows, columns = self.values.shape
        return torch.Size((rows, columns * 2 if self.dtype == INT4 else columns))

    def to(self, device: torch.device) -> QuantizedMatrix:
        return QuantizedMatrix(self.values.to(device), self.scale.to(device))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.dtype != INT4:
            return (self.values.to(dtype) * self.scale.to(dtype).unsqueeze(1)).contiguous()
        low, high = self.values & 0xF, self.values >> 4
        q = torch.stack((low, high), dim=-1).flatten(1).float() - INT4_OFFSET  # (out, in)
        return (q * self.scale.repeat_interleave(INT4_GROUP, dim=1)).to(dtype).contiguous()


Weight = torch.Tensor | QuantizedMatrix


def quantize_int8(weight: torch.Tensor) -> QuantizedMatrix:
    """Per-row symmetric int8 quantization of an (out, in) matrix."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    values = torch.round(weight / scale.unsqueeze(1)).clamp(-INT8_MAX, INT8_MAX)
    return QuantizedMatrix(values.to(torch.int8).contiguous(), scale.contiguous())


def quantize_int4(weight: torch.Tensor) -> QuantizedMatrix:
    """Symmetric int4 quantization of an (out, in) matrix, one scale per ``INT4_GROUP`` weights
    of a row (``in`` must be a multiple of it), packed two weights a byte."""
    rows, columns = weight.shape
    if columns % INT4_GROUP:
        raise ValueError(f"int4 needs rows of a multiple of {INT4_GROUP} weights, not {columns}")
    groups = weight.float().reshape(rows, columns // INT4_GROUP, INT4_GROUP)
    scale = groups.abs().amax(dim=2).clamp_min(torch.finfo(torch.float32).tiny) / INT4_MAX
    q = torch.round(groups / scale.unsqueeze(2)).clamp(-INT4_MAX, INT4_MAX).reshape(rows, columns)
    stored = (q + INT4_OFFSET).to(torch.uint8)
    packed = stored[:, 0::2] | (stored[:, 1::2] << 4)
    return QuantizedMatrix(packed.contiguous(), scale.contiguous())


def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
    """``x @ weightᵀ`` for x (T, in) or (in,), in x's dtype."""
    if _use_gemv(x, weight) and cpu_ops.usable():
        values, scale = _parts(weight)
        rows = x.reshape(-1, x.shape[-1]).float()
        return cpu_ops.kernels().gemv(rows, values, scale).to(x.dtype).view(*x.shape[:-1], -1)
    if isinstance(weight, QuantizedMatrix):
        weight = weight.dequantize(x.dtype)
    return F.linear(x, weight.to(x.dtype))


def _use_gemv(x: torch.Tensor, weight: Weight) -> bool:
    values = weight.values if isinstance(weight, QuantizedMatrix) else weight
    rows = x.numel() // x.shape[-1]
    return (
        x.device.type == "cpu"
        and values.dtype in GEMV_DTYPES
        # for more rows, a GEMM wins (for narrow weights, even counting their widening)
        and (is_small_batch(rows) or (values.dtype != torch.float32 and rows <= NARROW_GEMV_ROWS))
        and not torch.is_grad_enabled()
    )


def _parts(weight: Weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(weight, QuantizedMatrix):
        return weight.values, weight.scale
    return weight, None
