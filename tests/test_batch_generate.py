"""Generating many requests through one batch (``batching.generate_batch``) on the demo model:
each request gives the text it gives alone, with its own sampling, stop strings and seed.

Alone means ``generate.stream_generate``, the one-sequence path. A batch of two or more computes
logits that differ from it by float32 rounding (relative 1e-7), so a near-tie between the two
best tokens (greedy), or a seeded draw landing that close to the edge between two tokens, could
choose differently; none does for these prompts, and a batch of one is bit for bit.
"""

from __future__ import annotations

import pytest

from rwkv_cli import generation
from rwkv_cli.batching import (
    Batch,
    BatchFailure,
    BatchRequest,
    BatchResult,
    ContinuousBatch,
    generate_batch,
    stream_batch,
)
from rwkv_cli.batching import engine as batching_engine
from rwkv_cli.errors import ModelOutputError
from rwkv_cli.generation import Session, prefill, stream_generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.statecache import PrefixCache
from rwkv_cli.statefile import read_state_file, save_state_file
from tests.support.generation import GREEDY
from tests.support.numerics import relative_error

PROMPTS = [
    "Once upon a time",
    "The cat",
    "In the beginning there was",
    "A",
    "And the LORD said unto Moses,",
    "",
    "Hello, my name is",
    "The weather today",
]
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return open_model("demo")


def _alone(demo: LoadedModel, request: BatchRequest, seed: int) -> tuple[str, str, Session]:
    """The request run by ``stream_generate``: text, finish reason, final session."""
    chunks = list(
        stream_generate(
            demo.model,
            demo.tokenizer,
            request.prompt,
            params=request.params,
            generator=make_generator(seed)[0],
            max_tokens=request.max_tokens,
            stop=request.stop,
            session=request.session,
        )
    )
    return "".join(c.text for c in chunks), chunks[-1].finish_reason, chunks[-1].session


def _in_batch(demo: LoadedModel, requests: list[BatchRequest], max_batch: int):
    results = list(generate_batch(demo.model, demo.tokenizer, requests, max_batch))
    assert sorted(result.index for result in results) == list(range(len(requests)))
    return sorted(results, key=lambda result: result.index)


@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_greedy_text_is_the_same_alone_and_in_a_batch(demo, max_batch) -> None:
    requests = [BatchRequest(prompt, max_tokens=20, params=GREEDY) for prompt in PROMPTS]
    for request, result in zip(requests, _in_batch(demo, requests, max_batch), strict=True):
        text, reason, _ = _alone(demo, request, 0)
        assert (result.text, result.finish_reason) == (text, reason), request.prompt


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(demo) -> None:
    requests = [
        BatchRequest(prompt, max_tokens=16, params=SAMPLED, seed=100 + index)
        for index, prompt in enumerate(PROMPTS)
    ]
    results = _in_batch(demo, requests, max_batch=5)
    for request, result in zip(requests, results, strict=True):
        assert result.seed == request.seed
        assert result.text == _alone(demo, request, request.seed)[0], request.prompt
    assert len({result.text for result in results}) == len(results)


def test_each_request_keeps_its_own_parameters_and_stop_strings(demo) -> None:
    greedy = _alone(demo, BatchRequest("The cat", max_tokens=30, params=GREEDY), 0)[0]
    stop = greedy[10:13]  # a stop string the greedy text is known to reach
    requests = [
        BatchRequest("The cat", max_tokens=30, params=GREEDY, stop=(stop,)),
        BatchRequest("The cat", max_tokens=5, params=GREEDY),
        BatchRequest("The cat", max_tokens=30, params=SAMPLED, seed=7),
        BatchRequest(
            "The cat",
            max_tokens=30,
            params=SamplingParams(temperature=0, presence_penalty=2.0, frequency_penalty=1.0),
        ),
    ]
    results = _in_batch(demo, requests, max_batch=4)
    assert results[0].finish_reason == "stop"
    assert results[0].text == greedy[: greedy.index(stop)]
    assert results[1].finish_reason == "length" and results[1].completion_tokens == 5
    for request, result in zip(requests, results, strict=True):
        text, reason, session = _alone(demo, request, request.seed or 0)
        assert (result.text, result.finish_reason) == (text, reason)
        assert result.session.tokens_consumed == session.tokens_consumed
        assert relative_error(result.session.logits, session.logits) < 1e-5
    assert len({result.text for result in results}) == len(results)


