"""Chat sessions through the library: the transcript, /retry, /undo, save/load, stop rules, and
the invariant that the model state always equals a fresh replay of the transcript."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import pytest
import torch
from rich.console import Console

from rwkv_cli import chat as chat_module
from rwkv_cli.chat import TEMPLATES, Chat, template_for
from rwkv_cli.chatfile import load_chat, save_chat
from rwkv_cli.generation import END_OF_TEXT, Session, prefill
from rwkv_cli.lines import ScriptLines
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import open_model
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.repl import ChatRepl, ReplyRenderer
from rwkv_cli.replies import ReplySplitter
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.state import State
from rwkv_cli.templates import normalize
from rwkv_cli.textio import StdoutWriter
from rwkv_cli.tokenizer.world import load_world_tokenizer
from tests.support.numerics import assert_states_close

WORLD = TEMPLATES["world"]


@pytest.fixture(scope="module")
def loaded(rwkv7_pth) -> LoadedModel:
    return open_model(str(rwkv7_pth))


def _chat(loaded: LoadedModel, seed: int = 0, **options) -> Chat:
    return Chat(loaded, WORLD, generator=make_generator(seed)[0], max_reply_tokens=8, **options)


def _say(chat: Chat, text: str) -> str:
    return "".join(chunk.text for chunk in chat.send(text))


def _assert_state_is_the_transcript(chat: Chat) -> None:
    replayed = Session()
    for message in chat.messages:
        replayed = prefill(chat.loaded.model, message.tokens, replayed)
    assert chat.session.tokens_consumed == replayed.tokens_consumed
    if chat.messages:
        assert torch.allclose(chat.session.logits, replayed.logits, rtol=1e-4, atol=1e-4)
        ours, theirs = chat.session.state.named_tensors(), replayed.state.named_tensors()
        for name, tensor in ours.items():
            assert torch.allclose(tensor, theirs[name], rtol=1e-4, atol=1e-5), name
    transcript = chat.loaded.tokenizer.decode([t for m in chat.messages for t in m.tokens])
    turns = {"system": WORLD.system_turn, "user": WORLD.user_turn}
    rendered = "".join(turns.get(m.role, lambda text: text + "\n\n")(m.text) for m in chat.messages)
    assert transcript == rendered


def test_a_turn_adds_the_user_message_and_the_reply(loaded) -> None:
    chat = _chat(loaded)
    reply = _say(chat, "Hello\n\n\nthere")
    user, assistant = chat.messages
    assert (user.role, user.text, assistant.role, assistant.text) == (
        "user",
        "Hello\n\n\nthere",
        "assistant",
        reply,
    )
    assert loaded.tokenizer.decode(user.tokens) == "User: Hello\nthere\n\nAssistant:"
    assert loaded.tokenizer.decode(assistant.tokens) == reply + "\n\n"
    _assert_state_is_the_transcript(chat)


def test_state_equals_the_transcript_through_every_command(loaded) -> None:
    chat = _chat(loaded)
    _say(chat, "One")
    _say(chat, "Two")
    _assert_state_is_the_transcript(chat)
    list(chat.retry())
    _assert_state_is_the_transcript(chat)
    chat.undo()
    assert [m.text for m in chat.messages if m.role == "user"] == ["One"]
    _assert_state_is_the_transcript(chat)
    chat.set_system("Be brief.")
    assert chat.messages[0].role == "system" and chat.system == "Be brief."
    _assert_state_is_the_transcript(chat)
    chat.reset()
    assert [m.role for m in chat.messages] == ["system"]
    _assert_state_is_the_transcript(chat)


def test_retry_samples_again_without_reading_the_prompt_again(loaded) -> None:
    chat = _chat(loaded, seed=3)
    first = _say(chat, "Tell me something")
    fed = []
    original = loaded.model.forward

    def counting_forward(tokens, state=None):
        fed.append(len(tokens))
        return original(tokens, state)

    loaded.model.forward = counting_forward
    try:
        second = "".join(chunk.text for chunk in chat.retry())
    finally:
        del loaded.model.forward
    assert second != first
    assert [m.role for m in chat.messages] == ["user", "assistant"]
    prompt_length = len(chat.messages[0].tokens)
    assert prompt_length not in fed and max(fed) <= 2  # only reply tokens and the turn's end


def test_undo_beyond_the_kept_snapshots_replays_the_transcript(loaded, monkeypatch) -> None:
    monkeypatch.setattr("rwkv_cli.chat.SNAPSHOTS_KEPT", 1)
    chat = _chat(loaded)
    _say(chat, "a")
    _say(chat, "b")
    chat.undo()
    _assert_state_is_the_transcript(chat)
    chat.undo()
    assert chat.messages == [] and chat.session.tokens_consumed == 0


def test_an_interrupted_reply_keeps_exactly_what_was_shown(loaded) -> None:
    chat = _chat(loaded)
    chat.max_reply_tokens = 50
    stream = chat.send("Go on")
    shown = "".join(chunk.text for chunk in itertools.islice(stream, 5))
    stream.close()  # what Ctrl-C does in the REPL
    assert chat.messages[-1].text == shown
    _assert_state_is_the_transcript(chat)


def _saved_and_resumed(chat: Chat, tmp_path, seed: int) -> Chat:
    """``chat`` saved (with ``seed``) and loaded into a fresh chat seeded otherwise; the
    transcript must come back whole."""
    path = tmp_path / "chat.rwkvstate"
    save_chat(chat, path, seed=seed)
    resumed = load_chat(_chat(chat.loaded, seed=123), path)
    assert [m.text for m in resumed.messages] == [m.text for m in chat.messages]
    return resumed


def test_save_then_load_gives_the_same_next_reply(loaded, tmp_path) -> None:
    chat = _chat(loaded, seed=9)
    chat.params = SamplingParams(temperature=1.0, top_p=0.9)
    _say(chat, "Remember me")
    resumed = _saved_and_resumed(chat, tmp_path, seed=9)
    assert resumed.params == chat.params
    assert _say(resumed, "And now?") == _say(chat, "And now?")
    resumed.undo()  # the loaded transcript can be undone: it is replayed from a fresh state
    _assert_state_is_the_transcript(resumed)


def test_chat_after_a_plain_saved_state_starts_there(loaded, tmp_path) -> None:
    prefix = prefill(loaded.model, loaded.tokenizer.encode("A document.\n\n"))
    chat = _chat(loaded, start=prefix)
    _say(chat, "Summarize")
    replayed = prefill(loaded.model, [t for m in chat.messages for t in m.tokens], prefix)
    assert torch.allclose(chat.session.logits, replayed.logits, rtol=1e-4, atol=1e-4)


def test_a_chat_after_a_document_resumes_with_its_transcript_and_its_start(
    loaded, tmp_path
) -> None:
    prefix = prefill(loaded.model, loaded.tokenizer.encode("A document.\n\n"))
    chat = _chat(loaded, seed=4, start=prefix)
    _say(chat, "Summarize")
    resumed = _saved_and_resumed(chat, tmp_path, seed=4)
    assert _say(resumed, "Shorter") == _say(chat, "Shorter")
    resumed.reset()  # back to the document, not to nothing
    assert resumed.messages == [] and resumed.session.tokens_consumed == prefix.tokens_consumed
    assert torch.equal(resumed.session.logits, prefix.logits)
    assert_states_close(resumed.session.state, prefix.state, 0.0)


def test_a_failed_autosave_is_shown_and_the_chat_goes_on(loaded, tmp_path) -> None:
    console = Console(file=io.StringIO())
    out = io.StringIO()
    repl = ChatRepl(
        _chat(loaded),
        console,
        ScriptLines(io.BytesIO(b"Hi\nAgain\n")),
        StdoutWriter(out),
        autosave=tmp_path / "gone" / "chat.rwkvstate",  # its folder went after the start
        show_stats=False,
    )
    repl.run()
    assert len(repl.chat.messages) == 4  # both messages answered
    assert console.file.getvalue().count("Error: cannot write") == 2


def test_ctrl_c_while_a_message_is_read_leaves_the_chat_as_it_was(loaded, monkeypatch) -> None:
    chat = _chat(loaded)
    _say(chat, "Hi")
    before = (list(chat.messages), chat.session)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat_module, "prefill", interrupted)
    for change in (lambda: chat.send("A long paste"), lambda: chat.set_system("Be brief")):
        with pytest.raises(KeyboardInterrupt):
            change()
        assert (chat.messages, chat.session) == before


def test_reading_a_message_reports_its_progress(loaded) -> None:
    chat, seen = _chat(loaded), []
    chat.send("Hello there", lambda done, total: seen.append((done, total))).close()
    total = len(chat.messages[-1].tokens)
    assert seen and seen[-1] == (total, total)


class _Scripted:
    """A fake model that emits a fixed token sequence, one token per forward call."""

    generation, dtype, vocab_size, fingerprint = "test", torch.float32, 65536, "x"

    def __init__(self, script: list[int]) -> None:
        self.script, self.calls = script, 0

    def new_state(self) -> State:
        return State("test", [])

    def forward(self, tokens, state=None):
        logits = torch.zeros(self.vocab_size)
        logits[self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, state or self.new_state()


def _scripted_chat(reply: str | list[int]) -> Chat:
    tokenizer = load_world_tokenizer()
    script = reply if isinstance(reply, list) else [b + 1 for b in reply.encode()]
    loaded = LoadedModel(_Scripted(script), tokenizer, "scripted", Provenance(Path("scripted")))
    return Chat(loaded, WORLD, params=SamplingParams(temperature=0), max_reply_tokens=40)


@pytest.mark.parametrize(
    ("script", "kept"),
    [
        (" Hi there\n\nUser: next", " Hi there"),
        (" Sure.\nUser: fake turn", " Sure."),
        (" a\nb\n\nc", " a\nb"),  # a single newline stays inside the reply
    ],
)
def test_replies_stop_at_a_blank_line_or_a_new_user_turn(script, kept) -> None:
    chat = _scripted_chat(script)
    assert _say(chat, "Hi") == kept
    assert chat.messages[-1].text == kept
    assert load_world_tokenizer().decode(chat.messages[-1].tokens) == kept + "\n\n"


def test_end_of_text_is_never_sampled_in_a_reply() -> None:
    chat = _scripted_chat([ord("o") + 1, END_OF_TEXT, END_OF_TEXT])
    reply = _say(chat, "Hi")
    assert reply.startswith("o") and len(reply) == 40


def test_user_text_is_normalised() -> None:
    assert normalize("a\r\n\r\nb\n\n\n\nc  ") == "a\nb\nc"
    assert WORLD.user_turn("x") == "User: x\n\nAssistant:"
    g1 = TEMPLATES["g1"]
    assert g1.user_turn("x", think=True) == "User: x\n\nAssistant: <think"
    assert g1.user_turn("x", think=False) == "User: x\n\nAssistant: <think>\n</think"
    assert WORLD.system_turn("Be\n\nkind") == "System: Be\nkind\n\n"


def test_template_follows_the_model(loaded) -> None:
    assert template_for(loaded).name == "world"
    hub_file = Provenance(None, "BlinkDL/rwkv7-g1", "x.pth", "y")
    g1 = LoadedModel(loaded.model, loaded.tokenizer, "rwkv7-g1-0.1b", hub_file)
    assert template_for(g1).name == "g1"


def _render(raw_chunks: list[str], thinking: bool, hide: bool = False) -> str:
    out = io.StringIO()
    renderer = ReplyRenderer(StdoutWriter(out), ReplySplitter(True, thinking), hide, dim=False)
    for chunk in raw_chunks:
        renderer.feed(chunk)
    renderer.feed("", final=True)
    return out.getvalue()


def test_g1_thinking_is_shown_or_hidden_and_the_tag_never_leaks() -> None:
    chunks = [">", "Let me", " think.</th", "ink>", " The answer", " is 4."]
    assert _render(chunks, thinking=True) == "Let me think.The answer is 4."
    assert _render(chunks, thinking=True, hide=True) == "The answer is 4."
    assert _render([">", " Plain", " answer"], thinking=False) == "Plain answer"
