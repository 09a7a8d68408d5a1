"""`rwkv chat` as a process: scripted stdin, saving and resuming, and a real terminal in tmux."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from rwkv_cli.chat import TEMPLATES, Chat
from rwkv_cli.loading.open import open_model
from rwkv_cli.sampling import make_generator
from rwkv_cli.statefile import read_state_file
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, assert_one_line_error, rwkv


def test_scripted_chat_prints_one_reply_per_line(rwkv7_pth) -> None:
    result = rwkv(
        "chat", "-m", rwkv7_pth, "--seed", "5", "--max-tokens", "8", stdin=b"Hello\nHow are you?\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # not a terminal: no header or stats without --verbose

    chat = Chat(
        open_model(str(rwkv7_pth)),
        TEMPLATES["world"],
        generator=make_generator(5)[0],
        max_reply_tokens=8,
    )
    replies = [
        "".join(c.text for c in chat.send(line)).lstrip() for line in ("Hello", "How are you?")
    ]
    assert result.stdout.decode() == "".join(reply + "\n" for reply in replies)


def test_autosave_then_resume_with_state(rwkv7_pth, tmp_path) -> None:
    saved = tmp_path / "chat.rwkvstate"
    first = rwkv(
        "chat",
        "-m",
        rwkv7_pth,
        "--max-tokens",
        "6",
        "--autosave",
        saved,
        "--system",
        "Be nice.",
        stdin=b"Hi\nAgain\n",
    )
    assert first.returncode == 0, first.stderr
    chat = read_state_file(saved).chat
    assert [m["role"] for m in chat["messages"]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    resumed = rwkv(
        "chat",
        "--state",
        saved,
        "-v",
        stdin=b"/info\n/undo\n/save " + str(tmp_path / "after-undo.rwkvstate").encode() + b"\n",
    )
    assert resumed.returncode == 0, resumed.stderr
    stderr = resumed.stderr.decode()
    assert (
        "messages:     5" in stderr
        and "You: Again" in stderr
        and "system:       Be nice." in stderr
    )
    after = read_state_file(tmp_path / "after-undo.rwkvstate")
    assert len(after.chat["messages"]) == 3


def test_autosave_never_replaces_another_saved_chat(rwkv7_pth, tmp_path) -> None:
    saved = tmp_path / "chat.rwkvstate"
    chat = ("chat", "-m", rwkv7_pth, "--max-tokens", "4")
    assert rwkv(*chat, "--autosave", saved, stdin=b"Hi\n").returncode == 0
    before = saved.read_bytes()
    again = rwkv(*chat, "--autosave", saved, stdin=b"Hello\n")  # --state forgotten
    assert_one_line_error(again, 1, "holds a saved chat, which --autosave would replace")
    assert saved.read_bytes() == before
    resumed = rwkv("chat", "--state", saved, "--autosave", saved, stdin=b"Hello\n")
    assert resumed.returncode == 0, resumed.stderr
    assert len(read_state_file(saved).chat["messages"]) == 4


def test_autosave_never_replaces_a_saved_state_that_is_not_a_chat(rwkv7_pth, tmp_path) -> None:
    document = tmp_path / "manual.rwkvstate"
    assert (
        rwkv("save-state", "A manual, read once.", "-m", rwkv7_pth, "-o", document).returncode == 0
    )
    before = document.read_bytes()
    chat = ("chat", "-m", rwkv7_pth, "--max-tokens", "4")
    refused = rwkv(*chat, "--autosave", document, stdin=b"Hi\n")
    assert_one_line_error(refused, 1, "holds a saved state (not a chat), which --autosave would")
    assert f"Hint: chat after it with --state {document}" in refused.stderr.decode()
    assert document.read_bytes() == before
    after = tmp_path / "chat.rwkvstate"
    resumed = rwkv(*chat, "--state", document, "--autosave", after, stdin=b"Hi\n")
    assert resumed.returncode == 0, resumed.stderr
    assert document.read_bytes() == before
    assert read_state_file(after).chat_start  # the document's state, kept with the chat


def test_options_given_when_resuming_win_over_the_saved_ones(rwkv7_pth, tmp_path) -> None:
    saved = tmp_path / "chat.rwkvstate"
    options = ("--max-tokens", "7", "--template", "pile")  # not the defaults (500, world)
    first = rwkv("chat", "-m", rwkv7_pth, *options, "--autosave", saved, stdin=b"Hi\n")
    assert first.returncode == 0, first.stderr
    kept = rwkv("chat", "--state", saved, "-v", stdin=b"/info\n").stderr.decode()
    assert "max_tokens=7" in kept and "template:     pile" in kept
    resumed = rwkv(
        "chat", "--state", saved, "--max-tokens", "3", "--template", "world", "-v", stdin=b"/info\n"
    )
    stderr = resumed.stderr.decode()
    assert "max_tokens=3" in stderr and "template:     world" in stderr


def test_think_without_a_thinking_template_is_a_warning(rwkv7_pth) -> None:
    result = rwkv("chat", "-m", rwkv7_pth, "--think", "--max-tokens", "2", stdin=b"Hi\n")
    assert result.returncode == 0
    assert result.stderr.decode().startswith("Warning: thinking works with the g1 template only")


def test_a_block_starting_with_a_slash_is_a_message(rwkv7_pth) -> None:
    script = b'"""\n/bye is what they said\nlast line\n"""\nHello\n'
    result = rwkv("chat", "-m", rwkv7_pth, "--max-tokens", "2", "-v", stdin=script)
    assert result.returncode == 0 and result.stderr.decode().count("generated: ") == 2


def test_a_scripted_chat_whose_reader_goes_away_ends_quietly(rwkv7_pth) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_cli", "chat", "-m", str(rwkv7_pth), "--max-tokens", "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdin.write(b"Hello\n" * 50)
    process.stdin.close()
    process.stdout.read(1)
    process.stdout.close()  # like `| head -c 1`
    assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 0
    assert process.stderr.read() == b""


def test_commands_report_problems_and_carry_on(rwkv7_pth) -> None:
    script = b"/frobnicate\n/set temperature -1\n/set top_p 0.5\n/retry\n/undo\n/info\n"
    result = rwkv("chat", "-m", rwkv7_pth, "-v", stdin=script)
    stderr = result.stderr.decode()
    assert result.returncode == 1  # it carried on, but a script should know
    assert "Unknown command /frobnicate" in stderr
    assert "Error: temperature must be a finite number >= 0" in stderr
    assert "top_p = 0.5" in stderr and "top_p=0.5" in stderr
    assert "Error: there is no reply to retry" in stderr
    assert "Error: there is nothing to undo" in stderr
    assert "Traceback" not in stderr


# --- a real terminal ---------------------------------------------------------------------------


class Tmux:
    """A detached tmux session running a shell: type keys, read the screen."""

    def __init__(self) -> None:
        self.name = f"rwkv-test-{uuid.uuid4().hex[:8]}"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", "120", "-y", "40"], check=True
        )

    def send(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def screen(self) -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-t", self.name, "-S", "-200"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def wait_for_prompt(self, timeout: float = SLOW_MACHINE_TIMEOUT_S) -> None:
        """Until the last line on screen is the chat's empty "> " prompt."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.screen().splitlines() if line.strip()]
            if lines and lines[-1].rstrip() == ">":
                return
            time.sleep(0.2)
        raise AssertionError(f"no prompt:\n{self.screen()}")

    def wait_for(self, text: str, timeout: float = SLOW_MACHINE_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.2)
        raise AssertionError(f"{text!r} never appeared:\n{self.screen()}")

    def wait_for_text_after(self, line: str, timeout: float = SLOW_MACHINE_TIMEOUT_S) -> None:
        """Until something shows below ``line`` (a reply has started to stream after it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if line in screen and screen.rsplit(line, 1)[1].strip():
                return
            time.sleep(0.2)
        raise AssertionError(f"nothing after {line!r}:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], check=False)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_chat_in_a_real_terminal(rwkv7_pth, tmp_path) -> None:
    saved = tmp_path / "terminal.rwkvstate"
    tmux = Tmux()
    try:
        command = (
            f"{sys.executable} -m rwkv_cli chat -m {rwkv7_pth} --max-tokens 100000 "
            f"--seed 1; echo EXIT=$?"
        )
        tmux.send(f"cd {tmp_path} && HOME={tmp_path} {command}", "Enter")
        tmux.wait_for("/help")  # the header
        tmux.wait_for_prompt()
        tmux.send("Hello there", "Enter")
        tmux.wait_for_text_after("> Hello there")  # the reply streams (up to 100000 tokens)
        tmux.send("C-c")
        tmux.wait_for("(stopped)")
        tmux.send(f"/save {saved}", "Enter")
        tmux.wait_for("Saved to")
        tmux.send("C-d")
        screen = tmux.wait_for("\nEXIT=")  # the shell's echo, not the typed command line
    finally:
        tmux.close()
    assert "\nEXIT=0" in screen and "Traceback" not in screen
    chat = json.loads(json.dumps(read_state_file(saved).chat))
    user, reply = chat["messages"]
    assert user["text"] == "Hello there" and reply["text"].strip()
    assert reply["text"].strip()[:20] in screen.replace("\n", "")
