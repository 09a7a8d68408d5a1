"""`rwkv serve`'s named states (/v1/states): read once, continued by id, downloaded as the state
files `rwkv save-state` writes and uploaded from them, checked against the model, kept in
--state-dir. On the demo model, through the ASGI application with its engine running."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from rwkv_cli.generation import generate, prefill
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.sampling import make_generator
from rwkv_cli.serve.app import create_app
from rwkv_cli.serve.scheduler import Scheduler
from rwkv_cli.statefile import load_state_file, save_state_file
from rwkv_cli.statestore import StateStore
from tests.support.generation import GREEDY
from tests.support.numerics import assert_states_close

GENESIS = "In the beginning God created the heaven and the earth."
TURNS = [
    {"role": "user", "content": "Who was Moses?"},
    {"role": "assistant", "content": "A prophet of Israel."},
]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return open_model("demo")


def _client(demo: LoadedModel, store: StateStore | None = None, **options) -> TestClient:
    app = create_app(demo, Scheduler(demo.model, demo.tokenizer), store=store, **options)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(demo) -> Iterator[TestClient]:
    with _client(demo) as client:  # runs the lifespan: the engine thread
        yield client


def test_a_text_read_once_is_continued_by_id(demo, client) -> None:
    created = client.post("/v1/states", json={"text": GENESIS})
    assert created.status_code == 201
    state = created.json()
    assert state["object"] == "state" and state["id"].startswith("state-")
    assert state["tokens"] == len(demo.tokenizer.encode(GENESIS)) and state["bytes"] > 0
    assert client.get("/v1/states").json()["data"] == [state]

    body = {"prompt": " And", "max_tokens": 12, "temperature": 0, "state": state["id"]}
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    session = prefill(demo.model, demo.tokenizer.encode(GENESIS))
    expected = generate(
        demo.model,
        demo.tokenizer,
        " And",
        session=session,
        params=GREEDY,
        generator=make_generator(0)[0],
        max_tokens=12,
    )
    assert text == expected


def test_a_state_of_whole_turns_continues_the_chat(client) -> None:
    created = client.post("/v1/states", json={"messages": TURNS, "id": "moses"}).json()
    assert created["id"] == "moses"
    question = {"role": "user", "content": "And Aaron?"}
    options = {"temperature": 0, "max_tokens": 16}
    by_id = {"messages": [question], "state": "moses", **options}
    resent = {"messages": [*TURNS, question], **options}
    reply = client.post("/v1/chat/completions", json=by_id).json()
    whole = client.post("/v1/chat/completions", json=resent).json()
    assert reply["choices"][0]["message"] == whole["choices"][0]["message"]
    assert reply["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]


def test_a_download_resumes_on_the_command_line_and_an_upload_comes_back(
    demo, client, tmp_path
) -> None:
    state_id = client.post("/v1/states", json={"text": GENESIS}).json()["id"]
    download = client.get(f"/v1/states/{state_id}")
    assert download.headers["content-type"] == "application/octet-stream"
    assert f'filename="{state_id}.rwkvstate"' in download.headers["content-disposition"]
    saved = tmp_path / "genesis.rwkvstate"
    saved.write_bytes(download.content)
    expected = prefill(demo.model, demo.tokenizer.encode(GENESIS))
    assert_states_close(load_state_file(saved, demo).state, expected.state, 0)

    mine = tmp_path / "mine.rwkvstate"
    save_state_file(mine, demo, prefill(demo.model, demo.tokenizer.encode("And God said")))
    uploaded = client.put("/v1/states/mine", content=mine.read_bytes())
    assert uploaded.status_code == 200 and uploaded.json()["id"] == "mine"
    assert client.get("/v1/states/mine").content == mine.read_bytes()


def test_bad_uploads_are_refused_and_keep_what_was_there(client, rwkv7_pth, tmp_path) -> None:
    client.post("/v1/states", json={"text": GENESIS, "id": "kept"})
    before = client.get("/v1/states/kept").content
    garbage = client.put("/v1/states/kept", content=b"not a state file")
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_state"
    other = open_model(str(rwkv7_pth))
    foreign = tmp_path / "other.rwkvstate"
    save_state_file(foreign, other, prefill(other.model, [1, 2, 3]))
    refused = client.put("/v1/states/kept", content=foreign.read_bytes())
    assert refused.status_code == 400
    assert "state was made by RWKV-7 L2 D128" in refused.json()["error"]["message"]
    too_big = client.put("/v1/states/kept", content=b"x" * (64 << 20))
    assert too_big.status_code == 413
    assert client.get("/v1/states/kept").content == before


def test_unknown_and_deleted_states_are_404_and_ids_are_never_paths(client) -> None:
    state_id = client.post("/v1/states", json={"text": GENESIS}).json()["id"]
    deleted = client.delete(f"/v1/states/{state_id}").json()
    assert deleted == {"id": state_id, "object": "state.deleted", "deleted": True}
    for answer in (
        client.get(f"/v1/states/{state_id}"),
        client.delete(f"/v1/states/{state_id}"),
        client.post("/v1/completions", json={"prompt": "x", "state": state_id}),
    ):
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "state_not_found"
    bad = client.put("/v1/states/..", content=b"")
    assert bad.status_code in (400, 404)
    named = client.post("/v1/states", json={"text": GENESIS, "id": "no/slash"})
    assert named.status_code == 400 and "is not a state id" in named.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": GENESIS, "messages": TURNS}, "give text or messages"),
        ({}, "give text or messages"),
        ({"text": ""}, "text must be a non-empty string"),
        ({"messages": TURNS[:1]}, "the last message must end a turn"),
        ({"text": GENESIS, "id": 7}, "id must be a string"),
    ],
)
def test_a_state_body_that_says_nothing_clear_is_a_400(client, body, message) -> None:
    answer = client.post("/v1/states", json=body)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_states_need_the_key_and_outlive_the_server_in_their_folder(demo, tmp_path) -> None:
    with _client(demo, StateStore(demo, tmp_path / "states"), api_key="k") as client:
        assert client.get("/v1/states").status_code == 401
        key = {"Authorization": "Bearer k"}
        created = client.post("/v1/states", json={"text": GENESIS, "id": "kept"}, headers=key)
        assert created.status_code == 201
    with _client(demo, StateStore(demo, tmp_path / "states")) as client:
        assert [state["id"] for state in client.get("/v1/states").json()["data"]] == ["kept"]


def test_every_reply_names_the_state_after_it_and_a_chat_goes_on_by_id(client) -> None:
    options = {"temperature": 0, "max_tokens": 16}
    first = client.post("/v1/chat/completions", json={"messages": TURNS[:1], **options}).json()
    reply = first["choices"][0]["message"]
    assert first["state_id"].startswith("reply-")
    question = {"role": "user", "content": "And Aaron?"}
    by_id = {"messages": [question], "state": first["state_id"], **options}
    resent = {"messages": [*TURNS[:1], reply, question], **options}
    next_turn = client.post("/v1/chat/completions", json=by_id).json()
    whole = client.post("/v1/chat/completions", json=resent).json()
    assert next_turn["choices"][0]["message"] == whole["choices"][0]["message"]
    assert next_turn["state_id"] not in (first["state_id"], whole["state_id"])

    streamed = client.post("/v1/completions", json={"prompt": GENESIS, "stream": True, **options})
    events = [json.loads(line[6:]) for line in streamed.text.split("\n\n") if line[6:7] == "{"]
    assert "state_id" in events[-1] and all("state_id" not in e for e in events[:-1])
    assert client.get(f"/v1/states/{events[-1]['state_id']}").status_code == 200
