"""Choosing where a model runs: --device and --dtype, moving a model, states on its device.

Without a GPU, torch's "meta" device stands in for one: a model moved there runs its whole
forward on meta tensors, so a tensor made on the CPU halfway through (a device mix-up that would
fail on a GPU) fails here too. tests/test_cuda.py runs the same on a real GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rwkv_cli.device import dtype_name, resolve_device, resolve_dtype
from rwkv_cli.errors import InvalidInputError
from rwkv_cli.loading.open import open_model
from rwkv_cli.models import MODEL_CLASSES
from rwkv_cli.settings import ModelRequest
from tests.support.cli_runner import assert_one_line_error, rwkv
from tests.support.fixtures import GENERATIONS, generation_tensors
from tests.support.state_roundtrip import save_and_resume

TOKENS = [0, 33, 261, 11, 17, 17, 17, 250, 2]
GREEDY = ["-n", "8", "--temperature", "0"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def tiny_model(generation: str, dtype: torch.dtype = torch.float32):
    return MODEL_CLASSES[generation].from_tensors(generation_tensors(generation), dtype=dtype)


def weights(model) -> list[torch.Tensor]:
    found = [model.embedding, model.head, *model.ln_out]
    for block in model.blocks:
        for group in (block.norms, block.att, block.ffn):
            values = (getattr(group, field.name) for field in dataclasses.fields(group))
            found += [value for value in values if isinstance(value, torch.Tensor)]
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_moved_model_runs_entirely_on_its_device(generation, dtype) -> None:
    model = tiny_model(generation, dtype).to("meta")
    assert model.device == torch.device("meta")
    assert all(tensor.is_meta for tensor in weights(model))
    assert all(tensor.is_meta for tensor in model.new_state().named_tensors().values())
    logits, state = model.forward(TOKENS)
    logits, state = model.forward([5], state)
    assert logits.is_meta and logits.shape == (model.vocab_size,)
    assert all(tensor.is_meta for tensor in state.named_tensors().values())


@pytest.mark.parametrize("generation", ["6", "7"])
def test_weights_derived_before_a_move_are_derived_again_after_it(generation) -> None:
    """RWKV-6 and 7 stack their token-shift mixes on first use; a later move must not keep
    the stack on the old device."""
    model = tiny_model(generation)
    model.forward(TOKENS)  # stacks the mixes on the CPU
    logits, _ = model.to("meta").forward(TOKENS)
    assert logits.is_meta and model.blocks[0].att.mixes.is_meta


def test_moving_to_the_same_device_copies_nothing() -> None:
    model = tiny_model("7")
    before = [tensor.data_ptr() for tensor in weights(model)]
    assert model.to("cpu") is model
    assert [tensor.data_ptr() for tensor in weights(model)] == before


def test_saved_tensors_join_the_model_on_its_device() -> None:
    """What a state file holds is on the CPU; the state made from it is where the model is."""
    cpu_state = tiny_model("7").forward(TOKENS)[1]
    model = tiny_model("7").to("meta")
    state = model.new_state().with_tensors(cpu_state.named_tensors())
    assert all(tensor.is_meta for tensor in state.named_tensors().values())
    assert all(tensor.is_meta for tensor in cpu_state.to("meta").named_tensors().values())


@pytest.mark.parametrize("spec", [None, "cpu", " CPU ", "cpu:0"])
def test_cpu_device(spec) -> None:
    assert resolve_device(spec) == torch.device("cpu")


@no_gpu
def test_auto_is_the_cpu_without_a_gpu() -> None:
    assert resolve_device("auto") == torch.device("cpu")


@no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_a_gpu_that_is_not_there_is_an_error(spec) -> None:
    with pytest.raises(InvalidInputError, match=f"device {spec} is not available") as caught:
        resolve_device(spec)
    assert "--device cpu" in caught.value.hint


@pytest.mark.parametrize("spec", ["gpu", "tpu", "cuda:x", "mps"])
def test_unknown_devices(spec) -> None:
    with pytest.raises(InvalidInputError, match="unknown device"):
        resolve_device(spec)


def test_dtypes() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype(None, gpu) == torch.float16  # the default, decided without a GPU
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(InvalidInputError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)


def test_auto_and_reduced_precision_on_the_cpu(rwkv7_pth) -> None:
    default = rwkv("generate", "Hi", "-m", rwkv7_pth, *GREEDY)
    auto = rwkv("generate", "Hi", "-m", rwkv7_pth, *GREEDY, "--device", "auto")
    bf16 = rwkv("generate", "Hi", "-m", rwkv7_pth, *GREEDY, "--dtype", "bf16", "--verbose")
    assert default.returncode == auto.returncode == bf16.returncode == 0, bf16.stderr
    if not torch.cuda.is_available():
        assert auto.stdout == default.stdout
    assert "cpu bf16" in bf16.stderr.decode()


@no_gpu
def test_cli_device_without_a_gpu(rwkv7_pth) -> None:
    result = rwkv("generate", "Hi", "-m", rwkv7_pth, "--device", "cuda")
    assert_one_line_error(result, 1, "device cuda is not available")


def test_the_device_option_wins_over_a_bad_device_in_the_environment(rwkv7_pth) -> None:
    """The bad variable alone is a usage error (test_cli_options.py); --device overrides it."""
    env = {"RWKV_CLI_DEVICE": "gpu"}
    overridden = rwkv("generate", "Hi", "-m", rwkv7_pth, "-n", "2", "--device", "cpu", env=env)
    assert overridden.returncode == 0, overridden.stderr


def test_a_state_file_does_not_depend_on_the_weight_type(rwkv7_pth, tmp_path) -> None:
    """A state saved by a bf16 model resumes in an fp32 one (as a GPU's resumes on a CPU)."""
    half = open_model(ModelRequest(str(rwkv7_pth), device="cpu", dtype="bf16")).model
    full = open_model(ModelRequest(str(rwkv7_pth), device="cpu")).model
    session, saved, resumed = save_and_resume(half, full, TOKENS, tmp_path / "bf16.rwkvstate")
    assert all(tensor.dtype == torch.float32 for tensor in saved.state_tensors.values())
    assert resumed.state.layers[0].att_shift.dtype == torch.float32
    expected, _ = half.forward([42], session.state)
    logits, _ = full.forward([42], resumed.state)
    assert ((logits - expected).norm() / expected.norm()).item() < 5e-2
