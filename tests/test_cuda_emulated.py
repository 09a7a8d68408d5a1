"""The CUDA kernels' own code, run on the CPU by tests/support/cuda_emulator.cpp (one std::thread
per CUDA thread, a barrier for __syncthreads), behind the real Python wrappers of kernels/cuda.py.

This checks what can be checked without a GPU: indexing (a batch of sequences included),
shared-memory staging, the arithmetic and the wrappers' conversions, against the torch references
and float64 oracles; and that the models' batched forward takes the kernels as a GPU would. It
needs nvcc (as the host compiler driver, for the CUDA headers); tests/test_cuda.py runs the real
thing on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_cli.batching.states import stack_states
from rwkv_cli.kernels import cpu_ops, cuda
from rwkv_cli.kernels.build import SOURCE_DIR
from rwkv_cli.kernels.selftest import TORCH_REFERENCES, compare_with_torch, wkv_inputs
from rwkv_cli.kernels.wkv4 import wkv4
from rwkv_cli.kernels.wkv5 import wkv5
from rwkv_cli.kernels.wkv7 import wkv7
from rwkv_cli.models import MODEL_CLASSES
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.numerics import assert_states_close, relative_error
from tests.support.wkv_oracles import ORACLES, as_oracle_state, batched_wkv_inputs

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")

EMULATOR_SOURCE = Path(__file__).parent / "support" / "cuda_emulator.cpp"
ELEMENTS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # rwkv_cli::Element
WRAPPERS = {"4": cuda.wkv4, "5": cuda.wkv5, "7": cuda.wkv7}
DISPATCHERS = {"4": wkv4, "5": wkv5, "7": wkv7}


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
        batch, sizes = _batch(k, sequence_dims=2)
        assert aa.shape == bb.shape == pp.shape == (*k.shape[:-2], k.shape[-1])
        assert w.shape == u.shape == k.shape[-1:]  # the model's, for every sequence
        y = torch.empty(k.shape, dtype=torch.float32)
        state = [torch.empty_like(x) for x in (aa, bb, pp)]
        code = self.library.emulate_wkv4(
            ELEMENTS[k.dtype], batch, *sizes, *_pointers(w, u, k, v, aa, bb, pp, y, *state)
        )
        assert code == 0
        return (y, *state)

    def wkv5_cuda(self, state, r, w, k, v, u):
        _check(float32=(state, w, u), inputs=(r, k, v))
        batch, sizes = _batch(r, sequence_dims=3, state=state)
        assert w.shape == r.shape and u.shape == r.shape[-2:]
        y, new_state = torch.empty(r.shape), torch.empty_like(state)
        code = self.library.emulate_wkv5(
            ELEMENTS[r.dtype], batch, *sizes, *_pointers(state, r, w, k, v, u, y, new_state)
        )
        assert code == 0
        return y, new_state

    def wkv7_cuda(self, state, r, w, k, v, kappa, a):
        _check(float32=(state, w), inputs=(r, k, v, kappa, a))
        batch, sizes = _batch(r, sequence_dims=3, state=state)
        assert w.shape == r.shape
        y, new_state = torch.empty(r.shape), torch.empty_like(state)
        code = self.library.emulate_wkv7(
            ELEMENTS[r.dtype],
            batch,
            *sizes,
            *_pointers(state, r, w, k, v, kappa, a, y, new_state),
        )
        assert code == 0
        return y, new_state


def _check(float32: tuple, inputs: tuple) -> None:
    assert all(x.dtype == torch.float32 and x.is_contiguous() for x in float32)
    assert all(x.dtype == inputs[0].dtype and x.is_contiguous() for x in inputs)
    assert all(x.shape == inputs[0].shape for x in inputs)


def _batch(
    x: torch.Tensor, sequence_dims: int, state: torch.Tensor | None = None
) -> tuple[int, torch.Size]:
    """The sequences in token inputs ``x`` (one, or B with a leading batch dimension) and one
    sequence's sizes, (T, C) or (T, H, N); checks an RWKV-5/6/7 ``state`` against them."""
    assert x.dim() in (sequence_dims, sequence_dims + 1)
    batch = x.shape[0] if x.dim() > sequence_dims else 1
    sizes = x.shape[-sequence_dims:]
    if state is not None:
        heads, size = sizes[-2:]
        assert state.shape == (*x.shape[:-sequence_dims], heads, size, size)
    return batch, sizes


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


