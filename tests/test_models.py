"""Every RWKV generation (4, 5.0, 5.1, 5.2, 6 and 7): exactness against a float64 naive loop,
internal consistency, reduced precision, the file formats, the converted-weights cache and saved
states, each tested once for all six; then what only some generations have."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.errors import CheckpointError, UnsupportedModelError
from rwkv_cli.generation import Session, prefill
from rwkv_cli.loading.converted import load_model_cached
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.models import MODEL_CLASSES, load_model
from rwkv_cli.models.prepare import RESCALE_LAYER
from rwkv_cli.models.rwkv7 import RWKV7, RWKV7Config
from rwkv_cli.statefile import ModelIdentity, read_state_file, save_state_file
from rwkv_cli.statetuning import import_state_tuning
from rwkv_cli.tokenizer import tokenizer_for_vocab
from tests.support import reference_rwkv4to6, reference_rwkv7
from tests.support.fixtures import (
    GENERATIONS,
    LEGACY_GENERATIONS,
    generation_tensors,
    legacy_tensors,
    rwkv7_tensors,
    write_pth,
    write_safetensors,
)
from tests.support.generation import generated_tokens, greedy_chunks
from tests.support.numerics import assert_states_close, relative_error

# Thirteen tokens spread over the vocabulary, its last id included: the Pile vocabulary of the
# RWKV-4 fixture ends at 50276, the World vocabulary of RWKV-7 at 65535.
LEGACY_TOKENS = [0, 33, 1000, 261, 11, 50000, 4000, 17, 17, 17, 500, 2, 50276]
RWKV7_TOKENS = [0, 33, 1000, 261, 11, 65000, 4000, 17, 17, 17, 500, 2, 65535]
SHORT = [0, 33, 261, 11, 17, 17, 17, 250, 2]  # for models with small vocabularies


@pytest.fixture(scope="module", params=GENERATIONS)
def generation(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokens(generation) -> list[int]:
    return RWKV7_TOKENS if generation == "7" else LEGACY_TOKENS


@pytest.fixture(scope="module")
def tensors(generation) -> dict[str, torch.Tensor]:
    return generation_tensors(generation, n_layer=3, seed=1)


@pytest.fixture(scope="module")
def model(generation, tensors):
    return MODEL_CLASSES[generation].from_tensors(tensors)


# --- every generation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation_name", "expected"),
    [
        ("4", ("RWKV-4 L3 D128", 0, 512)),
        ("5.0", ("RWKV-5.0 L3 D128", 64, 512)),
        ("5.1", ("RWKV-5.1 L3 D128", 64, 512)),
        ("5.2", ("RWKV-5.2 L3 D128", 64, 448)),
        ("6", ("RWKV-6 L3 D128", 64, 448)),
        ("7", ("RWKV-7 L3 D128", 64, 512)),
    ],
)
def test_dimensions_are_read_from_shapes(generation_name, expected) -> None:
    model = MODEL_CLASSES[generation_name].from_tensors(
        generation_tensors(generation_name, n_layer=3, vocab_size=1000)
    )
    description, head_size, ffn_size = expected
    assert model.generation == generation_name
    assert model.describe() == description
    assert (model.vocab_size, model.config.ffn_size) == (1000, ffn_size)
    identity = ModelIdentity.of(model, "tokenizer")
    assert (identity.n_layer, identity.n_embd, identity.head_size) == (3, 128, head_size)


def _reference_forward(generation: str, tensors, tokens: list[int]):
    """The float64 loop's logits (T, V) and final state, per layer a dict of tensors."""
    if generation == "7":
        return reference_rwkv7.reference_forward(tensors, tokens)
    return reference_rwkv4to6.reference_forward(tensors, tokens, generation)


