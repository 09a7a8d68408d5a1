"""Turn templates: how a conversation is written out for the model to read.

World models use ``User: ...\n\nAssistant:`` with an optional ``System: ...`` turn first; G1
models add their thinking switch after ``Assistant:`` (BlinkDL's G1 templates); Pile models use
``User: ...\n\nBot:``. Plain strings, no torch: the command line offers the names, and the chat
and the server render the turns.
"""

from __future__ import annotations

import re
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
