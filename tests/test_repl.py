"""Reading chat messages from a script's stdin: lines, \"\"\" blocks, line endings, bad bytes."""

from __future__ import annotations

import io

import pytest

from rwkv_cli.errors import InvalidInputError
from rwkv_cli.lines import ScriptLines, _history


def _messages(data: bytes) -> list[str]:
    lines = ScriptLines(io.BytesIO(data))
    return list(iter(lines.read, None))


def test_one_message_per_line_whatever_the_line_ending() -> None:
    assert _messages(b"Hi\nHow are you?\r\nlast without newline") == [
        "Hi",
        "How are you?",
        "last without newline",
    ]


def test_a_fenced_block_is_one_message() -> None:
    data = b'before\n"""\nline one\r\n\n  indented\n"""\nafter\n'
    assert _messages(data) == ["before", "line one\n\n  indented", "after"]


def test_a_block_still_open_at_the_end_is_sent() -> None:
    assert _messages(b'"""\nforgot\nto close\n') == ["forgot\nto close"]


def test_a_line_that_is_not_utf8_is_named() -> None:
    lines = ScriptLines(io.BytesIO(b"fine\ncaf\xe9\n"))
    assert lines.read() == "fine"
    with pytest.raises(InvalidInputError, match=r"stdin line 2 is not valid UTF-8 \(byte 0xe9"):
        lines.read()


def test_history_is_kept_in_memory_when_its_file_cannot_be_written(tmp_path) -> None:
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    assert isinstance(_history(tmp_path / "history"), FileHistory)
    assert (tmp_path / "history").stat().st_mode & 0o777 == 0o600  # it holds all one typed
    (tmp_path / "a-file").touch()
    with pytest.warns(UserWarning, match="no input history: cannot write"):
        assert isinstance(_history(tmp_path / "a-file" / "history"), InMemoryHistory)
