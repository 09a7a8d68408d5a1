"""RWKV-7 model: exactness against a float64 naive loop and internal consistency."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.generation import prefill
from rwkv_cli.models import load_model
from rwkv_cli.models.rwkv7 import RWKV7, RWKV7Config
from tests.support.fixtures import rwkv7_tensors
from tests.support.reference_rwkv7 import reference_forward

TOKENS = [0, 33, 1000, 261, 11, 65000, 4000, 17, 17, 17, 500, 2, 65535]


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _assert_states_close(a, b, tolerance: float) -> None:
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        for name in ("att_shift", "att_wkv", "ffn_shift"):
            error = _relative_error(getattr(layer_a, name), getattr(layer_b, name))
            assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return rwkv7_tensors(n_layer=3, n_embd=128, seed=1)


@pytest.fixture(scope="module")
def model(tensors) -> RWKV7:
    return RWKV7.from_tensors(tensors)


def test_config_is_read_from_shapes() -> None:
    config = RWKV7Config.from_tensors(
        rwkv7_tensors(n_layer=3, n_embd=192, lora=48, vocab_size=1000)
    )
    assert (config.n_layer, config.n_embd, config.n_head, config.head_size) == (3, 192, 3, 64)
    assert (config.vocab_size, config.ffn_size) == (1000, 768)
    assert config.decay_lora == config.iclr_lora == config.value_lora == config.gate_lora == 48
    assert config.describe() == "RWKV-7 L3 D192"


def test_matches_float64_reference_loop(tensors, model) -> None:
    expected_logits, expected_states = reference_forward(tensors, TOKENS)
    state = None
    for position, token in enumerate(TOKENS):
        logits, state = model.forward([token], state)
        error = _relative_error(logits, expected_logits[position])
        assert error < 1e-5, f"token {position}: relative error {error:.2e}"
    for layer, expected in zip(state.layers, expected_states, strict=True):
        for name, tensor in expected.items():
            assert _relative_error(getattr(layer, name), tensor) < 1e-5, name


def test_whole_sequence_equals_token_by_token(model) -> None:
    sequence_logits, sequence_state = model.forward(TOKENS)
    state = None
    for token in TOKENS:
        logits, state = model.forward([token], state)
    assert _relative_error(sequence_logits, logits) < 1e-6
    _assert_states_close(sequence_state, state, 1e-6)


def test_chunked_prefill_equals_one_forward(model) -> None:
    whole_logits, whole_state = model.forward(TOKENS)
    progress = []
    session = prefill(
        model, TOKENS, chunk_len=4, on_progress=lambda done, total: progress.append((done, total))
    )
    assert progress == [(4, 13), (8, 13), (12, 13), (13, 13)]
    assert session.tokens_consumed == len(TOKENS)
    assert _relative_error(session.logits, whole_logits) < 1e-6
    _assert_states_close(session.state, whole_state, 1e-6)


def test_forward_leaves_the_input_state_untouched(model) -> None:
    _, state = model.forward(TOKENS[:5])
    snapshot = state.clone()
    model.forward(TOKENS[5:], state)
    _assert_states_close(state, snapshot, 0.0)


def test_state_has_named_per_layer_tensors(model) -> None:
    _, state = model.forward(TOKENS)
    named = state.named_tensors()
    assert set(named) == {
        f"blocks.{i}.{name}" for i in range(3) for name in ("att.shift", "att.wkv", "ffn.shift")
    }
    assert named["blocks.2.att.wkv"].shape == (2, 64, 64)
    assert named["blocks.2.att.wkv"].dtype == torch.float32
    assert all(tensor.abs().sum() > 0 for tensor in named.values())


def test_logits_are_not_degenerate(model) -> None:
    """The fixture's initialisation must give spread-out logits, or parity tests prove little."""
    logits, _ = model.forward(TOKENS)
    probabilities = torch.softmax(logits, dim=-1)
    assert logits.std() > 0.5
    assert probabilities.max() < 0.9
    assert torch.isfinite(logits).all()


def test_context_changes_the_prediction(model) -> None:
    a, _ = model.forward([100, 200, 300])
    b, _ = model.forward([400, 200, 300])
    assert _relative_error(a, b) > 1e-3


def test_safetensors_and_pth_give_identical_logits(rwkv7_pth, rwkv7_safetensors) -> None:
    from_pth, _ = load_model(rwkv7_pth).forward(TOKENS)
    from_safetensors, _ = load_model(rwkv7_safetensors).forward(TOKENS)
    assert torch.equal(from_pth, from_safetensors)


def test_fp32_checkpoint_loads_like_bf16(tmp_path, tensors) -> None:
    fp32 = {name: tensor.float() for name, tensor in tensors.items()}
    a, _ = RWKV7.from_tensors(fp32).forward(TOKENS)
    b, _ = RWKV7.from_tensors(tensors).forward(TOKENS)
    assert torch.equal(a, b)  # bf16 -> fp32 is exact


def test_bf16_compute_stays_close_to_fp32(tensors, model) -> None:
    bf16_logits, state = RWKV7.from_tensors(tensors, dtype=torch.bfloat16).forward(TOKENS)
    fp32_logits, _ = model.forward(TOKENS)
    assert state.layers[0].att_wkv.dtype == torch.float32
    assert _relative_error(bf16_logits, fp32_logits) < 0.05


def test_out_of_range_token_is_refused(model) -> None:
    with pytest.raises(Exception, match="out of range"):
        model.forward([model.vocab_size])


def test_sequence_logits_give_every_position_and_carry_gradients(tensors) -> None:
    model = RWKV7.from_tensors(tensors)
    all_logits, _ = model.sequence_logits(TOKENS)
    state = None
    for position, token in enumerate(TOKENS):
        logits, state = model.forward([token], state)
        assert _relative_error(all_logits[position], logits) < 1e-5

    trainable = {name: tensor.float().requires_grad_() for name, tensor in tensors.items()}
    logits, _ = RWKV7.from_tensors(trainable).sequence_logits(TOKENS[:-1])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(TOKENS[1:]))
    loss.backward()
    for name in (
        "emb.weight",
        "blocks.0.ln0.weight",
        "blocks.1.att.w1",
        "blocks.1.att.v0",
        "blocks.0.ffn.value.weight",
        "head.weight",
    ):
        assert trainable[name].grad is not None and trainable[name].grad.abs().sum() > 0, name
