"""The CUDA kernels' own code, run on the CPU by tests/support/cuda_emulator.cpp (one std::thread
per CUDA thread, a barrier for __syncthreads), behind the real Python wrappers of kernels/cuda.py.

This checks what can be checked without a GPU: indexing, shared-memory staging, the arithmetic
and the wrappers' conversions, against the torch references and float64 oracles. It needs nvcc
(as the host compiler driver, for the CUDA headers); tests/test_cuda.py runs the real thing on a
GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_cli.kernels import cuda
from rwkv_cli.kernels.build import SOURCE_DIR
from rwkv_cli.kernels.selftest import compare_with_torch, wkv_inputs
from tests.support.numerics import relative_error
from tests.support.wkv_oracles import ORACLES, as_oracle_state

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

EMULATOR_SOURCE = Path(__file__).parent / "support" / "cuda_emulator.cpp"
ELEMENTS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # rwkv_cli::Element
WRAPPERS = {"4": cuda.wkv4, "5": cuda.wkv5, "7": cuda.wkv7}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    library = tmp_path_factory.mktemp("emulator") / "libwkv_emulator.so"
    flags = "-fPIC,-pthread,-Wno-unknown-pragmas,-Wno-attributes"
    command = ["nvcc", "-std=c++17", "-O1", "-shared", "-Xcompiler", flags]
    command += ["-I", str(SOURCE_DIR), str(EMULATOR_SOURCE), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return ctypes.CDLL(str(library))


class EmulatedOps:
    """Stands in for ``torch.ops.rwkv_cli``: checks its arguments as csrc/cuda_wkv.cpp does,
    allocates the outputs as it does, and runs the emulated kernels."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = library

    def wkv4_cuda(self, aa, bb, pp, w, u, k, v):
        _check(float32=(aa, bb, pp, w, u), inputs=(k, v))
        y = torch.empty(k.shape, dtype=torch.float32)
        state = [torch.empty_like(x) for x in (aa, bb, pp)]
        code = self.library.emulate_wkv4(
            ELEMENTS[k.dtype], *k.shape, *_pointers(w, u, k, v, aa, bb, pp, y, *state)
        )
        assert code == 0
        return (y, *state)

    def wkv5_cuda(self, state, r, w, k, v, u):
        _check(float32=(state, w, u), inputs=(r, k, v))
        y, new_state = torch.empty(r.shape), torch.empty_like(state)
        code = self.library.emulate_wkv5(
            ELEMENTS[r.dtype], *r.shape, *_pointers(state, r, w, k, v, u, y, new_state)
        )
        assert code == 0
        return y, new_state

    def wkv7_cuda(self, state, r, w, k, v, kappa, a):
        _check(float32=(state, w), inputs=(r, k, v, kappa, a))
        y, new_state = torch.empty(r.shape), torch.empty_like(state)
        code = self.library.emulate_wkv7(
            ELEMENTS[r.dtype], *r.shape, *_pointers(state, r, w, k, v, kappa, a, y, new_state)
        )
        assert code == 0
        return y, new_state


def _check(float32: tuple, inputs: tuple) -> None:
    assert all(x.dtype == torch.float32 and x.is_contiguous() for x in float32)
    assert all(x.dtype == inputs[0].dtype and x.is_contiguous() for x in inputs)
    assert all(x.shape == inputs[0].shape for x in inputs)


def _pointers(*tensors: torch.Tensor) -> list[ctypes.c_void_p]:
    return [ctypes.c_void_p(x.data_ptr()) for x in tensors]


@pytest.fixture
def emulated(emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers in kernels/cuda.py call the emulated kernels."""
    ops = EmulatedOps(emulator)
    monkeypatch.setattr(cuda, "_ops", lambda: ops)


def test_the_self_test_comparison_passes(emulated) -> None:
    worst = compare_with_torch(WRAPPERS, device="cpu")
    assert worst < 1e-5


@pytest.mark.parametrize("generation", ["5", "7"])
@pytest.mark.parametrize("head_size", [16, 32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 37])
def test_every_head_size_matches_the_float64_oracle(emulated, generation, head_size, tokens):
    inputs = wkv_inputs(generation, tokens, heads=3, head_size=head_size, seed=head_size)
    actual = WRAPPERS[generation](*inputs)
    expected = ORACLES[generation](*inputs)
    for got, want in zip(actual, expected, strict=True):
        assert got.dtype == torch.float32
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("channels", [64, 300])  # less than one block; a partial last block
def test_rwkv4_matches_the_float64_oracle(emulated, channels) -> None:
    inputs = wkv_inputs("4", 37, heads=1, head_size=channels)
    actual = as_oracle_state("4", cuda.wkv4(*inputs))
    for got, want in zip(actual, ORACLES["4"](*inputs), strict=True):
        assert relative_error(got, want) < 1e-5


def test_rwkv4_starts_from_the_empty_state(emulated) -> None:
    aa, bb, pp, *rest = wkv_inputs("4", 20)
    empty = (torch.zeros_like(aa), torch.zeros_like(bb), torch.full_like(pp, -1e30))
    y, *_ = cuda.wkv4(*empty, *rest)
    expected, *_ = ORACLES["4"](*empty, *rest)
    assert relative_error(y, expected) < 1e-5


@pytest.mark.parametrize("generation", ["4", "5", "7"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_read_exactly(emulated, generation, dtype) -> None:
    inputs = wkv_inputs(generation, 17, dtype=dtype)
    actual = as_oracle_state(generation, WRAPPERS[generation](*inputs))
    for got, want in zip(actual, ORACLES[generation](*inputs), strict=True):
        assert relative_error(got, want) < 1e-5  # the oracle reads the same rounded inputs


@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_no_tokens_returns_the_state_unchanged(emulated, generation) -> None:
    inputs = wkv_inputs(generation, 0)
    y, *state = WRAPPERS[generation](*inputs)
    assert y.shape == inputs[5 if generation == "4" else 1].shape  # (0, C) or (0, H, N)
    before = inputs[:3] if generation == "4" else inputs[:1]
    assert all(torch.equal(new, old) for new, old in zip(state, before, strict=True))


def test_mixed_and_broadcast_inputs_are_converted(emulated) -> None:
    """RWKV-5 passes its decay expanded over tokens; types may differ between inputs."""
    state, r, w, k, v, u = wkv_inputs("5", 9)
    w = w[0].expand_as(r)  # stride 0 over tokens
    mixed = (state, r.half(), w, k.bfloat16(), v, u[:, :1])  # 5.0: one bonus per head
    expected = ORACLES["5"](state, r.half(), w, k.bfloat16(), v, u[:, :1])
    for got, want in zip(cuda.wkv5(*mixed), expected, strict=True):
        assert relative_error(got, want) < 1e-5


def test_inputs_are_not_modified(emulated) -> None:
    inputs = wkv_inputs("7", 12)
    copies = [x.clone() for x in inputs]
    cuda.wkv7(*inputs)
    assert all(torch.equal(x, c) for x, c in zip(inputs, copies, strict=True))