def _as_reference_state(generation: str, layer) -> dict[str, torch.Tensor]:
    """One layer of our state under the reference's names and in its layout."""
    if generation == "7":
        return {
            "att_shift": layer.att_shift,
            "att_wkv": layer.att_wkv,
            "ffn_shift": layer.ffn_shift,
        }
    shifts = {"att_shift": layer.att_shift, "ffn_shift": layer.ffn_shift}
    if generation == "4":  # ours is scaled by exp(-pp) to stay finite
        scale = torch.exp(layer.att_pp.double())
        return shifts | {"num": layer.att_aa * scale, "den": layer.att_bb * scale}
    return shifts | {"kv": layer.att_wkv.transpose(1, 2)}  # ours [head, value, key]


def test_matches_float64_reference_loop(generation, tensors, tokens, model) -> None:
    expected_logits, expected_states = _reference_forward(generation, tensors, tokens)
    state = None
    for position, token in enumerate(tokens):
        logits, state = model.forward([token], state)
        error = relative_error(logits, expected_logits[position])
        assert error < 1e-5, f"token {position}: relative error {error:.2e}"
    for layer, expected in zip(state.layers, expected_states, strict=True):
        ours = _as_reference_state(generation, layer)
        assert ours.keys() == expected.keys()
        for name, tensor in expected.items():
            assert relative_error(ours[name], tensor) < 1e-5, name


def test_whole_sequence_equals_token_by_token(model, tokens) -> None:
    sequence_logits, sequence_state = model.forward(tokens)
    state = None
    for token in tokens:
        logits, state = model.forward([token], state)
    assert relative_error(sequence_logits, logits) < 1e-6
    assert_states_close(sequence_state, state, 1e-6)


def test_chunks_continue_through_the_state(model, tokens) -> None:
    whole_logits, whole_state = model.forward(tokens)
    _, state = model.forward(tokens[:5])
    logits, state = model.forward(tokens[5:], state)
    assert relative_error(logits, whole_logits) < 1e-6
    assert_states_close(state, whole_state, 1e-6)


def test_chunked_prefill_equals_one_forward(model, tokens) -> None:
    whole_logits, whole_state = model.forward(tokens)
    progress = []
    session = prefill(
        model, tokens, chunk_len=4, on_progress=lambda done, total: progress.append((done, total))
    )
    assert progress == [(4, 13), (8, 13), (12, 13), (13, 13)]
    assert session.tokens_consumed == len(tokens)
    assert relative_error(session.logits, whole_logits) < 1e-6
    assert_states_close(session.state, whole_state, 1e-6)


def test_forward_leaves_the_input_state_untouched(model, tokens) -> None:
    _, state = model.forward(tokens[:5])
    snapshot = state.clone()
    model.forward(tokens[5:], state)
    assert_states_close(state, snapshot, 0.0)


def test_state_has_named_per_layer_tensors(generation, model, tokens) -> None:
    _, state = model.forward(tokens)
    named = state.named_tensors()
    if generation == "4":
        fields, recurrent = ("att.shift", "att.aa", "att.bb", "att.pp", "ffn.shift"), "att.aa"
        assert named["blocks.2.att.aa"].shape == (128,)
        assert model.new_state().layers[0].att_pp.eq(-1e30).all()
    else:
        fields, recurrent = ("att.shift", "att.wkv", "ffn.shift"), "att.wkv"
        assert named["blocks.2.att.wkv"].shape == (2, 64, 64)
    assert set(named) == {f"blocks.{i}.{name}" for i in range(3) for name in fields}
    assert named[f"blocks.2.{recurrent}"].dtype == torch.float32
    assert state.generation == generation
    assert all(tensor.abs().sum() > 0 for tensor in named.values())


def test_logits_are_not_degenerate(model, tokens) -> None:
    """The fixture's initialisation must give spread-out logits, or parity tests prove little."""
    logits, _ = model.forward(tokens)
    assert logits.std() > 0.5
    assert torch.softmax(logits, dim=-1).max() < 0.9
    assert torch.isfinite(logits).all()


def test_context_changes_the_prediction(model) -> None:
    a, _ = model.forward([100, 200, 300])
    b, _ = model.forward([400, 200, 300])
    assert relative_error(a, b) > 1e-3


