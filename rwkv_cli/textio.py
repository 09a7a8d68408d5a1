"""Terminal and pipe I/O for the CLI: reading the prompt, writing the completion."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from rwkv_cli.errors import InvalidInputError, WriteError

if TYPE_CHECKING:
    from rich.console import Console

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def interactive(console: Console) -> bool:
    """Whether ``console`` is a person's terminal, where spinners, progress bars and the info
    lines show. rich counts ``FORCE_COLOR`` (set in CI logs) as a terminal; it asks for colour
    only, so then the stream itself must be a terminal too."""
    if not console.is_terminal:
        return False
    if os.environ.get("FORCE_COLOR") is None and os.environ.get("TTY_COMPATIBLE") != "1":
        return True
    isatty = getattr(console.file, "isatty", None)
    return bool(isatty is not None and isatty())


def read_prompt(argument: str | None, stdin: BinaryIO | None) -> str:
    """The prompt: piped stdin text first, then the argument, joined by a newline.

    ``stdin`` is read only when given (the caller passes it when stdin is not a terminal).
    """
    piped = decode_utf8(stdin.read(), "stdin") if stdin is not None else ""
    if not piped:
        return argument or ""
    if not argument:
        return piped
    separator = "" if piped.endswith("\n") else "\n"
    return piped + separator + argument


def read_text_file(path: Path) -> str:
    """The UTF-8 text of a file named on the command line (``-``: piped stdin)."""
    if str(path) == "-":
        stdin = piped_stdin()
        if stdin is None:
            raise InvalidInputError("no text on stdin", hint="pipe the text in, or name a file")
        return decode_utf8(stdin.read(), "stdin")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(
            f"cannot read {path}: {error.strerror or error}",
            hint="name a text file, or - for stdin",
        ) from error
    return decode_utf8(data, str(path))


def decode_utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(
            f"{source} is not valid UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start})",
            hint="convert the text first, e.g. with iconv -t UTF-8",
        ) from error


def require_utf8(text: str, source: str) -> str:
    """``text`` if it came from valid UTF-8; InvalidInputError otherwise.

    Python hands over undecodable bytes of the command line as lone surrogates
    (``surrogateescape``); they are turned back into the bytes to say which one is wrong.
    """
    try:
        given = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that stands for no byte
        raise InvalidInputError(f"{source} is not valid UTF-8 text") from None
    return decode_utf8(given, source)  # the text itself, or the first byte that is not UTF-8


def piped_stdin() -> BinaryIO | None:
    """The binary stdin when input is piped or redirected; None on a terminal or when closed."""
    stream = sys.stdin
    if stream is None or stream.closed or stream.isatty():
        return None
    return stream.buffer


def require_visible_output(what: str, hint: str) -> None:
    """Refuse an interactive session whose output nobody would see.

    With stdin on a terminal, the user types and expects to read ``what`` (the replies, the
    continuations) as it streams. A terminal or a pipe (``| tee log``) shows it; a file or a device
    (``> out.txt``, ``> /dev/null``) would swallow it while the user waits at the prompt.
    """
    if sys.stdin is None or sys.stdin.closed or not sys.stdin.isatty():
        return
    if has_live_reader(sys.stdout):
        return
    raise InvalidInputError(f"stdout is redirected to a file, so {what} would not show", hint)


def has_live_reader(stream: TextIO | None) -> bool:
    """Whether text written to ``stream`` reaches someone now: a terminal, a pipe or a socket."""
    if stream is None or stream.closed:
        return False
    try:
        if stream.isatty():
            return True
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError):  # no descriptor (a test's buffer): not a file either
        return True
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def unescape(text: str) -> str:
    r"""Turn ``\n``, ``\t``, ``\r`` and ``\\`` typed on a command line into the characters."""
    out, chars = [], iter(text)
    for char in chars:
        if char == "\\":
            following = next(chars, "")
            out.append(_ESCAPES.get(following, "\\" + following))
        else:
            out.append(char)
    return "".join(out)


class OutputClosedError(Exception):
    """The reader of stdout went away (``| head``): stop quietly."""


class StdoutWriter:
    """Writes completion text, flushing each piece; turns a closed pipe into OutputClosedError
    and any other failure (a full disk) into a WriteError."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.ends_with_newline = True

    def write(self, text: str) -> None:
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except BrokenPipeError as error:
            _silence(self.stream)
            raise OutputClosedError from error
        except OSError as error:
            _silence(self.stream)
            raise WriteError(
                f"cannot write the output: {error.strerror or error}",
                hint="what was written before stays; free some space, or write elsewhere",
            ) from error
        self.ends_with_newline = text.endswith("\n")


def _silence(stream: TextIO) -> None:
    """Point the stream's descriptor at /dev/null so the interpreter's final flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
    except (OSError, ValueError):
        pass