def test_results_count_tokens_and_carry_a_session_that_resumes(demo, tmp_path) -> None:
    request = BatchRequest("Once upon a time", max_tokens=8, params=GREEDY)
    other = BatchRequest("The cat", max_tokens=12, params=GREEDY)
    result = _in_batch(demo, [request, other], max_batch=2)[0]
    prompt_tokens = len(demo.tokenizer.encode(request.prompt))
    assert (result.prompt_tokens, result.completion_tokens) == (prompt_tokens, 8)
    assert result.session.tokens_consumed == prompt_tokens + 8

    path = tmp_path / "result.rwkvstate"
    save_state_file(path, demo, result.session)
    resumed = read_state_file(path).session_for(demo.model, demo.tokenizer.name)
    longer = _alone(demo, BatchRequest(request.prompt, max_tokens=20, params=GREEDY), 0)[0]
    rest = _in_batch(demo, [BatchRequest("", 12, params=GREEDY, session=resumed), other], 2)[0]
    assert result.text + rest.text == longer


def test_requests_can_share_a_starting_session(demo) -> None:
    system = prefill(demo.model, demo.tokenizer.encode("The book of Genesis.\n\n"))
    requests = [
        BatchRequest(prompt, max_tokens=10, params=GREEDY, session=system) for prompt in PROMPTS[:4]
    ]
    for request, result in zip(requests, _in_batch(demo, requests, 4), strict=True):
        assert result.text == _alone(demo, request, 0)[0]
        assert result.session.tokens_consumed > system.tokens_consumed


def test_waiting_requests_join_as_finished_ones_leave(demo, monkeypatch) -> None:
    sizes = []
    step = batching_engine.Batch.step

    def recording(self: Batch, tokens):
        sizes.append(len(tokens))
        return step(self, tokens)

    monkeypatch.setattr(batching_engine.Batch, "step", recording)
    requests = [
        BatchRequest(prompt, max_tokens=3 + 2 * index, params=GREEDY)
        for index, prompt in enumerate(PROMPTS)
    ]
    finished = [result.index for result in generate_batch(demo.model, demo.tokenizer, requests, 3)]
    assert max(sizes) == 3 and sizes[-1] == 1
    assert sorted(finished) == list(range(len(PROMPTS)))
    assert finished[:2] == [0, 1]  # the shortest finish first, and others take their places


def test_stream_records_come_with_their_request_index(demo) -> None:
    requests = [BatchRequest(prompt, max_tokens=4, params=GREEDY) for prompt in PROMPTS[:3]]
    records = list(stream_batch(demo.model, demo.tokenizer, requests, max_batch=2))
    for index in range(3):
        own = [record.chunk for record in records if record.index == index]
        assert [chunk.finish_reason for chunk in own] == [None] * 4 + ["length"]
        assert [chunk.generated_tokens for chunk in own] == [1, 2, 3, 4, 4]


def test_a_batch_size_below_one_is_refused(demo) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        list(generate_batch(demo.model, demo.tokenizer, [BatchRequest("A", 2)], max_batch=0))


def test_an_empty_request_list_gives_no_results(demo) -> None:
    assert list(generate_batch(demo.model, demo.tokenizer, [], max_batch=4)) == []


def test_a_request_that_fails_alone_leaves_and_the_others_finish(demo, monkeypatch) -> None:
    """A sequence whose logits cannot be sampled (NaN, say) fails by itself: the batch goes on."""
    real_sample = generation.sample_token
    failing = SamplingParams(temperature=0, top_k=7)  # marks the request that fails

    def sample(logits, params, generator):
        if params == failing:
            raise ModelOutputError("the model produced invalid logits (NaN)")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(generation, "sample_token", sample)
    requests = [BatchRequest(prompt, max_tokens=6, params=GREEDY) for prompt in PROMPTS[:3]]
    requests.insert(1, BatchRequest("The cat", max_tokens=6, params=failing))
    results = list(generate_batch(demo.model, demo.tokenizer, requests, max_batch=4))
    failures = [result for result in results if isinstance(result, BatchFailure)]
    assert [(f.index, f.error.message) for f in failures] == [
        (1, "the model produced invalid logits (NaN)")
    ]
    finished = {result.index: result for result in results if isinstance(result, BatchResult)}
    assert sorted(finished) == [0, 2, 3]
    for index in finished:
        text, _, _ = _alone(demo, requests[index], 0)
        assert finished[index].text == text


def _texts(records) -> dict[int, str]:
    texts: dict[int, str] = {}
    for record in records:
        texts[record.index] = texts.get(record.index, "") + record.chunk.text
    return texts


