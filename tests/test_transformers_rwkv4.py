"""Hugging Face transformers-format RWKV-4 (``RWKV/rwkv-4-*-pile``): same results as the .pth,
and transformers' own RwkvForCausalLM as a second oracle."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.errors import UnsupportedModelError
from rwkv_cli.loading.checkpoint import load_checkpoint
from rwkv_cli.loading.converted import load_model_cached
from rwkv_cli.models import load_model
from tests.support.fixtures import legacy_tensors, write_pth, write_transformers_rwkv4
from tests.support.numerics import assert_states_close, relative_error

TOKENS = [0, 510, 3158, 8516, 30013, 187, 187, 50276, 12, 1]


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return legacy_tensors("4", n_layer=3, seed=5)


@pytest.fixture(scope="module")
def pth(tensors, tmp_path_factory):
    return write_pth(tmp_path_factory.mktemp("blinkdl") / "RWKV-4-Pile-tiny.pth", tensors)


@pytest.mark.parametrize(
    "safetensors", [True, False], ids=["model.safetensors", "pytorch_model.bin"]
)
def test_transformers_files_equal_the_pth(tmp_path, tensors, pth, safetensors) -> None:
    weights = write_transformers_rwkv4(tmp_path / "rwkv-4-tiny-pile", tensors, safetensors)
    checkpoint = load_checkpoint(weights)
    assert checkpoint.generation == "4"
    assert set(checkpoint.tensors) == set(tensors)
    ours, theirs = load_model(pth), load_model(weights)
    assert theirs.fingerprint == ours.fingerprint  # a state saved with one fits the other
    expected, expected_state = ours.forward(TOKENS)
    logits, state = theirs.forward(TOKENS)
    # The same values, but safetensors' tensors may sit at other memory alignments, so SIMD sums
    # can round differently in the last bit: not bit-equal, equal to float32 precision.
    assert relative_error(logits, expected) < 1e-6
    assert_states_close(state, expected_state, 1e-6)  # att.pp, an exponent: within 1e-5
    cached, _ = load_model_cached(weights).forward(TOKENS)
    assert relative_error(cached, expected) < 1e-6


def test_transformers_model_is_a_second_oracle(tmp_path, tensors, pth) -> None:
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "rwkv-4-tiny-pile"
    write_transformers_rwkv4(directory, tensors)
    reference = transformers.RwkvForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        output = reference(torch.tensor([TOKENS]), use_cache=True)
    model = load_model(pth)
    state = None
    for position, token in enumerate(TOKENS):
        logits, state = model.forward([token], state)
        assert relative_error(logits, output.logits[0, position]) < 1e-5, position
    # transformers keeps (ffn shift, att shift, aa, bb, pp), each (batch, C, layer)
    ffn_shift, att_shift, aa, bb, pp = (tensor[0] for tensor in output.state)
    for index, layer in enumerate(state.layers):
        assert relative_error(layer.ffn_shift, ffn_shift[:, index]) < 1e-5
        assert relative_error(layer.att_shift, att_shift[:, index]) < 1e-5
        assert relative_error(layer.att_aa, aa[:, index]) < 1e-5
        assert relative_error(layer.att_bb, bb[:, index]) < 1e-5
        assert (layer.att_pp - pp[:, index]).abs().max() < 1e-4


def test_other_generations_in_transformers_layout_are_refused(tmp_path) -> None:
    tensors = legacy_tensors("5.2", n_layer=1, vocab_size=300)
    weights = write_transformers_rwkv4(tmp_path / "v5", tensors)  # the same renames
    with pytest.raises(UnsupportedModelError, match=r"RWKV-5\.2 in the Hugging Face transformers"):
        load_checkpoint(weights)


def test_flash_linear_attention_layout_is_explained(tmp_path) -> None:
    path = write_pth(
        tmp_path / "fla.pth",
        {"model.embeddings.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)},
    )
    with pytest.raises(UnsupportedModelError, match="transformers layout rwkv-cli does not read"):
        load_checkpoint(path)