@pytest.mark.parametrize("tokens", [1, 2, 13])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_a_batch_gives_every_sequence_its_own_run(emulated, generation, batch, tokens) -> None:
    batched, sequences = batched_wkv_inputs(generation, batch, tokens, heads=2, head_size=32)
    actual = WRAPPERS[generation](*batched)
    for row, inputs in enumerate(sequences):
        for got, alone in zip(actual, WRAPPERS[generation](*inputs), strict=True):
            assert torch.equal(got[row], alone)  # the same arithmetic, at other addresses
        rows = as_oracle_state(generation, [x[row] for x in actual])
        for got, want in zip(rows, ORACLES[generation](*inputs), strict=True):
            assert relative_error(got, want) < 1e-5
    for got, want in zip(actual, TORCH_REFERENCES[generation](*batched), strict=True):
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_a_batch_of_half_inputs_matches_the_float64_oracle(emulated, generation) -> None:
    batched, sequences = batched_wkv_inputs(generation, 3, 5, dtype=torch.bfloat16)
    actual = WRAPPERS[generation](*batched)
    for row, inputs in enumerate(sequences):
        rows = as_oracle_state(generation, [x[row] for x in actual])
        for got, want in zip(rows, ORACLES[generation](*inputs), strict=True):
            assert relative_error(got, want) < 1e-5


@pytest.fixture
def as_on_a_gpu(emulated, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The dispatchers take the (emulated) CUDA kernels as they would on a GPU; returns the
    generations whose kernel ran, in call order."""
    calls = []
    monkeypatch.setattr(cuda, "usable", lambda *tensors, head_size=None: True)
    # GPU tensors never take the CPU kernels (RWKV-7's fused time mixing runs the WKV inside)
    monkeypatch.setattr(cpu_ops, "usable", lambda *tensors: False)
    for generation, wrapper in WRAPPERS.items():

        def record(*arguments, _wrapper=wrapper, _generation=generation):
            calls.append(_generation)
            return _wrapper(*arguments)

        monkeypatch.setattr(cuda, wrapper.__name__, record)
    return calls


@pytest.mark.parametrize("generation", ["4", "5", "7"])
def test_the_dispatchers_send_a_batch_on_a_gpu_to_the_kernels(as_on_a_gpu, generation) -> None:
    batched, _ = batched_wkv_inputs(generation, 3, 1)
    actual = DISPATCHERS[generation](*batched)
    assert as_on_a_gpu == [generation]
    for got, want in zip(actual, TORCH_REFERENCES[generation](*batched), strict=True):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_models_batched_step_runs_on_the_kernels(generation, request) -> None:
    """forward_batch hands the kernels what they take (RWKV-5's broadcast decay and bonus, ...):
    through them, it gives what the torch twins give."""
    model = MODEL_CLASSES[generation].from_tensors(generation_tensors(generation))
    prompts = [[11, 12, 13], [7], [20, 21, 22, 23]]
    state = stack_states([model.forward(prompt)[1] for prompt in prompts])
    expected_logits, expected_state = model.forward_batch([40, 41, 42], state)
    calls = request.getfixturevalue("as_on_a_gpu")
    logits, new_state = model.forward_batch([40, 41, 42], state)
    assert len(calls) == model.config.n_layer  # one batched WKV per layer
    assert relative_error(logits, expected_logits) < 1e-5
    assert_states_close(new_state, expected_state, 1e-5)
