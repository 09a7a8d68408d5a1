"""Behaviour that only shows on a terminal: driven through a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
from rich.console import Console

from rwkv_cli.tokenizer.world import load_world_tokenizer
from rwkv_cli.ui import PROGRESS_MIN_TOKENS, activity, prefill_progress
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, rwkv_ok


def _read_until(fd: int, marker: bytes, timeout: float = SLOW_MACHINE_TIMEOUT_S) -> bytes:
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


def _read_until_prompt(fd: int, after: bytes) -> None:
    """Read until ``after`` and then prompt_toolkit's ``>`` prompt (maybe in the same read)."""
    if b">" not in _read_until(fd, after).split(after, 1)[1]:
        _read_until(fd, b">")


def test_load_state_on_a_terminal_continues_each_typed_line(tmp_path, rwkv7_pth) -> None:
    state = tmp_path / "s.rwkvstate"
    rwkv_ok("save-state", "Remember this.", "-m", rwkv7_pth, "-o", state)
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
        screen = _read_until(leader, b"Ctrl-D ends.")
        assert b"Remember this." in screen  # the tail of the saved text
        os.write(leader, b" And\n")  # typed keys wait for the prompt
        _read_until(leader, b"generated: 5 tokens")
        os.write(leader, b'"""\nTwo\nlines\n"""\n')  # one turn of several lines
        _read_until_prompt(leader, after=b"generated: 5 tokens")  # Ctrl-D before it is lost
        os.write(leader, b"\x04")  # Ctrl-D
        assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 0
    finally:
        process.kill()
        os.close(leader)
    saved = json.loads(rwkv_ok("load-state", state, "--info", "--json").stdout)
    block = len(load_world_tokenizer().encode("Two\nlines"))
    # 3 read + " And" (1) + 5 generated + the block + 5 generated: saved after each turn
    assert saved["tokens_consumed"] == 3 + 1 + 5 + block + 5


def test_the_spinner_shows_a_file_name_as_written() -> None:
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80, emoji=False)  # as ours
    with activity(terminal, "Loading [/] [bold]x:100:.pth"):
        time.sleep(0.3)  # a few frames
    shown = terminal.file.getvalue()
    assert "Loading [/] [bold]x:100:.pth" in shown and "\\[" not in shown