def test_bf16_compute_stays_close_to_fp32(generation, tensors, tokens, model) -> None:
    bf16 = MODEL_CLASSES[generation].from_tensors(tensors, dtype=torch.bfloat16)
    logits, state = bf16.forward(tokens)
    expected, _ = model.forward(tokens)
    recurrent = "att.aa" if generation == "4" else "att.wkv"
    assert state.layers[0].att_shift.dtype == torch.bfloat16  # the shifts in the compute dtype,
    assert state.named_tensors()[f"blocks.0.{recurrent}"].dtype == torch.float32  # the sums not
    assert relative_error(logits, expected) < 0.05


def test_fp32_checkpoint_loads_like_bf16(generation, tensors, tokens, model) -> None:
    fp32 = {name: tensor.float() for name, tensor in tensors.items()}
    a, _ = MODEL_CLASSES[generation].from_tensors(fp32).forward(tokens)
    b, _ = model.forward(tokens)
    assert torch.equal(a, b)  # bf16 -> fp32 is exact


def test_out_of_range_token_is_refused(model) -> None:
    with pytest.raises(Exception, match="out of range"):
        model.forward([model.vocab_size])


def test_files_are_detected_and_pth_equals_safetensors(tmp_path, generation) -> None:
    tensors = generation_tensors(generation, n_layer=1, vocab_size=300)
    from_pth = load_model(write_pth(tmp_path / "model.pth", tensors))
    from_safetensors = load_model(write_safetensors(tmp_path / "model.safetensors", tensors))
    assert from_pth.generation == from_safetensors.generation == generation
    assert from_pth.fingerprint == from_safetensors.fingerprint != ""
    assert torch.equal(from_pth.forward(SHORT[:4])[0], from_safetensors.forward(SHORT[:4])[0])


def test_world_vocabulary_pth_and_safetensors_give_identical_logits(
    rwkv7_pth, rwkv7_safetensors
) -> None:
    from_pth, _ = load_model(rwkv7_pth).forward(RWKV7_TOKENS)
    from_safetensors, _ = load_model(rwkv7_safetensors).forward(RWKV7_TOKENS)
    assert torch.equal(from_pth, from_safetensors)


def test_converted_cache_gives_the_same_model(tmp_path, generation) -> None:
    tensors = generation_tensors(generation, n_layer=2, vocab_size=300, seed=3)
    path = write_pth(tmp_path / f"rwkv-{generation}.pth", tensors)
    direct = load_model(path)
    converted = load_model_cached(path)  # prepares and writes the cache
    cached = load_model_cached(path)  # memory-maps it
    expected, _ = direct.forward([1, 2, 3])
    for model in (converted, cached):
        assert model.generation == generation
        assert model.fingerprint == direct.fingerprint
        # Not bit-equal: memory-mapped tensors sit at other alignments, so SIMD sums may round
        # differently in the last bit.
        assert relative_error(model.forward([1, 2, 3])[0], expected) < 1e-6


def _generate(model, tokenizer, prompt: str, session: Session | None, n: int):
    chunks = greedy_chunks(model, tokenizer, prompt, n, session)
    return generated_tokens(chunks), chunks[-1].session


def test_saved_state_resumes_exactly(tmp_path, generation) -> None:
    tensors = generation_tensors(generation, n_layer=2, seed=4)
    model = load_model(write_pth(tmp_path / "model.pth", tensors))
    tokenizer = tokenizer_for_vocab(model.vocab_size)
    prompt = "The state of an RNN is its memory."
    uninterrupted, _ = _generate(model, tokenizer, prompt, None, 12)
    first, session = _generate(model, tokenizer, prompt, None, 5)
    path = tmp_path / "state.rwkvstate"
    loaded = LoadedModel(model, tokenizer, "tiny", Provenance(tmp_path / "model.pth"))
    save_state_file(path, loaded, session)
    saved = read_state_file(path)
    assert saved.identity.generation == generation
    assert saved.identity.head_size == (0 if generation == "4" else 64)
    restored = saved.session_for(model, tokenizer.name)
    assert torch.equal(restored.logits, session.logits)
    assert_states_close(restored.state, session.state, 0.0)
    rest, _ = _generate(model, tokenizer, "", restored, 7)
    assert first + rest == uninterrupted


