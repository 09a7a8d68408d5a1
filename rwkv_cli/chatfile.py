"""A chat as a state file: saving a conversation (state, transcript, settings, sampler
position) and resuming one, with the command line's settings taking precedence."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from rwkv_cli.chat import TEMPLATES, Chat
from rwkv_cli.errors import InvalidInputError, StateFileError
from rwkv_cli.generation import Session
from rwkv_cli.statefile import (
    TEXT_TAIL_CHARS,
    StateFile,
    read_state_file,
    save_state_file,
    state_file_kind,
)


def save_chat(chat: Chat, path: Path, seed: int | None) -> None:
    """Write the conversation (state, transcript, settings, sampler position) to a state file."""
    loaded = chat.loaded
    tokens = [token for message in chat.messages for token in message.tokens]
    fresh_start = chat.start.state is None and chat.start.logits is None
    save_state_file(
        path,
        loaded,
        chat.session,
        sampling=chat.params,
        seed=seed,
        generator=chat.generator,
        text_tail=loaded.tokenizer.decode(tokens)[-TEXT_TAIL_CHARS:],
        chat={
            **chat.to_metadata(),
            "max_tokens": chat.max_reply_tokens,
            "fresh_start": fresh_start,
            "start_tokens": chat.start.tokens_consumed,
        },
        chat_start=None if fresh_start else chat.start,
    )


def load_chat(current: Chat, path: Path, force: bool = False) -> Chat:
    """The conversation saved in ``path``, continued with ``current``'s model."""
    saved = read_state_file(path)
    loaded = current.loaded
    session = saved.session_for(loaded.model, loaded.tokenizer.name, force=force)
    generator = current.generator
    saved.restore_generator(generator)
    return chat_from_saved(current, saved, session)


def chat_from_saved(base: Chat, saved: StateFile, session: Session) -> Chat:
    """A chat continuing ``session`` (the saved file's, checked against the model); with the
    file's chat record, its transcript and settings too."""
    params = saved.sampling or base.params
    chat = saved.chat
    if chat is None:  # a plain saved state (e.g. a document): the conversation starts after it
        return replace(
            base, params=params, start=session, messages=[], session=session, _snapshots={}
        )
    try:
        start = (
            Session() if chat.get("fresh_start") else saved.chat_start_session(base.loaded.model)
        )
        messages = Chat.messages_from_metadata(chat) if start is not None else []
        return replace(
            base,
            template=TEMPLATES.get(chat.get("template"), base.template),
            think=bool(chat.get("think", base.think)),
            max_reply_tokens=int(chat.get("max_tokens", base.max_reply_tokens)),
            params=params,
            start=start or session,  # a file of an earlier version: the chat starts anew
            messages=messages,
            session=session,
            _snapshots={},
        )
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise StateFileError(f"state file {saved.path} is corrupt: bad chat ({error})") from error


def resume_chat(
    base: Chat, saved: StateFile | None, session: Session, given: Iterable[str] = ()
) -> Chat:
    """The chat a command goes on with. ``base`` holds the command line's settings and starts
    from ``session``; with a ``saved`` file, the conversation continues the file's, with its
    settings except those named in ``given`` (fields of :class:`Chat` the user set on the command
    line), which keep ``base``'s: command line > saved file > defaults. ``base.params`` is always
    kept: the sampling parameters are merged field by field beforehand (``choose_sampling``)."""
    if saved is None:
        return base
    chat = chat_from_saved(base, saved, session)
    for name in {"params", *given}:
        setattr(chat, name, getattr(base, name))
    return chat


def check_autosave_target(autosave: Path, resumed: Path | None) -> None:
    """--autosave onto another state file (a saved chat, a document read once) would replace it
    after the first turn; only the file resumed may be replaced."""
    kind = state_file_kind(autosave)
    if kind is None:
        return
    if resumed is not None and resumed.exists() and os.path.samefile(autosave, resumed):
        return
    if kind == "chat":
        held, hint = "a saved chat", f"resume it with --state {autosave} --autosave {autosave}"
    else:
        held, hint = "a saved state (not a chat)", f"chat after it with --state {autosave}"
    raise InvalidInputError(
        f"{autosave} holds {held}, which --autosave would replace",
        hint=f"{hint}, or autosave to another file",
    )
