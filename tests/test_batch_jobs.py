"""Batch jobs (``batching.jobs``), in process on the demo model: input lines become requests
with the run's defaults and their own overrides, messages are written out as the chat writes
them, malformed lines become error records, and output records make a run resumable."""

from __future__ import annotations

import json
import os

import pytest

from rwkv_cli import generation
from rwkv_cli.batching.jobs import (
    JobDefaults,
    RecordFile,
    error_record,
    finished_ids,
    id_key,
    line_seed,
    read_jobs,
    run_jobs,
    write_records,
)
from rwkv_cli.chat import Chat
from rwkv_cli.errors import InvalidInputError, ModelOutputError, WriteError
from rwkv_cli.generation import END_OF_TEXT, generate, prefill
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.sampling import make_generator
from rwkv_cli.settings import SamplingParams
from rwkv_cli.templates import TEMPLATES
from tests.support.generation import GREEDY

WORLD = TEMPLATES["world"]


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return open_model("demo")


def _defaults(**options) -> JobDefaults:
    return JobDefaults(
        **{"params": SamplingParams(), "max_tokens": 8, "template": WORLD, **options}
    )


def _jobs(demo: LoadedModel, *lines: dict | str, defaults=None, skip=frozenset()) -> list:
    raw = [(line if isinstance(line, str) else json.dumps(line)).encode() for line in lines]
    return list(read_jobs(raw, demo, defaults or _defaults(), skip=set(skip)))


def test_a_prompt_line_takes_the_run_defaults(demo) -> None:
    shared = prefill(demo.model, demo.tokenizer.encode("A system prompt."))
    defaults = _defaults(stop=("\n",), seed=None, session=shared)
    (job,) = _jobs(demo, {"id": "a", "prompt": "Once"}, defaults=defaults)
    assert (job.line, job.id, job.error) == (1, "a", None)
    request = job.request
    assert request.prompt == "Once" and request.max_tokens == 8 and request.stop == ("\n",)
    assert request.params == SamplingParams() and request.seed is None
    assert request.session is shared  # every line starts after the shared state


def test_fields_of_a_line_override_the_defaults(demo) -> None:
    line = {
        "id": 7,
        "prompt": "Once",
        "max_tokens": 3,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 4,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "penalty_decay": 0.9,
        "seed": 42,
        "stop": "END",
    }
    request = _jobs(demo, line, defaults=_defaults(stop=("\n",), seed=1))[0].request
    assert request.max_tokens == 3 and request.seed == 42 and request.stop == ("\n", "END")
    assert request.params == SamplingParams(0, 0.5, 4, 0.1, 0.2, 0.9)
    listed = _jobs(demo, {"id": 8, "prompt": "x", "stop": ["a", "b"]})[0].request
    assert listed.stop == ("a", "b")


def test_a_line_without_a_seed_under_a_run_seed_gets_one_from_the_seed_and_its_id(demo) -> None:
    lines = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "x"}]
    first = _jobs(demo, *lines, defaults=_defaults(seed=5))
    moved = _jobs(demo, *reversed(lines), defaults=_defaults(seed=5))
    assert [job.request.seed for job in first] == [line_seed(5, "a"), line_seed(5, "b")]
    assert {job.id: job.request.seed for job in moved} == {
        job.id: job.request.seed for job in first
    }
    assert line_seed(5, "a") != line_seed(5, "b") != line_seed(6, "b")
    assert line_seed(5, 1) != line_seed(5, "1")
    assert 0 <= line_seed(5, "a") < 2**64
    assert _jobs(demo, lines[0])[0].request.seed is None  # no run seed: a fresh one is drawn


@pytest.mark.parametrize(
    ("line", "line_id", "fragment"),
    [
        ('{"id": 1, "prompt": "x"', None, "not JSON"),
        ("[1, 2]", None, "not a JSON object"),
        ('{"id": 1, "prompt": "a\\ud800b"}', None, "lone surrogate"),
        ('{"prompt": "x"}', None, '"id"'),
        ('{"id": true, "prompt": "x"}', None, '"id"'),
        ('{"id": 1}', 1, '"prompt" or "messages"'),
        ('{"id": 1, "prompt": "x", "messages": []}', 1, '"prompt" or "messages"'),
        ('{"id": 1, "prompt": 3}', 1, '"prompt" must be a string'),
        ('{"id": 1, "prompt": "x", "temprature": 0}', 1, "unknown field(s) temprature"),
        ('{"id": 1, "prompt": "x", "temperature": -1}', 1, "temperature"),
        ('{"id": 1, "prompt": "x", "top_p": "high"}', 1, "top-p"),
        ('{"id": 1, "prompt": "x", "max_tokens": -1}', 1, '"max_tokens"'),
        ('{"id": 1, "prompt": "x", "seed": 1.5}', 1, '"seed"'),
        ('{"id": 1, "prompt": "x", "stop": ""}', 1, '"stop"'),
        ('{"id": 1, "messages": [{"role": "bot", "content": "x"}]}', 1, "role"),
        ('{"id": 1, "messages": [{"role": "assistant", "content": "x"}]}', 1, "last message"),
        ('{"id": 1, "messages": "hi"}', 1, '"messages"'),
    ],
)
def test_a_malformed_line_is_an_error_with_its_line_number(demo, line, line_id, fragment) -> None:
    good, bad = _jobs(demo, {"id": "ok", "prompt": "x"}, line)
    assert good.request is not None
    assert (bad.line, bad.id, bad.request) == (2, line_id, None)
    assert fragment in bad.error