# --- RWKV-4, 5 and 6 ----------------------------------------------------------------------------


@pytest.mark.parametrize("legacy_generation", LEGACY_GENERATIONS)
def test_legacy_fp16_is_rescaled_every_six_layers_and_stays_close(legacy_generation) -> None:
    """Seven layers: layer 6 is the first whose output weights are halved, after layer 5 the
    residual is halved; the logits must not notice."""
    tensors = legacy_tensors(legacy_generation, n_layer=RESCALE_LAYER + 1, vocab_size=1000, seed=2)
    model_class = MODEL_CLASSES[legacy_generation]
    prepared = model_class.prepare(tensors, torch.float16)
    for name in ("att.output.weight", "ffn.value.weight"):
        for layer, divisor in ((0, 1), (RESCALE_LAYER - 1, 1), (RESCALE_LAYER, 2)):
            expected = (tensors[f"blocks.{layer}.{name}"].float() / divisor).half()
            assert torch.equal(prepared[f"blocks.{layer}.{name}"], expected)
    fp16 = model_class.from_prepared(prepared)
    assert fp16.rescaled and fp16.dtype == torch.float16
    logits, _ = fp16.forward(SHORT)
    expected, _ = model_class.from_tensors(tensors).forward(SHORT)
    assert torch.isfinite(logits).all()
    assert relative_error(logits, expected) < 0.02


def test_rwkv4_fp16_without_the_rescale_overflows(monkeypatch) -> None:
    """A model whose residual stream grows by ~6000 per layer passes fp16's 65504 in 13 layers;
    with the rescale it stays finite and close to fp32."""
    tensors = legacy_tensors("4", n_layer=2 * RESCALE_LAYER + 1, n_embd=64, vocab_size=100)
    alternating = torch.where(torch.arange(64) % 2 == 0, 100.0, -100.0)  # (C,)
    for name in tensors:
        if name.endswith("ffn.value.weight"):  # each FFN adds ±100·Σ hidden to every channel
            tensors[name] = alternating[:, None].expand(tensors[name].shape).bfloat16()
    model_class = MODEL_CLASSES["4"]
    expected, _ = model_class.from_tensors(tensors).forward([1, 2, 3])
    rescaled, _ = model_class.from_tensors(tensors, dtype=torch.float16).forward([1, 2, 3])
    assert torch.isfinite(rescaled).all()
    assert relative_error(rescaled, expected) < 0.02
    monkeypatch.setattr(model_class, "rescale_layer", 10**6)  # rescale off
    unscaled, _ = model_class.from_tensors(tensors, dtype=torch.float16).forward([1, 2, 3])
    assert not torch.isfinite(unscaled).all()


def test_rwkv5_bonus_spellings_agree() -> None:
    """Early RWKV-5 files store log(u) as time_first; later ones u as time_faaaa."""
    tensors = legacy_tensors("5.0", n_layer=2, vocab_size=300)
    respelled = {
        name.replace("time_first", "time_faaaa"): torch.exp(t.float())
        if "time_first" in name
        else t
        for name, t in tensors.items()
    }
    a, _ = MODEL_CLASSES["5.0"].from_tensors(tensors).forward(SHORT[:5])
    b, _ = MODEL_CLASSES["5.0"].from_tensors(respelled).forward(SHORT[:5])
    assert relative_error(a, b) < 1e-6


def test_rwkv6_lora_widths_are_read_from_shapes() -> None:
    model = MODEL_CLASSES["6"].from_tensors(
        legacy_tensors("6", n_layer=1, vocab_size=100, mix_lora=16, decay_lora=48)
    )
    assert (model.config.mix_lora, model.config.decay_lora) == (16, 48)


