"""The chat REPL: reading messages and commands, streaming replies, and the slash commands.

Replies go to stdout as they are generated (G1 thinking dimmed on a terminal, or hidden);
prompts, the header, per-reply statistics and command output go to stderr.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TextIO

from rich.console import Console
from rich.markup import escape

from rwkv_cli.chat import TEMPLATES, Chat, Message
from rwkv_cli.errors import InvalidInputError, RwkvCliError, StateFileError
from rwkv_cli.generate import GenerationChunk, Session
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.statefile import TEXT_TAIL_CHARS, StateFile, read_state_file, save_state_file
from rwkv_cli.textio import OutputClosedError, StdoutWriter, decode_utf8
from rwkv_cli.ui import prefill_progress, print_dim, print_error

try:
    import termios
except ImportError:  # Windows
    termios = None

if TYPE_CHECKING:
    from prompt_toolkit.history import History

MULTILINE_FENCE = '"""'
THINK_END = "</think>"
HELP = """Commands:
  /help                 this list
  /reset                forget the conversation (keeps the system prompt)
  /retry                a new sample of the last reply
  /undo                 drop the last exchange
  /save FILE            save the conversation and its state
  /load FILE            continue a saved conversation
  /set NAME VALUE       temperature, top_p, top_k, presence_penalty, frequency_penalty,
                        penalty_decay, max_tokens, think (on/off), seed
  /system TEXT          set the system prompt (empty: remove it)
  /info                 model, template, settings and sizes
  /bye                  leave (Ctrl-D works too)
A line with only \"\"\" starts and ends a multi-line message. Ctrl-C stops a reply."""


class Block(str):
    """A message typed between two \"\"\" lines: always a message, even if it starts with /."""


