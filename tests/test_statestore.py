"""Named states as files (rwkv_cli/statestore.py): kept, read back, uploaded and downloaded in
the state file format of `rwkv save-state`, checked against the model, ids never paths."""

from __future__ import annotations

import time

import pytest

from rwkv_cli.errors import StateFileError
from rwkv_cli.generation import prefill
from rwkv_cli.loading.open import open_model
from rwkv_cli.statefile import load_state_file, save_state_file
from rwkv_cli.statestore import StateStore, StoreFullError, UnknownStateError, is_valid_id
from tests.support.numerics import assert_states_close


@pytest.fixture(scope="module")
def demo():
    return open_model("demo")


@pytest.fixture
def store(demo, tmp_path):
    store = StateStore(demo, tmp_path / "states")
    yield store
    store.close()


def _session(loaded, text: str):
    return prefill(loaded.model, loaded.tokenizer.encode(text))


def _assert_same_session(actual, expected) -> None:
    assert_states_close(actual.state, expected.state, 0)
    assert actual.logits.equal(expected.logits)
    assert actual.tokens_consumed == expected.tokens_consumed


def test_a_kept_state_reads_back_exactly(demo, store) -> None:
    session = _session(demo, "The river flows")
    state_id = store.add(session, text_tail="The river flows")
    assert state_id.startswith("state-") and is_valid_id(state_id)
    _assert_same_session(store.session(state_id), session)
    info = store.info(state_id)
    assert info.tokens == session.tokens_consumed and info.bytes > 0
    assert store.ids() == [state_id]


def test_a_download_is_a_state_file_the_command_line_resumes(demo, store, tmp_path) -> None:
    session = _session(demo, "Once upon a time")
    state_id = store.add(session, "tale")
    downloaded = tmp_path / "tale.rwkvstate"
    downloaded.write_bytes(store.file_bytes(state_id))
    _assert_same_session(load_state_file(downloaded, demo), session)


def test_a_state_file_from_the_command_line_uploads(demo, store, tmp_path) -> None:
    session = _session(demo, "A saved state")
    saved = tmp_path / "saved.rwkvstate"
    save_state_file(saved, demo, session)  # as `rwkv save-state` writes it
    info = store.upload("from-cli", saved.read_bytes())
    assert info.id == "from-cli" and info.tokens == session.tokens_consumed
    _assert_same_session(store.session("from-cli"), session)


def test_a_bad_upload_never_replaces_a_good_state(demo, store) -> None:
    session = _session(demo, "Keep me")
    store.add(session, "kept")
    with pytest.raises(StateFileError) as raised:
        store.upload("kept", b"not a state file at all")
    assert str(store.directory) not in raised.value.message
    _assert_same_session(store.session("kept"), session)
    assert store.ids() == ["kept"]  # the rejected upload left no file behind


def test_a_state_of_another_model_is_refused(store, rwkv7_pth, tmp_path) -> None:
    other = open_model(str(rwkv7_pth))
    saved = tmp_path / "other.rwkvstate"
    save_state_file(saved, other, _session(other, "Hello"))
    with pytest.raises(StateFileError, match="state was made by RWKV-7 L2 D128") as raised:
        store.upload("other", saved.read_bytes())
    assert "it was made with" in raised.value.hint
    assert store.ids() == []


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", ".hidden", "x" * 65, "sp ace", "é"])
def test_ids_are_names_never_paths(demo, store, bad) -> None:
    assert not is_valid_id(bad)
    with pytest.raises(StateFileError, match="is not a state id"):
        store.add(_session(demo, "x"), bad)
    with pytest.raises(StateFileError, match="is not a state id"):
        store.upload(bad, b"")
    with pytest.raises(UnknownStateError):
        store.session(bad)
    assert not list(store.directory.parent.glob("escape*"))


def test_delete_and_unknown_ids(demo, store) -> None:
    state_id = store.add(_session(demo, "Short-lived"))
    store.delete(state_id)
    for use in (store.session, store.file_bytes, store.info, store.delete):
        with pytest.raises(UnknownStateError, match=state_id):
            use(state_id)


def test_the_store_is_bounded_but_a_state_may_be_replaced(demo, tmp_path) -> None:
    store = StateStore(demo, tmp_path / "small", max_states=2)
    session = _session(demo, "x")
    store.add(session, "one")
    store.add(session, "two")
    with pytest.raises(StoreFullError):
        store.add(session, "three")
    store.add(_session(demo, "y"), "two")  # replacing needs no room
    assert sorted(store.ids()) == ["one", "two"]


def test_states_outlive_the_server_in_their_folder(demo, tmp_path) -> None:
    session = _session(demo, "Remember this")
    StateStore(demo, tmp_path / "kept").add(session, "memory")
    _assert_same_session(StateStore(demo, tmp_path / "kept").session("memory"), session)
    temporary = StateStore(demo)
    temporary.add(session, "gone")
    temporary.close()
    assert not temporary.directory.exists()


def test_only_the_newest_reply_states_are_kept_and_named_ones_stay(demo, tmp_path) -> None:
    store = StateStore(demo, tmp_path / "replies", max_replies=2)
    session = _session(demo, "x")
    named = store.add(session, "named")
    made = store.add(session)
    replies = []
    for _ in range(4):
        replies.append(store.keep_reply(session))
        time.sleep(0.01)  # files are ordered by modification time
    assert all(reply.startswith("reply-") for reply in replies)
    assert sorted(store.ids()) == sorted([named, made, *replies[-2:]])
