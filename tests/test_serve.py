"""``rwkv serve``: the OpenAI-compatible server on the demo model, in-process (a uvicorn server on a
thread, or starlette's TestClient for answers that need no engine) and once as a real command."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn
from starlette.testclient import TestClient

from rwkv_cli.batching import engine as batch_engine
from rwkv_cli.generation import END_OF_TEXT, GenerationChunk, generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.replies import ReplySplitter
from rwkv_cli.sampling import make_generator
from rwkv_cli.serve import errors as serve_errors
from rwkv_cli.serve import protocol
from rwkv_cli.serve.app import create_app
from rwkv_cli.serve.responses import Reply
from rwkv_cli.serve.scheduler import Scheduler
from rwkv_cli.serve.server import listen, url_of
from rwkv_cli.settings import CHAT_SAMPLING, SamplingParams
from rwkv_cli.statecache import PrefixCache
from rwkv_cli.templates import TEMPLATES
from tests.support.cli_in_process import rwkv_in_process
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, assert_one_line_error
from tests.support.generation import GREEDY

HELLO = [{"role": "user", "content": "Who was Moses?"}]


class LiveServer:
    """The app served by uvicorn on a thread, on a free port of 127.0.0.1."""

    def __init__(self, app) -> None:
        listening = listen("127.0.0.1", 0)
        self.url = url_of(listening)
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [listening]}, daemon=True
        )
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return open_model("demo")


@pytest.fixture(scope="module")
def scheduler(demo) -> Scheduler:
    return Scheduler(demo.model, demo.tokenizer, max_batch=4)


@pytest.fixture(scope="module")
def client(demo, scheduler) -> Iterator[httpx.Client]:
    live = LiveServer(create_app(demo, scheduler))
    with httpx.Client(base_url=live.url, timeout=SLOW_MACHINE_TIMEOUT_S) as client:
        yield client
    live.stop()


def _unstarted(demo, **options) -> TestClient:
    """A client of an app whose engine never runs: for answers given before any generation."""
    max_waiting = options.pop("max_waiting", 8)
    scheduler = Scheduler(demo.model, demo.tokenizer, max_waiting=max_waiting)
    return TestClient(create_app(demo, scheduler, **options), raise_server_exceptions=False)


def _events(response: httpx.Response) -> list[dict | str]:
    """A server-sent event stream's data, checking its framing: ``data: ...`` and a blank line."""
    body = response.text
    assert body.endswith("\n\n")
    events = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def _expected_completion(demo, prompt: str, max_tokens: int, **options) -> str:
    return generate(
        demo.model,
        demo.tokenizer,
        prompt,
        generator=make_generator(options.pop("seed", 0))[0],
        max_tokens=max_tokens,
        **({"params": GREEDY} | options),
    )


# --- endpoints ----------------------------------------------------------------------------------


def test_health_and_the_model_list(client) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
        ("demo", "model", "rwkv-cli")
    ]