def test_a_long_prompt_is_read_between_decode_steps_and_the_texts_stay_the_same(demo) -> None:
    batch = ContinuousBatch(demo.model, demo.tokenizer, max_batch=4)
    short = BatchRequest("The cat", max_tokens=12, params=GREEDY)
    long_prompt = " ".join(["And the LORD spake unto Moses, saying"] * 40)
    long = BatchRequest(long_prompt, max_tokens=4, params=GREEDY)
    chunks = -(-len(demo.tokenizer.encode(long_prompt)) // generation.PREFILL_CHUNK_LEN)
    assert chunks >= 2
    batch.join(0, short)
    records = batch.step()  # the short prompt is read, its first token sampled
    batch.join(1, long)
    for _ in range(chunks - 1):  # a chunk of the long prompt per step; the short one goes on
        step = batch.step()
        assert [record.index for record in step] == [0]
        records += step
    while batch:
        records += batch.step()
    texts = _texts(records)
    assert texts[0] == _alone(demo, short, 0)[0]
    assert texts[1] == _alone(demo, long, 0)[0]


def test_a_cancelled_request_leaves_at_once_and_the_others_go_on(demo) -> None:
    batch = ContinuousBatch(demo.model, demo.tokenizer, max_batch=2)
    kept = BatchRequest("Once upon a time", max_tokens=10, params=GREEDY)
    batch.join(0, kept)
    batch.join(1, BatchRequest("The cat", max_tokens=10, params=GREEDY))
    records = batch.step() + batch.step()
    assert not batch.has_room
    assert batch.cancel(1) and not batch.cancel(1)
    assert len(batch) == 1 and batch.has_room
    while batch:
        records += batch.step()
    assert _texts(r for r in records if r.index == 0)[0] == _alone(demo, kept, 0)[0]
    assert {record.index for record in records[4:]} == {0}


def _run_to_end(batch: ContinuousBatch, key: int, request: BatchRequest) -> list:
    batch.join(key, request)
    records = []
    while batch:
        records += batch.step()
    return records


def test_a_prompt_that_begins_as_an_earlier_one_resumes_from_its_cached_state(demo) -> None:
    cache = PrefixCache(capacity=1 << 30)
    batch = ContinuousBatch(demo.model, demo.tokenizer, max_batch=2, cache=cache)
    history = "User: Who was Moses?\n\nAssistant: A prophet.\n\n"
    first = _run_to_end(batch, 0, BatchRequest(history, max_tokens=4, params=GREEDY))
    assert first[-1].chunk.cached_tokens == 0
    turn = BatchRequest(history + "User: And Aaron?\n\nAssistant:", max_tokens=12, params=GREEDY)
    records = _run_to_end(batch, 1, turn)
    assert records[-1].chunk.cached_tokens == len(demo.tokenizer.encode(history))
    assert records[-1].chunk.prompt_tokens == len(demo.tokenizer.encode(turn.prompt))
    assert _texts(records)[1] == _alone(demo, turn, 0)[0]  # read in other chunks: same text


def test_long_prompts_are_cached_at_chunk_boundaries_from_the_document_start(demo) -> None:
    chunk = generation.PREFILL_CHUNK_LEN
    tokens = [(7 * i) % 500 + 10 for i in range(2 * chunk + 40)]
    cache = PrefixCache(capacity=1 << 30)
    batch = ContinuousBatch(demo.model, demo.tokenizer, max_batch=1, cache=cache)
    _run_to_end(batch, 0, BatchRequest(tuple(tokens), max_tokens=1, params=GREEDY))
    assert len(cache) == 3  # after chunk, 2 x chunk and the whole prompt
    forked = BatchRequest((*tokens[: chunk + 30], 3, 4, 5), max_tokens=3, params=GREEDY)
    records = _run_to_end(batch, 1, forked)
    assert records[-1].chunk.cached_tokens == chunk
    assert _texts(records)[1] == _alone(demo, forked, 0)[0]


def test_requests_after_a_saved_session_neither_use_nor_fill_the_cache(demo) -> None:
    cache = PrefixCache(capacity=1 << 30)
    batch = ContinuousBatch(demo.model, demo.tokenizer, max_batch=1, cache=cache)
    session = prefill(demo.model, demo.tokenizer.encode("In the beginning"))
    request = BatchRequest(" God", max_tokens=2, params=GREEDY, session=session)
    records = _run_to_end(batch, 0, request)
    assert records[-1].chunk.cached_tokens == 0 and len(cache) == 0