@pytest.mark.parametrize("legacy_generation", LEGACY_GENERATIONS)
def test_legacy_missing_tensor_is_named(legacy_generation) -> None:
    tensors = legacy_tensors(legacy_generation, n_layer=2, vocab_size=300)
    del tensors["blocks.1.ffn.receptance.weight"]
    with pytest.raises(CheckpointError, match=r"incomplete RWKV-.*missing blocks\.1\.ffn\.rec"):
        MODEL_CLASSES[legacy_generation].from_tensors(tensors)


@pytest.mark.parametrize("legacy_generation", LEGACY_GENERATIONS)
def test_legacy_unknown_tensor_is_refused(legacy_generation) -> None:
    tensors = legacy_tensors(legacy_generation, n_layer=1, vocab_size=300)
    tensors["blocks.0.att.time_state"] = torch.zeros(2, 64, 64)
    with pytest.raises(
        UnsupportedModelError, match=r"unexpected tensors blocks\.0\.att\.time_state"
    ):
        MODEL_CLASSES[legacy_generation].from_tensors(tensors)


@pytest.mark.parametrize("legacy_generation", LEGACY_GENERATIONS)
def test_legacy_wrong_shape_is_refused(legacy_generation) -> None:
    tensors = legacy_tensors(legacy_generation, n_layer=1, vocab_size=300)
    tensors["blocks.0.att.key.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"att\.key\.weight has shape \[128, 64\]"):
        MODEL_CLASSES[legacy_generation].from_tensors(tensors)


@pytest.mark.parametrize("generation_name", ["5.2", "6"])
def test_rwkv52_and_rwkv6_state_tuning_file_loads_as_is(tmp_path, generation_name) -> None:
    """BlinkDL's state-tuning files hold time_state (H, N, N) as [head, value, key]: our layout."""
    model = MODEL_CLASSES[generation_name].from_tensors(
        legacy_tensors(generation_name, n_layer=2, vocab_size=300)
    )
    generator = torch.Generator().manual_seed(5)
    states = {
        f"blocks.{i}.att.time_state": torch.randn(2, 64, 64, generator=generator).bfloat16()
        for i in range(2)
    }
    session = import_state_tuning(write_pth(tmp_path / "tuned.pth", states), model)
    for i, layer in enumerate(session.state.layers):
        assert torch.equal(layer.att_wkv, states[f"blocks.{i}.att.time_state"].float())
    tuned, _ = model.forward([1, 2], session.state)
    plain, _ = model.forward([1, 2])
    assert relative_error(tuned, plain) > 1e-3


# --- RWKV-7 -------------------------------------------------------------------------------------


def test_rwkv7_config_is_read_from_shapes() -> None:
    config = RWKV7Config.from_tensors(
        rwkv7_tensors(n_layer=3, n_embd=192, lora=48, vocab_size=1000)
    )
    assert (config.n_layer, config.n_embd, config.n_head, config.head_size) == (3, 192, 3, 64)
    assert (config.vocab_size, config.ffn_size) == (1000, 768)
    assert config.decay_lora == config.iclr_lora == config.value_lora == config.gate_lora == 48
    assert config.describe() == "RWKV-7 L3 D192"


def test_rwkv7_sequence_logits_give_every_position_and_carry_gradients() -> None:
    tensors = rwkv7_tensors(n_layer=3, seed=1)
    model = RWKV7.from_tensors(tensors)
    all_logits, _ = model.sequence_logits(RWKV7_TOKENS)
    state = None
    for position, token in enumerate(RWKV7_TOKENS):
        logits, state = model.forward([token], state)
        assert relative_error(all_logits[position], logits) < 1e-5

    trainable = {name: tensor.float().requires_grad_() for name, tensor in tensors.items()}
    logits, _ = RWKV7.from_tensors(trainable).sequence_logits(RWKV7_TOKENS[:-1])
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(RWKV7_TOKENS[1:]))
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