def test_a_greedy_completion_is_what_generate_writes_and_counts_its_tokens(demo, client) -> None:
    body = {"model": "demo", "prompt": "In the beginning", "temperature": 0, "max_tokens": 12}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion" and answer["model"] == "demo"
    (choice,) = answer["choices"]
    assert choice["text"] == _expected_completion(demo, "In the beginning", 12)
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(demo.tokenizer.encode("In the beginning"))
    assert answer["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 12,
        "total_tokens": prompt_tokens + 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_a_chat_reply_follows_the_template(demo, client) -> None:
    body = {"messages": HELLO, "temperature": 0, "max_completion_tokens": 40}
    answer = client.post("/v1/chat/completions", json=body).json()
    message = answer["choices"][0]["message"]
    template = TEMPLATES["pile"]  # the demo's vocabulary is neither World's nor G1's
    raw = _expected_completion(
        demo,
        template.user_turn("Who was Moses?"),
        40,
        params=dataclasses.replace(CHAT_SAMPLING, temperature=0),
        stop=template.stops,
        ban=(END_OF_TEXT,),
    )
    assert message == {"role": "assistant", "content": raw.lstrip()}
    assert answer["object"] == "chat.completion" and "reasoning_content" not in message


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_join_to_the_whole_reply_and_end_with_usage_and_done(client, route) -> None:
    body = {"prompt": "And God said", "messages": HELLO, "temperature": 0, "max_tokens": 15}
    if route == "/v1/completions":
        del body["messages"]
    else:
        del body["prompt"]
    whole = client.post(route, json=body).json()
    streamed = client.post(
        route, json=body | {"stream": True, "stream_options": {"include_usage": True}}
    )
    assert streamed.headers["content-type"].startswith("text/event-stream")
    *chunks, usage, done = _events(streamed)
    assert done == "[DONE]"
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    if route == "/v1/completions":
        text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
        expected = whole["choices"][0]["text"]
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
        text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        expected = whole["choices"][0]["message"]["content"]
    assert text == expected
    reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert reasons[-1] == whole["choices"][0]["finish_reason"] and set(reasons[:-1]) == {None}
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_stop_strings_end_the_reply_and_are_never_returned(demo, client) -> None:
    body = {"prompt": "And God said", "temperature": 0, "max_tokens": 20}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = free[8:11]
    assert stop.strip()
    for stream in (False, True):
        answer = client.post(
            "/v1/completions", json=body | {"stop": ["zzz", stop], "stream": stream}
        )
        if stream:
            chunks = _events(answer)[:-1]
            text = "".join(chunk["choices"][0]["text"] for chunk in chunks)
            reason = chunks[-1]["choices"][0]["finish_reason"]
        else:
            text, reason = (answer.json()["choices"][0][key] for key in ("text", "finish_reason"))
        assert text == free[: free.index(stop)] and reason == "stop"


def test_eight_streaming_clients_at_once_get_what_each_gets_alone(client) -> None:
    prompts = ["The", "And the LORD", "In the day", "Thou", "Blessed", "And", "For", "I"]
    bodies = [
        {"prompt": prompt, "seed": seed, "temperature": 1, "top_p": 0.9, "max_tokens": 10}
        for seed, prompt in enumerate(prompts)
    ]
    bodies[0] |= {"temperature": 0}
    alone = [client.post("/v1/completions", json=body).json() for body in bodies]

    async def stream(aclient: httpx.AsyncClient, body: dict) -> tuple[str, str]:
        events = _events(await aclient.post("/v1/completions", json=body | {"stream": True}))
        choices = [event["choices"][0] for event in events[:-1]]
        return "".join(choice["text"] for choice in choices), choices[-1]["finish_reason"]

    async def together() -> list[tuple[str, str]]:  # more than the batch: some wait their turn
        async with httpx.AsyncClient(base_url=client.base_url, timeout=client.timeout) as aclient:
            return await asyncio.gather(*(stream(aclient, body) for body in bodies))

    for one, beside in zip(alone, asyncio.run(together()), strict=True):
        assert beside == (one["choices"][0]["text"], one["choices"][0]["finish_reason"])


def test_the_next_turn_of_a_chat_reads_only_what_is_new(demo, client) -> None:
    scheduler = Scheduler(demo.model, demo.tokenizer, cache=PrefixCache(1 << 30))
    live = LiveServer(create_app(demo, scheduler))
    first_turn = {"messages": HELLO, "temperature": 0, "max_tokens": 12}
    try:
        with httpx.Client(base_url=live.url, timeout=client.timeout) as cached:
            first = cached.post("/v1/chat/completions", json=first_turn).json()
            reply = first["choices"][0]["message"]
            history = [*HELLO, reply, {"role": "user", "content": "And Aaron?"}]
            second_turn = first_turn | {"messages": history}
            second = cached.post("/v1/chat/completions", json=second_turn).json()
    finally:
        live.stop()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The first turn's prompt was kept: the second reads its reply and question only.
    details = second["usage"]["prompt_tokens_details"]
    assert details["cached_tokens"] == first["usage"]["prompt_tokens"]
    assert second["usage"]["prompt_tokens"] > details["cached_tokens"]
    uncached = client.post("/v1/chat/completions", json=second_turn).json()  # no cache there
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert uncached["choices"] == second["choices"]


@pytest.mark.parametrize("size", ["lots", "-1", "1X"])
def test_a_cache_size_that_is_not_a_size_is_a_usage_error(size) -> None:
    result = rwkv_in_process("serve", "--cache-size", size)
    assert_one_line_error(result, 2, f"{size!r} is not a size: use e.g. 512M or 2G")


def test_g1_thinking_is_asked_for_and_returned_apart(demo, client, monkeypatch) -> None:
    monkeypatch.setattr("rwkv_cli.serve.app.template_for", lambda loaded: TEMPLATES["g1"])
    live = LiveServer(create_app(demo, Scheduler(demo.model, demo.tokenizer)))
    body = {"messages": HELLO, "think": True, "temperature": 0, "max_tokens": 12}
    try:
        with httpx.Client(base_url=live.url, timeout=client.timeout) as g1:
            message = g1.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
            events = _events(g1.post("/v1/chat/completions", json=body | {"stream": True}))
    finally:
        live.stop()
    deltas = [event["choices"][0]["delta"] for event in events[:-1]]
    thought = "".join(delta.get("reasoning_content", "") for delta in deltas)
    assert thought and thought == message["reasoning_content"]  # the demo never closes it
    assert message["content"] == "".join(delta.get("content", "") for delta in deltas) == ""


LONG = {"prompt": "The", "max_tokens": protocol.MAX_COMPLETION_TOKENS}


def _freed(scheduler: Scheduler) -> bool:
    """Whether the engine empties soon: far sooner than the thousands of tokens asked for."""
    deadline = time.monotonic() + 10
    while scheduler.active and time.monotonic() < deadline:
        time.sleep(0.02)
    return scheduler.active == 0


def test_a_streaming_client_that_disconnects_frees_its_place(client, scheduler) -> None:
    with client.stream("POST", "/v1/completions", json=LONG | {"stream": True}) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # it is generating
        assert scheduler.active == 1
    assert _freed(scheduler)


def test_a_waiting_client_that_disconnects_frees_its_place(client, scheduler) -> None:
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        client.post("/v1/completions", json=LONG, timeout=1)
    assert _freed(scheduler)


def test_a_failing_engine_answers_500_and_the_server_goes_on(client, monkeypatch) -> None:
    real_step = batch_engine.Batch.step

    def fail_once(batch, tokens):
        monkeypatch.setattr(batch_engine.Batch, "step", real_step)
        raise RuntimeError("boom")

    monkeypatch.setattr(batch_engine.Batch, "step", fail_once)
    body = {"prompt": "The", "temperature": 0, "max_tokens": 3}
    failed = client.post("/v1/completions", json=body)
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "engine_failed"
    assert "boom" in failed.json()["error"]["message"]
    assert client.post("/v1/completions", json=body).status_code == 200


def test_the_official_openai_client_reads_every_answer(client) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(
        base_url=str(client.base_url).rstrip("/") + "/v1", api_key="unused", max_retries=0
    )
    assert [model.id for model in sdk.models.list()] == ["demo"]
    options = {"model": "demo", "messages": HELLO, "max_tokens": 8, "temperature": 0}
    whole = sdk.chat.completions.create(**options)
    assert whole.choices[0].finish_reason in ("stop", "length")
    stream = sdk.chat.completions.create(
        **options, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    completion = sdk.completions.create(model="demo", prompt="And", max_tokens=4, temperature=0)
    assert completion.usage.completion_tokens == 4
    scored = sdk.chat.completions.create(**options, logprobs=True, top_logprobs=2)
    entries = scored.choices[0].logprobs.content
    assert len(entries) == scored.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in entries)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(**options, n=2)
    assert refused.value.body["param"] == "n"


def test_logprobs_are_the_models_with_the_most_probable_alternatives(demo, client) -> None:
    body = {"prompt": "And God said", "temperature": 0, "max_tokens": 6, "logprobs": 2}
    answer = client.post("/v1/completions", json=body).json()
    logprobs = answer["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == answer["usage"]["completion_tokens"] == 6
    assert "".join(logprobs["tokens"]) == answer["choices"][0]["text"]
    for token, logprob, top in zip(*logprobs.values(), strict=True):
        assert len(top) == 2 and next(iter(top.items())) == (token, logprob)  # greedy
    logits, _ = demo.model.forward(demo.tokenizer.encode("And God said"), None)
    first = demo.tokenizer.encode(logprobs["tokens"][0])
    expected = torch.log_softmax(logits.double(), dim=0)[first[0]]
    assert logprobs["token_logprobs"][0] == pytest.approx(float(expected), rel=1e-4)


def test_streamed_chat_logprobs_are_those_of_the_whole_reply(client) -> None:
    body = {"messages": HELLO, "max_tokens": 8, "seed": 3, "logprobs": True, "top_logprobs": 1}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]
    chunks = _events(client.post("/v1/chat/completions", json=body | {"stream": True}))[:-1]
    streamed = [
        entry
        for chunk in chunks
        if chunk["choices"][0]["logprobs"]
        for entry in chunk["choices"][0]["logprobs"]["content"]
    ]
    assert streamed == whole["content"] and len(streamed) == 8
    first = streamed[0]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert bytes(first["bytes"]).decode() == first["token"] and len(first["top_logprobs"]) == 1


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"logprobs": 1}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"penalty_decay": 1.5}, "penalty_decay"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": protocol.MAX_COMPLETION_TOKENS + 1}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
        ({"messages": []}, "messages"),
    ],
)
def test_requests_it_cannot_run_as_asked_get_a_400_naming_the_field(demo, change, param):
    response = _unstarted(demo).post("/v1/chat/completions", json={"messages": HELLO} | change)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff"])
