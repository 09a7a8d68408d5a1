"""Reading a conversation's lines: from a terminal (line editing, history, keys held while a
reply streams) or from a script's stdin (one message per line)."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TextIO

from rwkv_cli.textio import decode_utf8

try:
    import termios
except ImportError:  # Windows
    termios = None

if TYPE_CHECKING:
    from prompt_toolkit.history import History

MULTILINE_FENCE = '"""'


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