def test_prefill_progress_bar_shows_on_a_terminal_only() -> None:
    total = PROGRESS_MIN_TOKENS * 2
    terminal = Console(file=io.StringIO(), force_terminal=True, width=80)
    with prefill_progress(terminal) as update:
        update(PROGRESS_MIN_TOKENS, total)
        assert "Reading" in terminal.file.getvalue()
        update(total, total)  # all read: the bar stops before the reply streams
        stopped = terminal.file.getvalue()
        time.sleep(0.3)  # rich would redraw a live bar several times meanwhile
        assert terminal.file.getvalue() == stopped

    for console, read in [
        (Console(file=io.StringIO(), force_terminal=False), total),  # not a terminal
        (Console(file=io.StringIO(), force_terminal=True), PROGRESS_MIN_TOKENS - 1),  # short
    ]:
        with prefill_progress(console) as update:
            update(read // 2, read)
        assert console.file.getvalue() == ""


def _on_a_terminal(
    args: list[str], stdout, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, int]:
    """Start ``rwkv`` with stdin (and stderr) on a pseudo-terminal and stdout where given (None:
    on the terminal too)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_cli", *args],
        stdin=follower,
        stdout=follower if stdout is None else stdout,
        stderr=follower,
        env={**os.environ, "TERM": "dumb", "COLUMNS": "200", **(env or {})},
    )
    os.close(follower)
    return process, leader


def _failing_on_a_terminal(args: list[str], stdout, env: dict[str, str] | None = None) -> bytes:
    """What a command that should fail shows on the terminal; asserts exit status 1."""
    process, leader = _on_a_terminal(args, stdout, env)
    try:
        screen = _read_until(leader, b"Hint:")
        assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 1
    finally:
        process.kill()
        os.close(leader)
    return screen


@pytest.mark.parametrize(
    ("command", "what"), [("chat", b"the replies"), ("load-state", b"the continuations")]
)
def test_typing_with_stdout_in_a_file_is_refused_before_the_model_loads(
    tmp_path, command, what
) -> None:
    state = tmp_path / "s.rwkvstate"
    state.write_bytes(b"not read: the check comes first")
    args = ["chat", "-m", str(tmp_path / "missing.pth")] if command == "chat" else [command, state]
    with open(tmp_path / "out.txt", "wb") as out:
        screen = _failing_on_a_terminal([str(arg) for arg in args], out)
    assert b"Error: stdout is redirected to a file, so " + what + b" would not show" in screen
    assert b"Traceback" not in screen
    assert (tmp_path / "out.txt").read_bytes() == b""


def test_chat_typed_on_a_terminal_streams_its_replies_into_a_pipe(rwkv7_pth) -> None:
    args = ["chat", "-m", str(rwkv7_pth), "--max-tokens", "4", "--seed", "3"]
    process, leader = _on_a_terminal(args, subprocess.PIPE)
    try:
        _read_until(leader, b"/help")  # the header; typed keys wait for the prompt
        os.write(leader, b"Hello\n")
        _read_until_prompt(leader, after=b"4 tokens")  # Ctrl-D before the prompt is lost
        os.write(leader, b"\x04")  # Ctrl-D
        replies, _ = process.communicate(timeout=SLOW_MACHINE_TIMEOUT_S)
    finally:
        process.kill()
        os.close(leader)
    assert process.returncode == 0
    assert replies.strip()  # the reply went to the pipe (| tee would show it)


def test_keys_typed_while_a_reply_streams_wait_for_the_next_prompt(rwkv7_pth) -> None:
    args = ["chat", "-m", str(rwkv7_pth), "--max-tokens", "400", "--seed", "3"]
    process, leader = _on_a_terminal(args, None)  # the replies on the terminal too
    try:
        _read_until(leader, b"/help")
        os.write(leader, b"Hello\n")
        screen = _read_until(leader, b"\x1b[?2004l")  # prompt_toolkit has let go: replying
        time.sleep(0.3)
        screen += os.read(leader, 65536)
        assert b" tok/s" not in screen, "the reply ended too soon for the test"
        os.write(leader, b"zqzq\x15\x04")  # keys, Ctrl-U (clears them), Ctrl-D (leaves)
        screen += _read_until(leader, b" tok/s")
        assert process.wait(timeout=60) == 0  # the Ctrl-D was not lost
    finally:
        process.kill()
        os.close(leader)
    assert b"zqzq" not in screen  # nothing typed was echoed into the reply


def test_the_footer_starts_its_own_line_when_stdout_is_piped_to_tee(rwkv7_pth) -> None:
    args = ["generate", "Hi", "-m", str(rwkv7_pth), "-n", "3", "--temperature", "0"]
    process, leader = _on_a_terminal(args, subprocess.PIPE)  # as in `rwkv generate ... | tee`
    try:
        screen = _read_until(leader, b"stop: length")
        completion, _ = process.communicate(timeout=SLOW_MACHINE_TIMEOUT_S)
    finally:
        process.kill()
        os.close(leader)
    assert completion and not completion.endswith(b"\n")  # tee leaves the cursor after it
    assert b"\r\n\r\nprompt: 1 tokens" in screen  # stderr ends the line tee left open


_COLOUR = re.compile(rb"\x1b\[(?:\d+;)*(?:3[0-8]|9[0-7])(?:;\d+)*m")  # SGR with a foreground


@pytest.mark.parametrize(
    ("options", "env", "coloured"),
    [([], {}, True), (["--no-color"], {}, False), ([], {"NO_COLOR": "1"}, False)],
    ids=["default", "--no-color", "NO_COLOR"],
)
def test_colour_on_a_terminal_unless_turned_off(tmp_path, options, env, coloured) -> None:
    args = [*options, "generate", "-m", str(tmp_path / "missing.pth"), "Hi"]
    screen = _failing_on_a_terminal(args, subprocess.PIPE, {"TERM": "xterm-256color", **env})
    assert b"Error:" in screen
    assert bool(_COLOUR.search(screen)) == coloured