def test_a_line_that_is_not_utf8_is_an_error(demo) -> None:
    (job,) = read_jobs([b'{"id": 1, "prompt": "\xff"}'], demo, _defaults())
    assert "UTF-8" in job.error


def test_a_later_line_with_an_id_seen_before_is_an_error(demo) -> None:
    first, second = _jobs(demo, {"id": 1, "prompt": "x"}, {"id": 1, "prompt": "y"})
    assert first.request is not None and "duplicate id 1" in second.error


def test_finished_ids_and_blank_lines_are_left_out(demo) -> None:
    jobs = _jobs(demo, {"id": 1, "prompt": "x"}, "", {"id": 2, "prompt": "y"}, skip={id_key(1)})
    assert [(job.line, job.id) for job in jobs] == [(3, 2)]


def test_messages_are_written_out_as_the_chat_writes_them(demo) -> None:
    chat = Chat(demo, WORLD, GREEDY, make_generator(0)[0], max_reply_tokens=6)
    chat.set_system("Be brief.")
    reply = "".join(chunk.text for chunk in chat.send("Hello there"))
    chat.send("And then?")  # the user's message is read at once; its reply is not needed
    system, user, answer, follow_up = chat.messages
    assert demo.tokenizer.decode(list(answer.tokens)) == reply + WORLD.reply_end()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And then?"},
    ]
    request = _jobs(demo, {"id": 1, "messages": messages})[0].request
    encode = demo.tokenizer.encode
    reply_tokens = (*encode(reply), *encode(WORLD.reply_end()))
    assert request.prompt == (*system.tokens, *user.tokens, *reply_tokens, *follow_up.tokens)
    assert request.stop == WORLD.stops and request.ban == (END_OF_TEXT,)


def test_run_jobs_yields_a_record_per_line_and_greedy_text_as_generate(demo) -> None:
    prompts = {"a": "Once upon a time", "b": "The cat"}
    lines = [{"id": key, "prompt": prompt} for key, prompt in prompts.items()]
    jobs = read_jobs(
        [json.dumps(line).encode() for line in (*lines, {"id": "c"})],
        demo,
        _defaults(params=GREEDY, max_tokens=6),
    )
    records = {record["id"]: record for record in run_jobs(demo, jobs, max_batch=2)}
    assert set(records["c"]) == {"id", "line", "error"} and records["c"]["line"] == 3
    for key, prompt in prompts.items():
        expected = generate(
            demo.model, demo.tokenizer, prompt, params=GREEDY, generator=None, max_tokens=6
        )
        assert records[key]["text"] == expected
        assert records[key]["finish_reason"] == "length"
        assert records[key]["completion_tokens"] == 6
        assert records[key]["prompt_tokens"] == len(demo.tokenizer.encode(prompt))


def test_records_are_appended_as_whole_lines_and_counted(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": 0, "text": "", "completion_tokens": 0}\n')
    output = RecordFile.append_to(path)
    records = [
        {"id": 1, "text": "é\n", "completion_tokens": 3},
        {"id": 2, "line": 2, "error": {"message": "bad"}},
    ]
    summary = write_records(records, output)
    output.close()
    assert (summary.finished, summary.failed, summary.completion_tokens) == (1, 1, 3)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["id"] for line in lines] == [0, 1, 2]
    assert "é" in lines[1]  # UTF-8, not \\u escapes


def test_two_runs_never_append_to_one_output_at_once(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    first = RecordFile.append_to(path)
    with pytest.raises(WriteError, match="another run is writing"):
        RecordFile.append_to(path)
    first.close()
    RecordFile.append_to(path).close()  # free again once the first has finished


def test_finished_ids_are_the_results_not_the_errors_and_a_torn_line_goes(tmp_path) -> None:
    path = tmp_path / "out.jsonl"
    assert finished_ids(path) == set()
    path.write_bytes(
        b'{"id": "a", "text": "x"}\n'
        b'{"id": 2, "line": 2, "error": {"message": "bad"}}\n'
        b'{"id": "c", "te'
    )
    assert finished_ids(path) == {id_key("a")}
    assert path.read_bytes().endswith(b"}\n")  # the next record starts a line of its own
    assert os.path.getsize(path) == len(path.read_bytes())


def test_an_output_file_that_holds_no_records_is_refused(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    with pytest.raises(InvalidInputError, match="not the output of rwkv batch"):
        finished_ids(path)


def test_a_line_that_fails_while_it_runs_gets_an_error_record_and_the_rest_run(
    demo, monkeypatch
) -> None:
    real_sample = generation.sample_token

    def sample(logits, params, generator):
        if params.top_k == 7:  # the line that fails
            raise ModelOutputError("the model produced invalid logits (NaN)")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(generation, "sample_token", sample)
    lines = [{"id": "a", "prompt": "Once"}, {"id": "b", "prompt": "The", "top_k": 7}]
    jobs = read_jobs([json.dumps(line).encode() for line in lines], demo, _defaults())
    records = {record["id"]: record for record in run_jobs(demo, jobs, max_batch=2)}
    assert records["b"] == error_record("b", 2, "the model produced invalid logits (NaN)")
    assert records["a"]["completion_tokens"] == 8
