"""Behaviour that only shows on a terminal: driven through a pseudo-terminal."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time

from rich.console import Console

from rwkv_cli.ui import PROGRESS_MIN_TOKENS, prefill_progress
from tests.cli_runner import rwkv


def _read_until(fd: int, marker: bytes, timeout: float = 60) -> bytes:
    """Read from a pty until ``marker`` appears; fail after ``timeout`` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while marker not in data:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out waiting for {marker!r}; got {data[-500:]!r}"
        if select.select([fd], [], [], remaining)[0]:
            try:
                data += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
    return data


def test_load_state_on_a_terminal_continues_each_typed_line(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv("save-state", "Remember this.", "-m", rwkv7_pth, "-o", state)
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rwkv_cli",
            "load-state",
            str(state),
            "-n",
            "5",
            "--temperature",
            "0",
            "--save-state",
            str(state),
        ],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "TERM": "dumb", "COLUMNS": "100"},
    )
    os.close(follower)
    try:
        screen = _read_until(leader, b"> ")
        assert b"Remember this." in screen  # the tail of the saved text
        os.write(leader, b" And\n")
        screen = _read_until(leader, b"> ")
        assert b"generated: 5 tokens" in screen
        os.write(leader, b"\x04")  # Ctrl-D
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(leader)
    saved = rwkv("load-state", state, "--json").stdout
    assert b'"tokens_consumed": 9' in saved  # 3 read + " And" (1) + 5 generated: saved each turn


def test_prefill_progress_bar_shows_on_a_terminal_only() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    with prefill_progress(terminal, PROGRESS_MIN_TOKENS * 2) as update:
        update(PROGRESS_MIN_TOKENS)
        terminal.file.flush()
    assert "Reading" in terminal.file.getvalue()

    piped = Console(file=io.StringIO(), force_terminal=False)
    with prefill_progress(piped, PROGRESS_MIN_TOKENS * 2) as update:
        update(PROGRESS_MIN_TOKENS)
    assert piped.file.getvalue() == ""
