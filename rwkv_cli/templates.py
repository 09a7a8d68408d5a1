"""Turn templates: how a conversation is written out for the model to read.

World models use ``User: ...\n\nAssistant:`` with an optional ``System: ...`` turn first; G1
models add their thinking switch after ``Assistant:`` (BlinkDL's G1 templates); Pile models use
``User: ...\n\nBot:``. Plain strings, no torch: the command line offers the names, and the chat
and the server render the turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_BLANK_LINES = re.compile(r"\n{2,}")  # a blank line ends a turn, so user text may not hold one


@dataclass(frozen=True)
class Template:
    """How turns are written. A reply ends at a blank line or where the next user turn starts."""

    name: str
    user: str
    assistant: str
    system: str = "System"
    supports_thinking: bool = False

    def system_turn(self, text: str) -> str:
        return f"{self.system}: {normalize(text)}\n\n"

    def user_turn(self, text: str, think: bool = False) -> str:
        """The user's message and the start of the reply (with G1's thinking switch)."""
        opening = f"{self.user}: {normalize(text)}\n\n{self.assistant}:"
        if not self.supports_thinking:
            return opening
        return opening + (" <think" if think else " <think>\n</think")  # G1 templates

    def reply_end(self) -> str:
        return "\n\n"

    def turns(self, messages: Sequence[tuple[str, str]], think: bool = False) -> list[str]:
        """A conversation given as (role, text) pairs written out as ``Chat`` writes it, in the
        pieces it encodes one by one: a system prompt, user messages (each opening the reply),
        and replies as the model wrote them (the text after ``Assistant:``, e.g. " Hello")
        followed by their end."""
        writers = {
            "system": lambda text: [self.system_turn(text)],
            "user": lambda text: [self.user_turn(text, think)],
            "assistant": lambda text: [text, self.reply_end()],
        }
        return [piece for role, text in messages for piece in writers[role](text)]

    @property
    def stops(self) -> tuple[str, ...]:
        return ("\n\n", f"\n{self.user}:")


TEMPLATES = {
    "world": Template("world", "User", "Assistant"),
    "g1": Template("g1", "User", "Assistant", supports_thinking=True),
    "pile": Template("pile", "User", "Bot"),
}


def normalize(text: str) -> str:
    """User text as the official templates expect: CRLF unified, blank lines collapsed, trimmed."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()