class LineSource(Protocol):
    def read(self) -> str | None:
        """The next message or command; None when input ends."""

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Around the work on a line (reading a message, streaming its reply)."""


class ScriptLines:
    """One message per line from a non-terminal stdin (the lines between two \"\"\" lines make
    one message); never waits for a terminal. Lines must be UTF-8; CRLF endings are fine."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.line_number = 0

    def read(self) -> str | None:
        line = self._line()
        if line is None or line.strip() != MULTILINE_FENCE:
            return line
        block = []
        while (line := self._line()) is not None and line.strip() != MULTILINE_FENCE:
            block.append(line)
        return Block("\n".join(block))  # a block still open at the end of input is sent as is

    def busy(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def _line(self) -> str | None:
        data = self.stream.readline()
        if not data:
            return None
        self.line_number += 1
        text = decode_utf8(data, f"stdin line {self.line_number}")
        return text.removesuffix("\n").removesuffix("\r")


class TerminalLines:
    """Line editing and persistent history (prompt_toolkit); prompts are drawn on stderr."""

    def __init__(self, history_file: Path) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.output import create_output

        self.session = PromptSession(
            history=_history(history_file), output=create_output(stdout=sys.stderr)
        )

    def read(self) -> str | None:
        while True:
            try:
                line = self.session.prompt("> ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line; Ctrl-D leaves
            except EOFError:
                return None
            if line.strip() != MULTILINE_FENCE:
                return line
            return self._block()

    def busy(self) -> contextlib.AbstractContextManager[None]:
        """Keys typed while a line is worked on (a reply streams) are neither echoed into the
        reply nor taken by the terminal as lines, where a Ctrl-D would be lost; they wait, in
        order, for the next prompt. Ctrl-C still interrupts."""
        return _keys_held(sys.stdin)

    def _block(self) -> str | None:
        lines = []
        while True:
            try:
                line = self.session.prompt("… ")
            except KeyboardInterrupt:
                return ""  # Ctrl-C drops the block, as it clears a line
            except EOFError:
                return None
            if line.strip() == MULTILINE_FENCE:
                return Block("\n".join(lines))
            lines.append(line)


@contextlib.contextmanager
def _keys_held(stream: TextIO) -> Iterator[None]:
    """The terminal ``stream`` without echo and line editing (signals still work) while the
    block runs, then as it was, with what was typed meanwhile still to be read."""
    saved = _terminal_mode(stream)
    if saved is None:
        yield
        return
    held = [*saved]
    held[3] = saved[3] & ~(termios.ECHO | termios.ICANON)  # lflag
    held[6] = [*saved[6]]
    held[6][termios.VMIN], held[6][termios.VTIME] = 1, 0  # cc: each key readable at once
    termios.tcsetattr(stream.fileno(), termios.TCSANOW, held)  # not TCSAFLUSH: keep typed keys
    try:
        yield
    finally:
        termios.tcsetattr(stream.fileno(), termios.TCSANOW, saved)


def _terminal_mode(stream: TextIO) -> list | None:
    """The termios settings of ``stream``; None where it is no terminal (or there is none)."""
    if termios is None:
        return None
    try:
        return termios.tcgetattr(stream.fileno())
    except (OSError, ValueError, termios.error):  # io.UnsupportedOperation is an OSError
        return None


def _history(path: Path) -> History:
    """Typed lines kept in ``path`` across sessions; for this session only (with a warning) if
    the file cannot be written."""
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Readable by the user only: it keeps every message typed, pastes included.
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as error:
        warnings.warn(
            f"no input history: cannot write {path} ({error.strerror or error})", stacklevel=2
        )
        return InMemoryHistory()
    return FileHistory(str(path))


@dataclass
class ReplyRenderer:
    """Shows a raw reply stream: G1's closing '>' dropped, thinking dimmed or hidden, the answer
    without its leading space. Text that may still be the start of ``</think>`` is held back."""

    writer: StdoutWriter
    starts_with_tag_end: bool  # G1 prompts end in "<think" or "</think": the reply begins ">"
    thinking: bool
    hide_thinking: bool
    dim: bool
    raw: str = ""
    shown_thought: int = 0
    shown_answer: int = 0

    def feed(self, text: str, final: bool = False) -> None:
        self.raw += text
        thought, answer, closed = self._split()
        visible = len(thought) if closed or final else max(0, len(thought) - len(THINK_END))
        if visible > self.shown_thought:
            self._write_thought(thought[self.shown_thought : visible])
            self.shown_thought = visible
        if len(answer) > self.shown_answer:
            self.writer.write(answer[self.shown_answer :])
            self.shown_answer = len(answer)

    def _split(self) -> tuple[str, str, bool]:
        body = self.raw[1:] if self.starts_with_tag_end and self.raw.startswith(">") else self.raw
        if not self.thinking:
            return "", body.lstrip(), False
        end = body.find(THINK_END)
        if end < 0:
            return body, "", False
        return body[:end], body[end + len(THINK_END) :].lstrip(), True

    def _write_thought(self, text: str) -> None:
        if self.hide_thinking:
            return
        self.writer.write(f"\x1b[2m{text}\x1b[22m" if self.dim else text)


@dataclass
class ChatRepl:
    """Runs a chat: messages from ``lines``, replies to stdout, everything else to ``console``."""

    chat: Chat
    console: Console
    lines: LineSource
    writer: StdoutWriter
    seed: int | None = None
    autosave: Path | None = None
    force: bool = False  # /load takes states of other weights of the same shape (--force)
    hide_thinking: bool = False
    dim_thinking: bool = False
    show_stats: bool = True
    failed: bool = field(default=False, init=False)  # a command or an autosave failed

    def run(self) -> None:
        while (line := self.lines.read()) is not None:
            with self.lines.busy():
                if not self._take(line):
                    return

    def _take(self, line: str) -> bool:
        """Run a command or send a message; False means leave the chat."""
        if line.strip().startswith("/") and not isinstance(line, Block):
            return self.command(line.strip())
        if line.strip():
            try:
                with prefill_progress(self.console) as on_prefill:  # a long paste
                    reply = self.chat.send(line, on_prefill)
            except KeyboardInterrupt:  # while the model read the message: it was not sent
                self.console.print("[dim](stopped; the message was not sent)[/dim]")
                return True
            self._stream(reply)
        return True

    # --- replies -------------------------------------------------------------------------------

    def _stream(self, stream: Iterator[GenerationChunk]) -> None:
        template = self.chat.template
        renderer = ReplyRenderer(
            self.writer,
            starts_with_tag_end=template.supports_thinking,
            thinking=template.supports_thinking and self.chat.think,
            hide_thinking=self.hide_thinking,
            dim=self.dim_thinking,
        )
        last = None
        try:
            with contextlib.closing(stream):
                for last in stream:
                    renderer.feed(last.text)
                renderer.feed("", final=True)
        except KeyboardInterrupt:
            self.console.print("[dim](stopped)[/dim]")
        except OutputClosedError:  # the chat keeps what was written; so does the autosave
            self._autosave()
            raise
        self.writer.write("\n")
        if self.show_stats and last is not None and last.finish_reason is not None:
            self.console.print(
                f"[dim]{last.generated_tokens} tokens · {last.generation_tps:.1f} tok/s[/dim]"
            )
        self._autosave()

    # --- commands ------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the chat."""
        name, _, argument = line.partition(" ")
        handler = self._commands().get(name.lower())
        if handler is None:
            self.console.print(f"Unknown command {escape(name)}; /help lists the commands.")
            self.failed = True
            return True
        try:
            return handler(argument.strip()) is not False
        except KeyboardInterrupt:  # the chat is as it was before the command
            self.console.print("[dim](stopped)[/dim]")
            return True
        except (RwkvCliError, ValueError) as error:
            message = error.message if isinstance(error, RwkvCliError) else str(error)
            self._report(RwkvCliError(message, getattr(error, "hint", None)))
            return True

    def _commands(self) -> dict[str, Callable[[str], object]]:
        return {
            "/help": lambda _: self.console.print(escape(HELP)),
            "/bye": lambda _: False,
            "/exit": lambda _: False,
            "/reset": self._reset,
            "/retry": lambda _: self._stream(self.chat.retry()),
            "/undo": self._undo,
            "/save": self._save,
            "/load": self._load,
            "/set": self._set,
            "/system": self._system,
            "/info": self._info,
        }

    def _reset(self, _: str) -> None:
        self.chat.reset()
        self.console.print("[dim]Conversation cleared.[/dim]")
        self._autosave()

    def _undo(self, _: str) -> None:
        self.chat.undo()
        self.console.print("[dim]Last exchange removed.[/dim]")
        self._autosave()

    def _system(self, text: str) -> None:
        self.chat.set_system(text)
        self.console.print("[dim]System prompt " + ("set." if text else "removed.") + "[/dim]")
        self._autosave()

    def _save(self, argument: str) -> None:
        save_chat(self.chat, _one_path(argument), self.seed)
        print_dim(self.console, f"Saved to {argument}.")

    def _load(self, argument: str) -> None:
        self.chat = load_chat(self.chat, _one_path(argument), force=self.force)
        print_dim(self.console, f"Loaded {argument}.")
        show_transcript_tail(self.console, self.chat)

    def _set(self, argument: str) -> None:
        name, _, value = argument.partition(" ")
        name, value = name.replace("-", "_").lower(), value.strip()
        if not value:
            raise InvalidInputError("usage: /set NAME VALUE (see /help)")
        if name == "think":
            if value.lower() not in ("on", "off"):
                raise InvalidInputError("think is on or off")
            self.chat.think = value.lower() == "on"
            if self.chat.thinking_ignored:
                print_dim(self.console, self.chat.thinking_ignored)
        elif name == "max_tokens":
            self.chat.max_reply_tokens = _number(int, name, value, minimum=1)
        elif name == "seed":
            self.chat.generator, self.seed = make_generator(_number(int, name, value, minimum=0))
        elif name in SamplingParams.__dataclass_fields__:
            kind = int if name == "top_k" else float
            changed = replace(self.chat.params, **{name: _number(kind, name, value)})
            self.chat.params = changed.validated()
        else:
            raise InvalidInputError(f"unknown setting {name!r} (see /help)")
        self.console.print(f"[dim]{name} = {value}[/dim]")

    def _info(self, _: str) -> None:
        chat, loaded = self.chat, self.chat.loaded
        settings = ", ".join(f"{k}={v}" for k, v in chat.params.to_dict().items())
        dtype = str(loaded.model.dtype).removeprefix("torch.")
        rows = {
            "model": f"{loaded.spec} ({loaded.resolved})",
            "architecture": f"{loaded.model.describe()}, {dtype}, {loaded.model.device}",
            "template": chat.template.name + (" (thinking)" if chat.think else ""),
            "system": chat.system or "-",
            "messages": str(len(chat.messages)),
            "tokens read": str(chat.session.tokens_consumed),
            "sampling": f"{settings}, max_tokens={chat.max_reply_tokens}, seed={self.seed}",
        }
        for key, value in rows.items():
            self.console.print(f"{key + ':':<14}{escape(value)}")

    def _report(self, error: RwkvCliError) -> None:
        print_error(self.console, error)
        self.failed = True

    def _autosave(self) -> None:
        """Save after every turn; a failure (a full disk) is shown and the chat goes on, so
        /save can keep it elsewhere."""
        if self.autosave is None:
            return
        try:
            save_chat(self.chat, self.autosave, self.seed)
        except RwkvCliError as error:
            self._report(error)


def _one_path(argument: str) -> Path:
    parts = shlex.split(argument)
    if len(parts) != 1:
        raise InvalidInputError("give one file name")
    return Path(parts[0]).expanduser()


def _number(kind: type, name: str, value: str, minimum: float | None = None):
    try:
        number = kind(value)
    except ValueError:
        raise InvalidInputError(f"{name} must be a number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise InvalidInputError(f"{name} must be at least {minimum}, got {value}")
    return number


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


def show_transcript_tail(console: Console, chat: Chat, turns: int = 4) -> None:
    """The last few turns of a resumed conversation, so the user knows where it stands."""
    for message in _visible(chat.messages)[-turns:]:
        who = "You" if message.role == "user" else ("System" if message.role == "system" else "AI")
        text = message.text.strip().replace("\n", " ")
        print_dim(console, f"{who}: {text[:300]}")


def _visible(messages: list[Message]) -> list[Message]:
    return [message for message in messages if message.text.strip()]
