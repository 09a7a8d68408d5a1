"""The ``rwkv`` command's option parsing and validation, run in this process (no process start):
usage errors exit 2 with one ``Error:`` line and a hint on stderr, nothing on stdout, and the help
screens. What needs a real process (signals, pipes, terminals, the import of torch) stays in
test_cli.py and the other CLI test modules."""

from __future__ import annotations

import os
import re
import signal
import warnings

import pytest
import torch
import typer

from rwkv_cli.cli import app
from rwkv_cli.cpu import MAX_THREADS
from rwkv_cli.kernels.build import kernel_choice
from tests.support.cli_in_process import rwkv_in_process as rwkv
from tests.support.cli_runner import assert_one_line_error


@pytest.mark.parametrize(
    ("option", "value", "fragment", "hint"),
    [
        ("--top-p", "1.5", "top-p", "use 1 to turn nucleus sampling off"),
        ("--temperature", "-1", "temperature", "use 0 for greedy decoding"),
        ("--top-k", "-2", "top-k", "use 0 to turn top-k filtering off"),
        ("--penalty-decay", "0", "penalty decay", "use 1 to count every earlier token"),
        ("--temperature", "warm", "--temperature", "see 'rwkv generate --help'"),
        ("--max-tokens", "-1", "--max-tokens", "see 'rwkv generate --help'"),
        ("--seed", "-5", "--seed", "see 'rwkv generate --help'"),
        ("--seed", str(2**64), "--seed", "see 'rwkv generate --help'"),
    ],
)
def test_invalid_option_values_are_usage_errors(rwkv7_pth, option, value, fragment, hint) -> None:
    result = rwkv("generate", "x", "-m", rwkv7_pth, option, value)
    assert_one_line_error(result, 2, fragment)
    assert f"Hint: {hint}" in result.stderr.decode()


@pytest.mark.parametrize(
    ("args", "fragment", "hint"),
    [
        (["generate", "x", "--device", "foo"], "'--device': unknown device 'foo'", "use one of"),
        (["generate", "x", "--tokenizer", "bogus"], "unknown tokenizer 'bogus'", "choose one of"),
        (["generate", "x", "-m", ""], "'--model': empty", "see 'rwkv generate --help'"),
        (["bench", "-m", " "], "'--model': empty", "see 'rwkv bench --help'"),
        (["bench", "--batch", "1,0"], "'1,0' is not a comma-separated list", "see 'rwkv bench"),
        (["bench", "--batch", "4x"], "'4x' is not a comma-separated list", "see 'rwkv bench"),
        (["generate", "x", "--stop", "a", "--stop", ""], "'--stop': empty", "see 'rwkv"),
        (["load-state", "s.rwkvstate", "--json"], "'--json': it goes with --info", "see 'rwkv"),
    ],
)
def test_bad_names_and_empty_values_are_usage_errors(args, fragment, hint) -> None:
    result = rwkv(*args)
    assert_one_line_error(result, 2, fragment)
    assert f"Hint: {hint}" in result.stderr.decode()


def test_unknown_option_is_a_usage_error() -> None:
    assert_one_line_error(rwkv("generate", "x", "--frobnicate"), 2, "--frobnicate")


def test_an_option_of_rwkv_itself_after_the_command_says_where_it_goes() -> None:
    result = rwkv("bench", "--threads", "2")
    assert_one_line_error(result, 2, "No such option: --threads")
    assert "put it first, 'rwkv --threads ... bench'" in result.stderr.decode()
    missing = rwkv("--threads")  # in its place, but without a value: the usual hint
    assert_one_line_error(missing, 2, "--threads")
    assert "Hint: see 'rwkv --help'" in missing.stderr.decode()


def test_too_many_threads_on_the_command_line_is_a_usage_error() -> None:
    result = rwkv("--threads", "100000", "models")
    assert_one_line_error(result, 2, "--threads", str(MAX_THREADS))


def test_too_many_threads_in_the_environment_is_a_usage_error() -> None:
    result = rwkv("models", env={"RWKV_CLI_THREADS": str(MAX_THREADS + 1)})
    assert_one_line_error(result, 2, "RWKV_CLI_THREADS")


def test_a_bad_device_from_the_environment_names_the_variable(rwkv7_pth) -> None:
    result = rwkv("generate", "Hi", "-m", rwkv7_pth, env={"RWKV_CLI_DEVICE": "gpu"})
    assert_one_line_error(result, 2, "unknown device 'gpu' (RWKV_CLI_DEVICE=gpu)")
    assert "unset RWKV_CLI_DEVICE" in result.stderr.decode()


def test_unknown_dtype_is_a_usage_error(rwkv7_pth) -> None:
    result = rwkv("generate", "Hi", "-m", rwkv7_pth, "--dtype", "fp8")
    assert_one_line_error(result, 2, "--dtype")


def test_unknown_kernel_choice_is_a_usage_error() -> None:
    assert_one_line_error(rwkv("--kernel", "fast", "models"), 2, "--kernel")


def test_unknown_chat_template_is_a_usage_error(rwkv7_pth) -> None:
    result = rwkv("chat", "-m", rwkv7_pth, "--template", "klingon")
    assert result.returncode == 2 and b"world, g1, pile" in result.stderr


def test_a_chat_reply_of_no_tokens_is_a_usage_error(rwkv7_pth) -> None:
    result = rwkv("chat", "-m", rwkv7_pth, "--max-tokens", "0")  # as /set max_tokens 0 is refused
    assert result.returncode == 2 and b"--max-tokens" in result.stderr


def test_version_and_help() -> None:
    version = rwkv("--version")
    assert version.returncode == 0 and version.stdout.decode().startswith("rwkv-cli ")
    help_text = rwkv("generate", "--help")
    assert help_text.returncode == 0 and "--max-tokens" in help_text.stdout.decode()
    bare = rwkv()  # the help, and no empty "Error:" line after it
    assert bare.returncode == 2 and "generate" in bare.stdout.decode()
    assert bare.stderr == b""


def test_no_help_labels_a_value_with_a_python_type() -> None:
    commands = [[], *([name] for name in typer.main.get_command(app).commands)]
    assert len(commands) == 12
    for command in commands:
        result = rwkv(*command, "--help", env={"COLUMNS": "200"})
        text = result.stdout.decode()
        assert result.returncode == 0 and "--help" in text
        assert re.findall(r"<[a-z][^>]*>", text) == [], command  # <bool>, <str>, <list[str]> ...
    generate = rwkv("generate", "--help", env={"COLUMNS": "200"}).stdout.decode()
    assert all(word in generate for word in ("MODEL", "FILE", "TEXT", "SEED"))


def test_a_run_in_process_leaves_this_process_as_it_was() -> None:
    """What the command sets for a whole process (see cli_in_process.py) is undone after it."""
    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGHUP)}
    threads, showwarning = torch.get_num_threads(), warnings.showwarning
    environment = dict(os.environ)
    result = rwkv("--no-color", "--threads", "1", "--kernel", "torch", "bench", "-m", "")
    assert_one_line_error(result, 2, "'--model': empty")
    assert {stop: signal.getsignal(stop) for stop in handlers} == handlers
    assert (torch.get_num_threads(), warnings.showwarning) == (threads, showwarning)
    assert kernel_choice() == "auto" and dict(os.environ) == environment
