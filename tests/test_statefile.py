"""State files: round trip, exact resumption, validation, atomic writes, state-tuning import."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rwkv_cli.errors import StateFileError, WriteError
from rwkv_cli.fileio import atomic_write_bytes, check_writable
from rwkv_cli.generation import Session, prefill, stream_generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model, open_start
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.settings import ModelRequest
from rwkv_cli.statefile import CHECKSUM, data_checksum, read_state_file, save_state_file
from rwkv_cli.statetuning import import_state_tuning
from tests.support.fixtures import flip_tensor_bytes, write_pth, write_safetensors
from tests.support.generation import completed_text
from tests.support.numerics import assert_states_close

GREEDY = SamplingParams(temperature=0)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, presence_penalty=0.3, frequency_penalty=0.2)


@pytest.fixture(scope="module")
def loaded(rwkv7_pth) -> LoadedModel:
    return open_model(str(rwkv7_pth))


def _run(loaded: LoadedModel, prompt: str, session: Session | None, params, generator, n=12):
    return completed_text(loaded, prompt, session, params, generator, n)


def _save(path: Path, loaded: LoadedModel, session: Session, **extra) -> None:
    save_state_file(path, replace(loaded, spec="tiny"), session, **extra)


def _assert_sessions_identical(a: Session, b: Session) -> None:
    assert torch.equal(a.logits, b.logits)
    assert a.tokens_consumed == b.tokens_consumed
    assert_states_close(a.state, b.state, 0.0)


def test_round_trip_keeps_every_tensor_and_field(tmp_path, loaded) -> None:
    generator, seed = make_generator(11)
    _, session = _run(loaded, "Round trip", None, SAMPLED, generator)
    chat = {"template": "world", "transcript": [{"role": "user", "text": "你好"}]}
    path = tmp_path / "s.rwkvstate"
    _save(
        path,
        loaded,
        session,
        sampling=SAMPLED,
        seed=seed,
        generator=generator,
        text_tail="tail ✓",
        chat=chat,
    )

    saved = read_state_file(path)
    assert saved.identity.describe() == "RWKV-7 L2 D128"
    assert (saved.identity.head_size, saved.identity.vocab_size) == (64, 65536)
    assert saved.identity.tokenizer == "rwkv_vocab_v20230424"
    assert saved.identity.fingerprint == loaded.model.fingerprint
    assert (saved.model_spec, saved.model_resolved) == ("tiny", loaded.resolved)
    assert saved.tokens_consumed == session.tokens_consumed
    assert (saved.sampling, saved.seed, saved.text_tail, saved.chat) == (
        SAMPLED,
        11,
        "tail ✓",
        chat,
    )
    assert torch.equal(saved.rng_state, generator.get_state())
    assert torch.equal(saved.counts, session.counts)
    assert datetime.fromisoformat(saved.created).tzinfo is not None
    assert saved.tool_version
    _assert_sessions_identical(saved.session_for(loaded.model, loaded.tokenizer.name), session)
    for tensor in saved.state_tensors.values():
        assert tensor.dtype == torch.float32


def test_resume_is_bit_exact_with_an_uninterrupted_greedy_run(tmp_path, loaded) -> None:
    first, after_first = _run(loaded, "The story begins", None, GREEDY, make_generator(0)[0])
    expected, expected_session = _run(
        loaded, " and then", after_first, GREEDY, make_generator(0)[0]
    )

    path = tmp_path / "s.rwkvstate"
    _save(path, loaded, after_first)
    resumed = read_state_file(path).session_for(loaded.model, loaded.tokenizer.name)
    text, session = _run(loaded, " and then", resumed, GREEDY, make_generator(0)[0])
    assert first and text == expected
    _assert_sessions_identical(session, expected_session)


def test_seeded_sampling_resumes_identically(tmp_path, loaded) -> None:
    generator = make_generator(5)[0]
    _, after_first = _run(loaded, "Once", None, SAMPLED, generator)
    path = tmp_path / "s.rwkvstate"
    _save(path, loaded, after_first, sampling=SAMPLED, seed=5, generator=generator)
    expected, _ = _run(loaded, " more", after_first, SAMPLED, generator)

    saved = read_state_file(path)
    restored = torch.Generator()
    assert saved.restore_generator(restored)
    session = saved.session_for(loaded.model, loaded.tokenizer.name)
    text, _ = _run(loaded, " more", session, saved.sampling, restored)
    assert text == expected


def test_a_stop_string_is_cut_from_the_state_too(loaded) -> None:
    full, _ = _run(loaded, "Hello", None, GREEDY, make_generator(0)[0], n=24)
    cut = len(full) // 2
    stop = full[cut : cut + 2]
    kept = full[: full.index(stop)]
    chunks = list(
        stream_generate(
            loaded.model,
            loaded.tokenizer,
            "Hello",
            params=GREEDY,
            generator=make_generator(0)[0],
            max_tokens=24,
            stop=[stop],
        )
    )
    assert "".join(chunk.text for chunk in chunks) == kept
    assert chunks[-1].finish_reason == "stop"
    assert loaded.tokenizer.decode(chunks[-1].kept_tokens) == kept

    # The kept session must equal reading the prompt, the whole generated tokens that fit in
    # the kept text, then the rest of the kept text.
    tokens = [chunk.token for chunk in chunks if chunk.token is not None]
    whole = []
    for token in tokens:
        candidate = loaded.tokenizer.decode_bytes([*whole, token])
        if len(candidate) > len(kept.encode()) or not kept.encode().startswith(candidate):
            break
        whole.append(token)
    rest = kept.encode()[len(loaded.tokenizer.decode_bytes(whole)) :].decode()
    expected = prefill(loaded.model, loaded.tokenizer.encode("Hello"))
    for token in whole:
        expected = prefill(loaded.model, [token], expected)
    expected = prefill(loaded.model, loaded.tokenizer.encode(rest), expected)
    session = chunks[-1].session
    assert session.tokens_consumed == expected.tokens_consumed
    assert torch.allclose(session.logits, expected.logits, rtol=1e-5, atol=1e-5)


# --- validation ----------------------------------------------------------------------------


@pytest.fixture
def saved_path(tmp_path, loaded) -> Path:
    _, session = _run(loaded, "x", None, GREEDY, make_generator(0)[0], n=3)
    path = tmp_path / "s.rwkvstate"
    _save(path, loaded, session)
    return path


def _rewrite(
    path: Path,
    metadata: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    poison: str | None = None,
) -> None:
    """Change a saved file as a buggy writer might: its checksum fits the new tensors."""
    with safe_open(path, framework="pt") as file:
        old_metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    for name in drop:
        del tensors[name]
    if poison is not None:
        tensors[poison].view(-1)[0] = float("nan")
    sealed = {**old_metadata, CHECKSUM: data_checksum(tensors)}
    save_file(tensors, path, metadata={**sealed, **(metadata or {})})


def _as_version_1(path: Path) -> None:
    """Rewrite a saved file as rwkv-cli wrote it before state files had a checksum."""
    with safe_open(path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    del metadata[CHECKSUM]
    save_file(tensors, path, metadata={**metadata, "format_version": "1"})


def _check(path: Path, loaded: LoadedModel, force: bool = False) -> Session:
    return read_state_file(path).session_for(loaded.model, loaded.tokenizer.name, force=force)


def test_state_from_another_shape_is_refused(saved_path, rwkv7_deeper_pth) -> None:
    with pytest.raises(
        StateFileError, match="state was made by RWKV-7 L2 D128; model is RWKV-7 L3 D128"
    ):
        _check(saved_path, open_model(str(rwkv7_deeper_pth)))


def test_state_from_other_weights_needs_force(saved_path, rwkv7_other_weights_pth) -> None:
    other = open_model(str(rwkv7_other_weights_pth))
    with pytest.raises(StateFileError, match="other weights of the same shape") as caught:
        _check(saved_path, other)
    assert "--force" in caught.value.hint
    assert _check(saved_path, other, force=True).tokens_consumed == 4


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"generation": "6"}, "state was made by RWKV-6 L2 D128; model is RWKV-7 L2 D128"),
        ({"head_size": "32"}, "state has head size 32; model has 64"),
        ({"vocab_size": "50304"}, "vocabulary of 50304 tokens; model has 65536"),
        ({"tokenizer": "20B"}, "state used tokenizer 20B; model uses rwkv_vocab_v20230424"),
    ],
)
def test_each_identity_difference_is_named(saved_path, loaded, metadata, message) -> None:
    _rewrite(saved_path, metadata, drop=("logits", "sampling.counts"))  # sized by the vocabulary
    with pytest.raises(StateFileError, match=message):
        _check(saved_path, loaded, force=True)  # --force only covers the weights fingerprint


def test_unknown_format_version(saved_path) -> None:
    _rewrite(saved_path, {"format_version": "3"})
    with pytest.raises(StateFileError, match="format version 3; this rwkv-cli reads versions up"):
        read_state_file(saved_path)


def test_a_flipped_byte_in_a_state_file_is_reported_as_corrupt(saved_path) -> None:
    assert read_state_file(saved_path).metadata["format_version"] == "2"
    flip_tensor_bytes(saved_path)
    with pytest.raises(
        StateFileError, match="corrupt: its tensor data does not match its checksum"
    ):
        read_state_file(saved_path)


def test_a_state_file_without_its_checksum_is_corrupt(saved_path) -> None:
    _rewrite(saved_path, {CHECKSUM: ""})
    with pytest.raises(StateFileError, match="corrupt: its tensor data does not match"):
        read_state_file(saved_path)


def test_a_version_1_file_without_a_checksum_still_loads(saved_path, loaded) -> None:
    expected = _check(saved_path, loaded)
    _as_version_1(saved_path)
    saved = read_state_file(saved_path)
    assert saved.metadata["format_version"] == "1" and CHECKSUM not in saved.metadata
    _assert_sessions_identical(saved.session_for(loaded.model, loaded.tokenizer.name), expected)


def test_provenance_is_saved_as_fields(saved_path, loaded) -> None:
    metadata = read_state_file(saved_path).metadata
    assert metadata["model_path"] == str(loaded.provenance.path)
    assert "model_repo" not in metadata and "model_revision" not in metadata  # a local file
    assert read_state_file(saved_path).provenance == loaded.provenance


def test_a_file_from_before_the_provenance_fields_still_opens_its_model(saved_path, loaded) -> None:
    """Older files name the model in one string, ``model_resolved``: a path or repo:file@commit."""
    _rewrite(saved_path, metadata={})
    with safe_open(saved_path, framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    del metadata["model_path"]
    save_file(tensors, saved_path, metadata=metadata)
    saved = read_state_file(saved_path)
    assert saved.provenance == Provenance(loaded.provenance.path)
    assert saved.model_resolved == loaded.resolved
    start = open_start(ModelRequest(), saved_path)
    assert start.loaded.provenance == loaded.provenance and start.loaded.spec == "tiny"
    pinned = Provenance.from_metadata({"model_resolved": f"A/b:c.pth@{'0' * 40}"}, "alias")
    assert pinned == Provenance(None, "A/b", "c.pth", "0" * 40)
    assert Provenance.from_metadata({}, "alias") == Provenance(Path("alias"))  # version 1


def test_safetensors_that_is_not_a_state_file(tmp_path) -> None:
    path = write_safetensors(tmp_path / "other.safetensors", {"weights": torch.zeros(3)})
    with pytest.raises(StateFileError, match="is not an rwkv-cli state file"):
        read_state_file(path)


@pytest.mark.parametrize("keep", [0.3, 0.99])
def test_truncated_state_file(saved_path, keep) -> None:
    data = saved_path.read_bytes()
    saved_path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(StateFileError, match="truncated or corrupt"):
        read_state_file(saved_path)


def test_missing_tensor_is_corruption(saved_path, loaded) -> None:
    _rewrite(saved_path, drop=("blocks.1.att.wkv",))
    with pytest.raises(StateFileError, match=r"corrupt: no blocks\.1\.att\.wkv tensor"):
        _check(saved_path, loaded)


def test_logits_that_contradict_the_vocabulary_are_corruption(saved_path) -> None:
    _rewrite(saved_path, {"vocab_size": "50304"})
    with pytest.raises(StateFileError, match=r"corrupt: bad metadata \(logits has shape"):
        read_state_file(saved_path)


def test_a_nan_in_the_state_is_corruption(saved_path) -> None:
    _rewrite(saved_path, poison="blocks.0.att.wkv")
    with pytest.raises(StateFileError, match=r"corrupt: blocks\.0\.att\.wkv holds NaN"):
        read_state_file(saved_path)


def test_bad_metadata_is_corruption(saved_path) -> None:
    _rewrite(saved_path, {"tokens_consumed": "many"})
    with pytest.raises(StateFileError, match="corrupt: bad metadata"):
        read_state_file(saved_path)


def test_missing_state_file(tmp_path) -> None:
    with pytest.raises(StateFileError, match="no such state file"):
        read_state_file(tmp_path / "nope.rwkvstate")


# --- atomic writes -------------------------------------------------------------------------


def _fail_fsync_with(error: BaseException):
    def fsync(descriptor: int) -> None:
        raise error

    return fsync


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError(errno.EIO, "Input/output error"), WriteError),
        (OSError(errno.ENOSPC, "No space left on device"), WriteError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_an_interrupted_write_leaves_the_previous_file_intact(
    tmp_path, monkeypatch, error, expected
) -> None:
    path = tmp_path / "s.rwkvstate"
    path.write_bytes(b"previous contents")
    monkeypatch.setattr(os, "fsync", _fail_fsync_with(error))
    with pytest.raises(expected) as caught:
        atomic_write_bytes(path, b"new contents that never land")
    assert path.read_bytes() == b"previous contents"
    assert [entry.name for entry in tmp_path.iterdir()] == ["s.rwkvstate"]  # no temp file left
    if error.__class__ is OSError and error.errno == errno.ENOSPC:
        assert "disk full" in caught.value.message


def test_writes_keep_the_mode_of_the_file_they_replace(tmp_path) -> None:
    path = tmp_path / "s.rwkvstate"
    atomic_write_bytes(path, b"one")
    old_umask = os.umask(0o022)
    os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~old_umask
    path.chmod(0o600)
    atomic_write_bytes(path, b"two")
    assert (path.read_bytes(), path.stat().st_mode & 0o777) == (b"two", 0o600)


def test_unwritable_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(WriteError, match="cannot write"):
        atomic_write_bytes(tmp_path / "missing-dir" / "s.rwkvstate", b"x")


def test_output_files_are_checked_before_they_are_written(tmp_path) -> None:
    check_writable(tmp_path / "new.rwkvstate")
    check_writable(Path("relative.rwkvstate"))  # the working directory
    with pytest.raises(WriteError, match="there is no directory"):
        check_writable(tmp_path / "missing-dir" / "s.rwkvstate")
    with pytest.raises(WriteError, match="it is a directory"):
        check_writable(tmp_path)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(WriteError, match="file is a file, not a directory"):
        check_writable(tmp_path / "file" / "s.rwkvstate")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_directory_is_refused_before_writing(tmp_path) -> None:
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o500)
    with pytest.raises(WriteError, match="is not writable"):
        check_writable(read_only / "s.rwkvstate")


# --- state tuning --------------------------------------------------------------------------


def test_state_tuning_file_loads_as_is_into_the_value_key_layout(state_tuning_pth, loaded) -> None:
    session = import_state_tuning(state_tuning_pth, loaded.model)
    tuned = torch.load(state_tuning_pth, weights_only=True)
    for index, layer in enumerate(session.state.layers):
        # RWKV-7 time_state is [head, value, key] like our state: no transpose (asymmetric data).
        assert torch.equal(layer.att_wkv, tuned[f"blocks.{index}.att.time_state"].float())
        assert not layer.att_shift.any() and not layer.ffn_shift.any()
    assert session.logits is None and session.tokens_consumed == 0


def test_state_tuning_changes_the_output(state_tuning_pth, loaded) -> None:
    plain, _ = _run(loaded, "Hi", None, GREEDY, make_generator(0)[0])
    tuned_session = import_state_tuning(state_tuning_pth, loaded.model)
    tuned, _ = _run(loaded, "Hi", tuned_session, GREEDY, make_generator(0)[0])
    expected = prefill(loaded.model, loaded.tokenizer.encode("Hi"), tuned_session)
    assert tuned != plain
    first_token = loaded.tokenizer.encode(tuned)[0]
    assert first_token == int(torch.argmax(expected.logits))


def test_state_tuning_file_for_another_model_is_refused(state_tuning_pth, rwkv7_deeper_pth) -> None:
    with pytest.raises(StateFileError, match="lacks 1 of the model's layers"):
        import_state_tuning(state_tuning_pth, open_model(str(rwkv7_deeper_pth)).model)


def test_state_tuning_file_with_wrong_shapes_is_refused(tmp_path, loaded) -> None:
    path = tmp_path / "bad.pth"
    torch.save({f"blocks.{i}.att.time_state": torch.zeros(4, 32, 32) for i in range(2)}, path)
    with pytest.raises(StateFileError, match=r"does not fit the model.*\[4, 32, 32\]"):
        import_state_tuning(path, loaded.model)


def test_a_model_file_is_not_a_state(rwkv7_pth, rwkv7_safetensors, loaded) -> None:
    with pytest.raises(StateFileError, match="is a model checkpoint, not a state file"):
        import_state_tuning(rwkv7_pth, loaded.model)
    for model in (rwkv7_pth, rwkv7_safetensors):  # load-state MODEL --info
        with pytest.raises(
            StateFileError, match="is a model checkpoint, not a state file"
        ) as caught:
            read_state_file(model)
        assert caught.value.hint == f"pass it with -m {model}"


def test_a_pth_of_other_tensors_is_neither_kind_of_state(tmp_path, loaded) -> None:
    path = write_pth(tmp_path / "other.pth", {"weights": torch.zeros(3)})
    with pytest.raises(StateFileError, match="is not an rwkv-cli state file"):
        import_state_tuning(path, loaded.model)


def test_a_state_tuning_file_is_not_an_rwkv_cli_state_file(state_tuning_pth) -> None:
    with pytest.raises(StateFileError, match="is a BlinkDL state-tuning file, not an rwkv-cli"):
        read_state_file(state_tuning_pth)  # load-state TUNED.pth --info


def test_info_is_json_serialisable(saved_path) -> None:
    info = read_state_file(saved_path).info()
    assert json.loads(json.dumps(info))["tokens_consumed"] == 4
    assert info["architecture"] == "RWKV-7 L2 D128"
    assert info["file_bytes"] > info["state_bytes"] > 0