def test_a_body_that_is_no_json_object_is_a_400(demo, body) -> None:
    response = _unstarted(demo).post("/v1/completions", content=body)
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_a_prompt_over_the_bound_is_a_400(demo, monkeypatch) -> None:
    monkeypatch.setattr(protocol, "MAX_PROMPT_TOKENS", 3)
    response = _unstarted(demo).post("/v1/completions", json={"prompt": "one two three four"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_the_api_key_is_needed_when_set(demo) -> None:
    client = _unstarted(demo, api_key="s3cret")
    assert client.get("/health").status_code == 200  # for load balancers: no key
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.get("/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        refused = client.post("/v1/completions", headers=headers, json={"prompt": "x"})
        assert refused.status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_unknown_models_and_routes_are_404(demo) -> None:
    client = _unstarted(demo)
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"] == {
        "message": "the model 'gpt-4' is not served here; GET /v1/models lists the one that is",
        "type": "not_found_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert client.get("/v1/completions").status_code == 405


def test_a_body_over_the_limit_is_413(demo) -> None:
    client = _unstarted(demo, max_body_bytes=100)
    response = client.post("/v1/completions", json={"prompt": "x" * 200})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_a_full_queue_is_503_with_retry_after(demo) -> None:
    response = _unstarted(demo, max_waiting=0).post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == str(serve_errors.RETRY_AFTER_SECONDS)
    assert response.json()["error"]["code"] == "queue_full"


def test_the_queue_is_bounded_until_the_engine_takes_requests(demo) -> None:
    scheduler = Scheduler(demo.model, demo.tokenizer, max_waiting=2)
    request = protocol.engine_request(
        protocol.parse_completion({"prompt": "x"}), demo.tokenizer, TEMPLATES["pile"]
    )

    async def submit_three() -> None:
        scheduler.submit(request)
        scheduler.submit(request)
        with pytest.raises(serve_errors.Overloaded):
            scheduler.submit(request)

    asyncio.run(submit_three())


def test_a_bug_in_one_request_is_a_500_for_it(demo, monkeypatch) -> None:
    def broken(*arguments, **options):
        raise RuntimeError("a bug")

    monkeypatch.setattr("rwkv_cli.serve.app.engine_request", broken)
    response = _unstarted(demo).post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "unexpected RuntimeError: a bug"


# --- replies, without the engine ----------------------------------------------------------------


def _chunk(text: str, finish: str | None = None) -> GenerationChunk:
    return GenerationChunk(text, None, 7, 3, 0.0, 0.0, finish_reason=finish)


def test_g1_thinking_comes_back_as_reasoning_content() -> None:
    reply = Reply("g1", ReplySplitter(starts_with_tag_end=True, thinking=True))
    raw = [">", "Let me", " think.</th", "ink>", " It is", " 4.", ""]
    deltas = [reply.chunk(*reply.add(_chunk(text, "stop" if not text else None))) for text in raw]
    streamed = [delta["choices"][0]["delta"] for delta in deltas if delta is not None]
    assert "".join(d.get("reasoning_content", "") for d in streamed) == "Let me think."
    assert "".join(d.get("content", "") for d in streamed) == "It is 4."
    message = reply.body()["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "It is 4.",
        "reasoning_content": "Let me think.",
    }


def test_earlier_replies_are_written_back_as_the_model_wrote_them(demo) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
        {"role": "user", "content": "Who?"},
    ]
    template = TEMPLATES["g1"]
    for think in (False, True):
        request = protocol.parse_chat({"messages": messages, "think": think})
        engine = protocol.engine_request(request, demo.tokenizer, template)
        written = "".join(demo.tokenizer.decode([token]) for token in engine.prompt)
        reply = "></think> Hello." if think else "> Hello."
        expected = (
            template.system_turn("Be brief.")
            + template.user_turn("Hi", think)
            + reply
            + "\n\n"
            + template.user_turn("Who?", think)
        )
        assert written == expected
        assert engine.stop[: len(template.stops)] == template.stops
        assert engine.ban == (END_OF_TEXT,)


def test_sampling_defaults_are_the_chats_for_chat_and_generates_for_completions() -> None:
    chat = protocol.parse_chat({"messages": HELLO, "top_k": 5, "penalty_decay": 0.9})
    assert chat.params == dataclasses.replace(CHAT_SAMPLING, top_k=5, penalty_decay=0.9)
    completion = protocol.parse_completion({"prompt": "x", "temperature": 0.5})
    assert completion.params == SamplingParams(temperature=0.5)
    assert completion.max_tokens == protocol.COMPLETION_MAX_TOKENS


# --- the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_rwkv_serve_answers_over_tcp_and_stops_cleanly_mid_stream(stop) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_cli", "serve", "-m", "demo", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = process.stderr.readline()
        url = re.search(r"at (http://127\.0\.0\.1:\d+)/v1 ", ready).group(1)
        with httpx.Client(base_url=url, timeout=SLOW_MACHINE_TIMEOUT_S) as client:
            chat = {"messages": HELLO, "max_tokens": 5}
            answer = client.post("/v1/chat/completions", json=chat).json()
            assert answer["choices"][0]["message"]["role"] == "assistant"
            long = {"prompt": "The", "max_tokens": 5000, "stream": True}
            with client.stream("POST", "/v1/completions", json=long) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                process.send_signal(stop)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads() -> None:
    with listen("127.0.0.1", 0) as taken:
        port = str(taken.getsockname()[1])
        result = rwkv_in_process("serve", "-m", "no-such-model.pth", "--port", port)
    assert_one_line_error(result, 1, f"cannot listen on 127.0.0.1:{port}")
