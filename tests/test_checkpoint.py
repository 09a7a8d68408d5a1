"""Checkpoint reading, generation detection and the errors for unusable files."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from rwkv_cli.errors import CheckpointError, ModelNotFoundError, UnsupportedModelError
from rwkv_cli.loading.checkpoint import (
    detect_generation,
    load_checkpoint,
    read_tensors,
    weights_fingerprint,
)
from rwkv_cli.loading.converted import load_model_cached
from rwkv_cli.models import load_model, model_from_checkpoint
from tests.support.fixtures import rwkv7_tensors, write_pth, write_safetensors

C, H = 8, 2
COMMON = {
    "emb.weight": (16, C),
    "head.weight": (16, C),
    "ln_out.weight": (C,),
    "blocks.0.ln0.weight": (C,),
    "blocks.0.ln1.weight": (C,),
    "blocks.0.ffn.key.weight": (4 * C, C),
}
V4 = {"att.time_decay": (C,), "att.time_first": (C,), "att.time_mix_k": (1, 1, C)}
V5_0 = {**V4, "att.time_decay": (H,), "att.ln_x.weight": (C,)}
V5_1 = {**V5_0, "att.gate.weight": (C, C), "att.time_mix_g": (1, 1, C)}
V5_2 = {**V5_1, "att.time_decay": (H, C // H), "att.time_faaaa": (H, C // H)}
V6 = {**V5_2, "att.time_maa_x": (1, 1, C), "att.time_decay": (1, 1, C)}
V7 = {"att.x_r": (1, 1, C), "att.r_k": (H, C // H), "att.ln_x.weight": (C,)}


def _fake(block_keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    shapes = {**COMMON, **{f"blocks.0.{name}": shape for name, shape in block_keys.items()}}
    return {name: torch.zeros(shape) for name, shape in shapes.items()}


@pytest.mark.parametrize(
    ("keys", "generation"),
    [(V4, "4"), (V5_0, "5.0"), (V5_1, "5.1"), (V5_2, "5.2"), (V6, "6"), (V7, "7")],
)
def test_generation_is_detected_from_keys(keys, generation) -> None:
    assert detect_generation(_fake(keys)) == generation


@pytest.mark.parametrize(("keys", "name"), [(V4, "RWKV-4"), (V5_2, "RWKV-5.2"), (V6, "RWKV-6")])
def test_malformed_checkpoints_are_refused_naming_their_generation(tmp_path, keys, name) -> None:
    path = write_pth(tmp_path / "model-x070.pth", _fake(keys))  # the name must not matter
    checkpoint = load_checkpoint(path)
    refused = (CheckpointError, UnsupportedModelError)
    message = rf"(incomplete {name} checkpoint|unsupported {name} variant)"
    with pytest.raises(refused, match=message):
        model_from_checkpoint(checkpoint)


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="unrecognised checkpoint layout"):
        detect_generation(_fake({"att.something_new": (C,)}))


def test_state_tuning_file_is_explained() -> None:
    tensors = {"blocks.0.att.time_state": torch.zeros(H, 4, 4)}
    with pytest.raises(UnsupportedModelError, match="state-tuning file"):
        detect_generation(tensors)


def test_unknown_transformers_layout_is_explained() -> None:
    tensors = {"model.embeddings.weight": torch.zeros(4, 4), "lm_head.weight": torch.zeros(4, 4)}
    with pytest.raises(UnsupportedModelError, match="transformers layout"):
        detect_generation(tensors)


def test_tensor_dict_without_embedding_is_not_a_model() -> None:
    with pytest.raises(UnsupportedModelError, match=r"not an RWKV model: no emb\.weight"):
        detect_generation({"weight": torch.zeros(3)})


def test_experimental_rwkv7_variant_is_refused(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=32)
    tensors["blocks.0.ffn.s_emb.weight"] = torch.zeros(32, 32)
    with pytest.raises(UnsupportedModelError, match=r"unsupported RWKV-7 variant.*s_emb"):
        load_model(write_pth(tmp_path / "rwkv7a.pth", tensors))


def test_missing_tensor_is_reported(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=2, n_embd=64, vocab_size=32)
    del tensors["blocks.1.att.g2"]
    with pytest.raises(CheckpointError, match=r"missing blocks\.1\.att\.g2"):
        load_model(write_pth(tmp_path / "m.pth", tensors))


def test_errors_about_the_contents_name_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RWKV_CLI_HOME", str(tmp_path / "home"))
    tensors = rwkv7_tensors(n_layer=2, n_embd=64, vocab_size=32)
    del tensors["blocks.1.att.g2"]
    path = write_pth(tmp_path / "m.pth", tensors)
    for load in (load_model, load_model_cached):  # read directly, or converted first
        with pytest.raises(CheckpointError) as caught:
            load(path)
        assert caught.value.message.startswith(f"{path}: incomplete RWKV-7 checkpoint")
    with pytest.raises(UnsupportedModelError, match=r"m2\.pth: not an RWKV model"):
        load_checkpoint(write_pth(tmp_path / "m2.pth", {"x": torch.zeros(2)}))


def test_wrong_shape_is_reported(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=2, n_embd=64, vocab_size=32)
    tensors["blocks.1.att.key.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight has shape \[64, 32\]"):
        load_model(write_pth(tmp_path / "m.pth", tensors))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_nan_or_infinite_weight_is_reported_at_load(tmp_path, bad_value) -> None:
    tensors = rwkv7_tensors(n_layer=2, n_embd=64, vocab_size=32)
    tensors["blocks.1.att.receptance.weight"][3, 5] = bad_value
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in blocks\.1\.att\.recep"):
        load_model(write_pth(tmp_path / "m.pth", tensors))


def test_block_zero_may_lack_the_unused_value_lora(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=2, n_embd=64, vocab_size=32)
    for name in ("v0", "v1", "v2"):
        del tensors[f"blocks.0.att.{name}"]
    logits, _ = load_model(write_pth(tmp_path / "m.pth", tensors)).forward([1, 2, 3])
    assert torch.isfinite(logits).all()


def test_pth_is_memory_mapped_and_safetensors_read(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=32)
    from_pth = read_tensors(write_pth(tmp_path / "m.pth", tensors))
    from_st = read_tensors(write_safetensors(tmp_path / "m.safetensors", tensors))
    assert from_pth.keys() == from_st.keys() == tensors.keys()
    assert all(torch.equal(from_pth[name], from_st[name]) for name in tensors)
    assert from_pth["emb.weight"].dtype == torch.bfloat16


def test_container_is_recognised_by_content_not_name(tmp_path) -> None:
    tensors = rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=32)
    path = write_safetensors(tmp_path / "weights.pth", tensors)
    assert load_checkpoint(path).generation == "7"


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        read_tensors(tmp_path / "nope.pth")


def test_directory_is_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        read_tensors(tmp_path)


def test_random_bytes_are_not_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"hello, I am not a model" * 10)
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        read_tensors(path)


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_is_reported(tmp_path, suffix, keep) -> None:
    tensors = rwkv7_tensors(n_layer=1, n_embd=64, vocab_size=32)
    writer = write_pth if suffix == "pth" else write_safetensors
    path = writer(tmp_path / f"m.{suffix}", tensors)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(path)


class _CreatesFileWhenUnpickled:
    """Unpickling this calls open(marker, "w"): a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_is_never_run(tmp_path) -> None:
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    torch.save({"emb.weight": torch.zeros(2), "payload": _CreatesFileWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointError, match="Python objects other than tensors"):
        read_tensors(path)
    assert not marker.exists()


def test_allowed_non_tensor_values_are_refused(tmp_path) -> None:
    path = tmp_path / "mixed.pth"
    torch.save({"emb.weight": torch.zeros(2), "counts": collections.Counter("abc")}, path)
    with pytest.raises(CheckpointError, match="not a flat dict of named tensors"):
        read_tensors(path)


def test_non_dict_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a flat dict of named tensors"):
        read_tensors(path)


def test_weights_fingerprint_is_stable_across_versions() -> None:
    """State files record this value: a change of algorithm would orphan every saved state.
    (The expected value was computed by the first implementation, which went through numpy.)"""
    tensors = {
        "emb.weight": torch.arange(600, dtype=torch.float32).reshape(20, 30).bfloat16(),
        "blocks.0.ln1.weight": torch.linspace(-1, 1, 7),
        "empty": torch.zeros(0),
    }
    assert weights_fingerprint(tensors) == "2ae3613e3deb1d4a"
