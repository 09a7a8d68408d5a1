"""A chat reply as the model writes it, split into G1's thought and the answer.

G1 prompts end in ``<think`` (thinking on) or ``<think>\n</think`` (off), so a G1 reply begins
with the tag's closing ``>``; with thinking on, the thought runs up to ``</think>`` and the answer
follows. :class:`ReplySplitter` takes the raw text as it streams and releases the new thought and
answer text, holding back what may still be the start of ``</think>``; the chat shows the parts
(rwkv_cli/repl.py) and the server returns them as ``reasoning_content`` and ``content``
(rwkv_cli/serve/). ``raw_reply`` writes an answer back as the model would have.
"""

from __future__ import annotations

from dataclasses import dataclass

from rwkv_cli.templates import Template

THINK_END = "</think>"


@dataclass
class ReplySplitter:
    """Splits a raw reply stream: G1's closing '>' dropped, the thought (with thinking on) and
    the answer without its leading space."""

    starts_with_tag_end: bool  # G1 prompts end in "<think" or "</think": the reply begins ">"
    thinking: bool
    raw: str = ""
    released_thought: int = 0
    released_answer: int = 0

    @classmethod
    def for_template(cls, template: Template, think: bool) -> ReplySplitter:
        thinks = template.supports_thinking
        return cls(starts_with_tag_end=thinks, thinking=thinks and think)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Add raw reply text; return the new (thought, answer) text that is safe to release
        (``final``: the reply is over, release everything)."""
        self.raw += text
        thought, answer, closed = self._split()
        visible = len(thought) if closed or final else max(0, len(thought) - len(THINK_END))
        new_thought = thought[self.released_thought : visible]
        new_answer = answer[self.released_answer :]
        self.released_thought = max(self.released_thought, visible)
        self.released_answer = len(answer)
        return new_thought, new_answer

    def _split(self) -> tuple[str, str, bool]:
        body = self.raw[1:] if self.starts_with_tag_end and self.raw.startswith(">") else self.raw
        if not self.thinking:
            return "", body.lstrip(), False
        end = body.find(THINK_END)
        if end < 0:
            return body, "", False
        return body[:end], body[end + len(THINK_END) :].lstrip(), True


def raw_reply(template: Template, answer: str, think: bool) -> str:
    """An earlier reply's answer written as the model writes a reply (the text after
    ``Assistant:``), for a transcript given as messages: its thought, which clients do not send
    back, is written as an empty one."""
    if not template.supports_thinking:
        return f" {answer}"
    return f">{THINK_END if think else ''} {answer}"
