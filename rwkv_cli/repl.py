"""The chat REPL: reading messages and commands, streaming replies, and the slash commands.

Replies go to stdout as they are generated (G1 thinking dimmed on a terminal, or hidden);
prompts, the header, per-reply statistics and command output go to stderr.
"""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from rwkv_cli.chat import Chat, Message
from rwkv_cli.chatfile import load_chat, save_chat
from rwkv_cli.errors import InvalidInputError, RwkvCliError
from rwkv_cli.generation import GenerationChunk
from rwkv_cli.lines import Block, LineSource
from rwkv_cli.replies import ReplySplitter
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.textio import OutputClosedError, StdoutWriter
from rwkv_cli.ui import model_line, prefill_progress, print_dim, print_error, print_stats

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


class ReplyRenderer:
    """Shows a raw reply stream (split by :class:`ReplySplitter`): thinking dimmed or hidden,
    then the answer."""

    def __init__(
        self, writer: StdoutWriter, splitter: ReplySplitter, hide_thinking: bool, dim: bool
    ) -> None:
        self.writer, self.splitter = writer, splitter
        self.hide_thinking, self.dim = hide_thinking, dim

    def feed(self, text: str, final: bool = False) -> None:
        thought, answer = self.splitter.feed(text, final)
        if thought and not self.hide_thinking:
            self.writer.write(f"\x1b[2m{thought}\x1b[22m" if self.dim else thought)
        if answer:
            self.writer.write(answer)


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
            ReplySplitter.for_template(template, self.chat.think),
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
            print_stats(self.console, last)
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
        rows = {
            "model": f"{loaded.spec} ({loaded.resolved})",
            "architecture": model_line(loaded.model),
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


def show_transcript_tail(console: Console, chat: Chat, turns: int = 4) -> None:
    """The last few turns of a resumed conversation, so the user knows where it stands."""
    for message in _visible(chat.messages)[-turns:]:
        who = "You" if message.role == "user" else ("System" if message.role == "system" else "AI")
        text = message.text.strip().replace("\n", " ")
        print_dim(console, f"{who}: {text[:300]}")


def _visible(messages: list[Message]) -> list[Message]:
    return [message for message in messages if message.text.strip()]
