"""RWKV-4, 5.0, 5.1, 5.2 and 6: exactness against a float64 naive loop, internal consistency,
reduced precision, validation, the converted-weights cache and saved states."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.errors import CheckpointError, UnsupportedModelError
from rwkv_cli.generation import Session, stream_generate
from rwkv_cli.loading.converted import load_model_cached
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.models import MODEL_CLASSES, load_model
from rwkv_cli.models.prepare import RESCALE_LAYER
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.statefile import ModelIdentity, read_state_file, save_state_file
from rwkv_cli.statetuning import import_state_tuning
from rwkv_cli.tokenizer import tokenizer_for_vocab
from tests.support.fixtures import LEGACY_GENERATIONS, legacy_tensors, write_pth, write_safetensors
from tests.support.reference_rwkv4to6 import reference_forward

TOKENS = [0, 33, 1000, 261, 11, 50000, 4000, 17, 17, 17, 500, 2, 50276]
SHORT = [0, 33, 261, 11, 17, 17, 17, 250, 2]  # for models with small vocabularies
GREEDY = SamplingParams(temperature=0)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _assert_states_close(a, b, tolerance: float) -> None:
    named_a, named_b = a.named_tensors(), b.named_tensors()
    assert named_a.keys() == named_b.keys()
    for name in named_a:
        if name.endswith(".pp"):  # an exponent: compare it absolutely
            assert (named_a[name] - named_b[name]).abs().max() <= tolerance * 10, name
            continue
        error = _relative_error(named_a[name], named_b[name])
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.fixture(scope="module", params=LEGACY_GENERATIONS)
def generation(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tensors(generation) -> dict[str, torch.Tensor]:
    return legacy_tensors(generation, n_layer=3, seed=1)


@pytest.fixture(scope="module")
def model(generation, tensors):
    return MODEL_CLASSES[generation].from_tensors(tensors)


@pytest.mark.parametrize(
    ("generation_name", "expected"),
    [
        ("4", ("RWKV-4 L3 D128", 0, 512)),
        ("5.0", ("RWKV-5.0 L3 D128", 64, 512)),
        ("5.1", ("RWKV-5.1 L3 D128", 64, 512)),
        ("5.2", ("RWKV-5.2 L3 D128", 64, 448)),
        ("6", ("RWKV-6 L3 D128", 64, 448)),
    ],
)
def test_dimensions_are_read_from_shapes(generation_name, expected) -> None:
    model = MODEL_CLASSES[generation_name].from_tensors(
        legacy_tensors(generation_name, n_layer=3, vocab_size=1000)
    )
    description, head_size, ffn_size = expected
    assert model.generation == generation_name
    assert model.describe() == description
    assert (model.vocab_size, model.config.ffn_size) == (1000, ffn_size)
    identity = ModelIdentity.of(model, "tokenizer")
    assert (identity.n_layer, identity.n_embd, identity.head_size) == (3, 128, head_size)


def test_rwkv6_lora_widths_are_read_from_shapes() -> None:
    model = MODEL_CLASSES["6"].from_tensors(
        legacy_tensors("6", n_layer=1, vocab_size=100, mix_lora=16, decay_lora=48)
    )
    assert (model.config.mix_lora, model.config.decay_lora) == (16, 48)


def test_matches_float64_reference_loop(generation, tensors, model) -> None:
    expected_logits, expected_states = reference_forward(tensors, TOKENS, generation)
    state = None
    for position, token in enumerate(TOKENS):
        logits, state = model.forward([token], state)
        error = _relative_error(logits, expected_logits[position])
        assert error < 1e-5, f"token {position}: relative error {error:.2e}"
    for layer, expected in zip(state.layers, expected_states, strict=True):
        assert _relative_error(layer.att_shift, expected["att_shift"]) < 1e-5
        assert _relative_error(layer.ffn_shift, expected["ffn_shift"]) < 1e-5
        if generation == "4":  # ours is scaled by exp(-pp) to stay finite
            scale = torch.exp(layer.att_pp.double())
            assert _relative_error(layer.att_aa * scale, expected["num"]) < 1e-5
            assert _relative_error(layer.att_bb * scale, expected["den"]) < 1e-5
        else:  # ours is [head, value, key], the reference's [head, key, value]
            assert _relative_error(layer.att_wkv, expected["kv"].transpose(1, 2)) < 1e-5


def test_whole_sequence_equals_token_by_token(model) -> None:
    sequence_logits, sequence_state = model.forward(TOKENS)
    state = None
    for token in TOKENS:
        logits, state = model.forward([token], state)
    assert _relative_error(sequence_logits, logits) < 1e-6
    _assert_states_close(sequence_state, state, 1e-6)


def test_chunks_continue_through_the_state(model) -> None:
    whole_logits, whole_state = model.forward(TOKENS)
    _, state = model.forward(TOKENS[:5])
    logits, state = model.forward(TOKENS[5:], state)
    assert _relative_error(logits, whole_logits) < 1e-6
    _assert_states_close(state, whole_state, 1e-6)


def test_forward_leaves_the_input_state_untouched(model) -> None:
    _, state = model.forward(TOKENS[:5])
    snapshot = state.clone()
    model.forward(TOKENS[5:], state)
    _assert_states_close(state, snapshot, 0.0)


def test_state_has_named_per_layer_tensors(generation, model) -> None:
    _, state = model.forward(TOKENS)
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


def test_logits_are_not_degenerate(model) -> None:
    """The fixture's initialisation must give spread-out logits, or parity tests prove little."""
    logits, _ = model.forward(TOKENS)
    assert logits.std() > 0.5
    assert torch.softmax(logits, dim=-1).max() < 0.9
    assert torch.isfinite(logits).all()


