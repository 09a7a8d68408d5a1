"""The library logic behind the commands, in process: settings precedence (command line > saved
file > defaults), continuing a session turn by turn and saving it, and resuming a saved chat."""

from __future__ import annotations

import pytest
import torch

from rwkv_cli.chat import TEMPLATES, Chat
from rwkv_cli.chatfile import check_autosave_target, resume_chat, save_chat
from rwkv_cli.continuation import Continuation, sampler_for
from rwkv_cli.errors import InvalidInputError
from rwkv_cli.generation import Session, stream_generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import Start, open_model
from rwkv_cli.settings import CHAT_SAMPLING, SamplingParams, choose_sampling
from rwkv_cli.statefile import read_state_file

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def loaded(rwkv7_pth) -> LoadedModel:
    return open_model(str(rwkv7_pth))


def test_sampling_settings_given_win_over_saved_ones_which_win_over_defaults() -> None:
    saved = SamplingParams(temperature=0.5, top_p=0.5, top_k=7)
    chosen = choose_sampling({"top_p": 0.9}, saved, CHAT_SAMPLING)
    assert chosen == SamplingParams(temperature=0.5, top_p=0.9, top_k=7)
    assert choose_sampling({"top_k": 3}, None, CHAT_SAMPLING) == SamplingParams(
        **{**CHAT_SAMPLING.to_dict(), "top_k": 3}
    )
    with pytest.raises(InvalidInputError, match="top-p"):
        choose_sampling({"top_p": 2.0}, saved, CHAT_SAMPLING)


def test_a_continuation_saves_after_each_turn_and_resumes_where_it_stopped(
    loaded, tmp_path
) -> None:
    path = tmp_path / "run.rwkvstate"
    run = Continuation.begin(Start(loaded, Session()), GREEDY, 5, 6, [], save_path=path)
    first = "".join(chunk.text for chunk in run.turn("The cat"))
    assert run.text_tail == "The cat" + first
    assert run.session.tokens_consumed == read_state_file(path).tokens_consumed
    saved = read_state_file(path)
    session = saved.session_for(loaded.model, loaded.tokenizer.name)
    resumed = Continuation.begin(Start(loaded, session, saved), GREEDY, None, 6, [])
    assert resumed.seed == 5 and resumed.text_tail == run.text_tail
    second = "".join(chunk.text for chunk in resumed.turn(" sat"))
    alone = stream_generate(
        loaded.model,
        loaded.tokenizer,
        " sat",
        params=GREEDY,
        generator=torch.Generator(),
        max_tokens=6,
        session=run.session,
    )
    assert second == "".join(chunk.text for chunk in alone)


def test_a_turn_left_unfinished_changes_nothing_and_saves_nothing(loaded, tmp_path) -> None:
    path = tmp_path / "run.rwkvstate"
    run = Continuation.begin(Start(loaded, Session()), GREEDY, 1, 8, [], save_path=path)
    turn = run.turn("Hello")
    next(turn)
    turn.close()  # the reader went away (| head) or Ctrl-C
    assert run.session.tokens_consumed == 0 and run.text_tail == "" and not path.exists()


def test_a_seed_given_starts_a_new_sampler_else_the_saved_one_continues(loaded, tmp_path) -> None:
    path = tmp_path / "seeded.rwkvstate"
    run = Continuation.begin(Start(loaded, Session()), GREEDY, 42, 2, [], save_path=path)
    list(run.turn("Hi"))
    saved = read_state_file(path)
    continued, seed = sampler_for(None, saved)
    assert seed == 42 and torch.equal(continued.get_state(), run.generator.get_state())
    fresh, seed = sampler_for(7, saved)
    assert seed == 7 and not torch.equal(fresh.get_state(), run.generator.get_state())


def test_a_resumed_chat_keeps_its_settings_except_those_given_again(loaded, tmp_path) -> None:
    path = tmp_path / "chat.rwkvstate"
    original = Chat(loaded, TEMPLATES["world"], GREEDY, max_reply_tokens=4, think=True)
    list(original.send("Hello"))
    save_chat(original, path, seed=3)
    saved = read_state_file(path)
    session = saved.session_for(loaded.model, loaded.tokenizer.name)
    base = Chat(loaded, TEMPLATES["pile"], CHAT_SAMPLING, max_reply_tokens=9, start=session)
    kept = resume_chat(base, saved, session)
    assert [m.text for m in kept.messages] == [m.text for m in original.messages]
    assert (kept.template.name, kept.max_reply_tokens, kept.think) == ("world", 4, True)
    assert kept.params == CHAT_SAMPLING  # merged with the saved ones beforehand
    overridden = resume_chat(base, saved, session, ["max_reply_tokens", "template"])
    assert (overridden.template.name, overridden.max_reply_tokens) == ("pile", 9)
    assert overridden.think is True
    assert resume_chat(base, None, session) is base


def test_autosave_may_replace_only_the_chat_it_resumes(loaded, tmp_path) -> None:
    chat_file, other = tmp_path / "chat.rwkvstate", tmp_path / "other.rwkvstate"
    save_chat(Chat(loaded, TEMPLATES["world"]), chat_file, seed=1)
    check_autosave_target(tmp_path / "new.rwkvstate", None)
    check_autosave_target(chat_file, chat_file)
    with pytest.raises(InvalidInputError, match="holds a saved chat"):
        check_autosave_target(chat_file, other)