def test_context_changes_the_prediction(model) -> None:
    a, _ = model.forward([100, 200, 300])
    b, _ = model.forward([400, 200, 300])
    assert _relative_error(a, b) > 1e-3


def test_bf16_compute_stays_close_to_fp32(generation, tensors, model) -> None:
    bf16 = MODEL_CLASSES[generation].from_tensors(tensors, dtype=torch.bfloat16)
    logits, state = bf16.forward(TOKENS)
    expected, _ = model.forward(TOKENS)
    assert state.layers[0].att_shift.dtype == torch.bfloat16
    assert _relative_error(logits, expected) < 0.05


def test_fp16_is_rescaled_every_six_layers_and_stays_close(generation) -> None:
    """Seven layers: layer 6 is the first whose output weights are halved, after layer 5 the
    residual is halved; the logits must not notice."""
    tensors = legacy_tensors(generation, n_layer=RESCALE_LAYER + 1, vocab_size=1000, seed=2)
    model_class = MODEL_CLASSES[generation]
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
    assert _relative_error(logits, expected) < 0.02


def test_fp16_without_the_rescale_overflows(monkeypatch) -> None:
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
    assert _relative_error(rescaled, expected) < 0.02
    monkeypatch.setattr(model_class, "rescale_layer", 10**6)  # rescale off
    unscaled, _ = model_class.from_tensors(tensors, dtype=torch.float16).forward([1, 2, 3])
    assert not torch.isfinite(unscaled).all()


def test_fp32_checkpoint_loads_like_bf16(generation, tensors, model) -> None:
    fp32 = {name: tensor.float() for name, tensor in tensors.items()}
    a, _ = MODEL_CLASSES[generation].from_tensors(fp32).forward(TOKENS)
    b, _ = model.forward(TOKENS)
    assert torch.equal(a, b)  # bf16 -> fp32 is exact


def test_out_of_range_token_is_refused(model) -> None:
    with pytest.raises(Exception, match="out of range"):
        model.forward([model.vocab_size])


def test_files_are_detected_and_pth_equals_safetensors(tmp_path, generation) -> None:
    tensors = legacy_tensors(generation, n_layer=1, vocab_size=300)
    from_pth = load_model(write_pth(tmp_path / "model.pth", tensors))
    from_safetensors = load_model(write_safetensors(tmp_path / "model.safetensors", tensors))
    assert from_pth.generation == from_safetensors.generation == generation
    assert from_pth.fingerprint == from_safetensors.fingerprint != ""
    assert torch.equal(from_pth.forward(SHORT[:4])[0], from_safetensors.forward(SHORT[:4])[0])


def test_converted_cache_gives_the_same_model(tmp_path, generation) -> None:
    tensors = legacy_tensors(generation, n_layer=2, vocab_size=300, seed=3)
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
        assert _relative_error(model.forward([1, 2, 3])[0], expected) < 1e-6


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
    assert _relative_error(a, b) < 1e-6


def test_missing_tensor_is_named(generation) -> None:
    tensors = legacy_tensors(generation, n_layer=2, vocab_size=300)
    del tensors["blocks.1.ffn.receptance.weight"]
    with pytest.raises(CheckpointError, match=r"incomplete RWKV-.*missing blocks\.1\.ffn\.rec"):
        MODEL_CLASSES[generation].from_tensors(tensors)


def test_unknown_tensor_is_refused(generation) -> None:
    tensors = legacy_tensors(generation, n_layer=1, vocab_size=300)
    tensors["blocks.0.att.time_state"] = torch.zeros(2, 64, 64)
    with pytest.raises(
        UnsupportedModelError, match=r"unexpected tensors blocks\.0\.att\.time_state"
    ):
        MODEL_CLASSES[generation].from_tensors(tensors)


def test_wrong_shape_is_refused(generation) -> None:
    tensors = legacy_tensors(generation, n_layer=1, vocab_size=300)
    tensors["blocks.0.att.key.weight"] = torch.zeros(128, 64)
    with pytest.raises(CheckpointError, match=r"att\.key\.weight has shape \[128, 64\]"):
        MODEL_CLASSES[generation].from_tensors(tensors)


def _generate(model, tokenizer, prompt: str, session: Session | None, n: int):
    chunks = list(
        stream_generate(
            model,
            tokenizer,
            prompt,
            params=GREEDY,
            generator=make_generator(0)[0],
            max_tokens=n,
            session=session,
        )
    )
    return [chunk.token for chunk in chunks if chunk.token is not None], chunks[-1].session


def test_saved_state_resumes_exactly(tmp_path, generation) -> None:
    tensors = legacy_tensors(generation, n_layer=2, seed=4)
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
    _assert_states_close(restored.state, session.state, 0.0)
    rest, _ = _generate(model, tokenizer, "", restored, 7)
    assert first + rest == uninterrupted


@pytest.mark.parametrize("generation_name", ["5.2", "6"])
def test_state_tuning_file_loads_as_is(tmp_path, generation_name) -> None:
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
    assert _relative_error(tuned, plain) > 1e-3
