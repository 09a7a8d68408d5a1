"""The ``rwkv`` command end to end, as a real process: stdout and stderr asserted separately.
Option parsing and usage errors, which need no process of their own, are in test_cli_options.py."""

from __future__ import annotations

import errno
import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from rwkv_cli import entry
from rwkv_cli.bench import benchmark
from rwkv_cli.errors import InvalidInputError, WriteError
from rwkv_cli.generation import generate
from rwkv_cli.models import load_model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.textio import StdoutWriter, require_utf8
from rwkv_cli.tokenizer.world import WorldTokenizer, load_world_tokenizer
from tests.support.cli_in_process import rwkv_in_process
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, assert_one_line_error, rwkv
from tests.support.fixtures import write_pth

GREEDY = ["--temperature", "0"]


def expected_completion(
    model_path: Path, prompt: str, max_tokens: int, seed: int = 0, **params
) -> str:
    """What the library generates for the same inputs: the CLI must print exactly this."""
    return generate(
        load_model(model_path),
        load_world_tokenizer(),
        prompt,
        params=SamplingParams(**params),
        generator=make_generator(seed)[0],
        max_tokens=max_tokens,
    )


def test_prompt_argument_prints_only_the_greedy_completion(rwkv7_pth) -> None:
    result = rwkv("generate", "Once upon a time", "-m", rwkv7_pth, "-n", "12", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected_completion(
        rwkv7_pth, "Once upon a time", 12, temperature=0
    )
    assert result.stderr == b""  # not a terminal and no --verbose: nothing but the text


def test_prompt_from_stdin(rwkv7_pth) -> None:
    text = "A document about foxes.\n"
    result = rwkv("generate", "-m", rwkv7_pth, "-n", "10", *GREEDY, stdin=text.encode())
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected_completion(rwkv7_pth, text, 10, temperature=0)


def test_stdin_comes_before_the_argument(rwkv7_pth) -> None:
    result = rwkv("generate", "Summary:", "-m", rwkv7_pth, "-n", "10", *GREEDY, stdin=b"Notes")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode() == expected_completion(
        rwkv7_pth, "Notes\nSummary:", 10, temperature=0
    )


def test_verbose_puts_info_and_stats_on_stderr_only(rwkv7_pth) -> None:
    quiet = rwkv("generate", "Hi", "-m", rwkv7_pth, "-n", "8", *GREEDY)
    verbose = rwkv("generate", "Hi", "-m", rwkv7_pth, "-n", "8", *GREEDY, "--verbose")
    assert verbose.stdout == quiet.stdout
    stderr = verbose.stderr.decode()
    assert stderr.count("RWKV-7 L2 D128") == 1  # one header line, naming the device and seed
    assert "cpu fp32" in stderr and "seed" in stderr
    assert "generated: 8 tokens" in stderr and "tok/s" in stderr
    assert "\x1b[" not in stderr  # no ANSI codes when stderr is not a terminal


def test_file_names_are_shown_as_written_not_as_markup_or_emoji(rwkv7_pth, tmp_path) -> None:
    folder = tmp_path / "[/] [v2]"  # "[/]" closes a markup tag: a folder "[", then "] [v2]"
    folder.mkdir(parents=True)
    model = folder / "step:100:final.pth"
    model.symlink_to(rwkv7_pth)
    result = rwkv("generate", "Hi", "-m", model, "-n", "2", "--verbose")
    assert result.returncode == 0, result.stderr
    assert f"· {model} ·" in result.stderr.decode()


def test_seed_makes_sampling_reproducible(rwkv7_pth) -> None:
    args = ("generate", "The", "-m", rwkv7_pth, "-n", "16", "--temperature", "1.0")
    first = rwkv(*args, "--seed", "7")
    again = rwkv(*args, "--seed", "7")
    other = rwkv(*args, "--seed", "8")
    assert first.returncode == again.returncode == other.returncode == 0
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout
    expected = expected_completion(rwkv7_pth, "The", 16, temperature=1.0, seed=7)
    assert first.stdout.decode() == expected


def test_stop_string_ends_the_output_before_it(rwkv7_pth) -> None:
    full = rwkv("generate", "x", "-m", rwkv7_pth, "-n", "20", *GREEDY).stdout.decode()
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    result = rwkv("generate", "x", "-m", rwkv7_pth, "-n", "20", *GREEDY, "--stop", stop)
    assert result.returncode == 0
    assert result.stdout.decode() == full[: full.index(stop)]


def test_zero_tokens_prints_nothing(rwkv7_pth) -> None:
    result = rwkv("generate", "x", "-m", rwkv7_pth, "-n", "0")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


def test_missing_model_file(tmp_path) -> None:
    result = rwkv_in_process("generate", "x", "-m", tmp_path / "missing.pth")
    assert_one_line_error(result, 1, "no such file", "missing.pth")


def test_file_that_is_not_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "notes.pth"
    path.write_text("just some text, not a model\n" * 20)
    assert_one_line_error(rwkv_in_process("generate", "x", "-m", path), 1, "is not a checkpoint")


def test_truncated_checkpoint(tmp_path, rwkv7_pth) -> None:
    path = tmp_path / "cut.pth"
    path.write_bytes(rwkv7_pth.read_bytes()[:100_000])
    assert_one_line_error(rwkv_in_process("generate", "x", "-m", path), 1, "truncated or corrupt")


def test_corrupt_checkpoint_of_a_detected_generation(tmp_path) -> None:
    import torch

    tensors = {
        name: torch.zeros(4)
        for name in ("emb.weight", "head.weight", "blocks.0.att.time_maa_x", "blocks.0.ln1.weight")
    }
    path = write_pth(tmp_path / "rwkv6.pth", tensors)
    assert_one_line_error(
        rwkv_in_process("generate", "x", "-m", path), 1, "corrupt RWKV-6 checkpoint", "emb.weight"
    )


def test_non_utf8_stdin(rwkv7_pth) -> None:
    result = rwkv("generate", "-m", rwkv7_pth, stdin=b"caf\xe9 au lait")
    assert_one_line_error(result, 1, "stdin is not valid UTF-8", "offset 3")


NOT_UTF8 = os.fsdecode(b"caf\xe9")  # how Python hands such argv bytes over: a lone surrogate


@pytest.mark.parametrize(
    ("command", "source"),
    [
        (["generate", NOT_UTF8], "PROMPT"),
        (["save-state", "-o", "unused.rwkvstate", NOT_UTF8], "TEXT"),
        (["chat", "--system", NOT_UTF8], "--system"),
    ],
    ids=["generate", "save-state", "chat"],
)
def test_non_utf8_command_line_text(rwkv7_pth, command, source) -> None:
    result = rwkv(*command, "-m", rwkv7_pth)
    assert_one_line_error(result, 1, f"{source} is not valid UTF-8 (byte 0xe9 at offset 3)")


def test_a_file_name_that_is_not_utf8_shows_in_errors_as_a_replacement_character() -> None:
    result = rwkv_in_process("generate", "x", "-m", os.fsdecode(b"mod\xe9l.pth"))
    assert_one_line_error(result, 1, "no such file: mod\ufffdl.pth")


def test_command_line_text_checks() -> None:
    assert require_utf8("café ✓", "PROMPT") == "café ✓"
    with pytest.raises(InvalidInputError, match="PROMPT is not valid UTF-8 text"):
        require_utf8("a\ud800", "PROMPT")  # a surrogate that stands for no byte


def test_without_a_model_the_default_is_used() -> None:
    result = rwkv_in_process("generate", "x")  # offline with an empty cache in the tests
    stderr = result.stderr.decode()
    assert result.returncode == 1 and result.stdout == b""
    assert stderr.startswith("No model given: using the default, rwkv7-g1-0.1b")
    assert "Error: rwkv7-g1-0.1b is not in the local cache" in stderr
    assert "Traceback" not in stderr


def test_debug_variable_shows_the_traceback(tmp_path) -> None:
    result = rwkv("generate", "x", "-m", tmp_path / "missing.pth", env={"RWKV_CLI_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr.decode()


def test_each_command_summary_is_one_line() -> None:
    # Typer's command list shows a docstring's first paragraph with its line breaks kept.
    from rwkv_cli.cli import app

    for command in app.registered_commands:
        summary = inspect.getdoc(command.callback).split("\n\n")[0]
        assert "\n" not in summary, command.callback.__name__


def _start_long_generation(model: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "rwkv_cli", "generate", "x", "-m", str(model)]
    return subprocess.Popen(
        [*command, "-n", "100000", *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_ctrl_c_exits_130_and_keeps_the_printed_text(rwkv7_pth) -> None:
    process = _start_long_generation(rwkv7_pth)
    first = process.stdout.read(20)  # generation is under way
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=SLOW_MACHINE_TIMEOUT_S)
    assert process.returncode == 130
    assert len(first + rest) >= 20
    assert "Traceback" not in stderr.decode()
    assert "Interrupted" in stderr.decode()


def test_ctrl_c_while_the_command_loads_is_no_traceback(monkeypatch, capsys) -> None:
    loading = types.ModuleType("rwkv_cli.cli")

    def interrupted(name: str):
        if name != "main":  # inspect.getmodule (pytest's failure report) probes __file__ & co.
            raise AttributeError(name)
        raise KeyboardInterrupt  # pressed while torch was importing

    loading.__getattr__ = interrupted
    monkeypatch.setitem(sys.modules, "rwkv_cli.cli", loading)
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 130 and capsys.readouterr().err == "Interrupted.\n"
    process = subprocess.Popen(  # the same, for real, wherever the signal lands
        [sys.executable, "-m", "rwkv_cli", "generate", "x", "-m", "demo"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.8)  # past the interpreter's own start, while torch loads (over a second)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 130
    assert process.stderr.read().decode().endswith("Interrupted.\n")


def test_ctrl_c_before_the_error_boundary_is_set_up_is_no_traceback(monkeypatch, capsys):
    loading = types.ModuleType("rwkv_cli.cli")

    def interrupted_before_the_boundary() -> None:
        raise KeyboardInterrupt

    loading.main = interrupted_before_the_boundary
    monkeypatch.setitem(sys.modules, "rwkv_cli.cli", loading)
    with pytest.raises(SystemExit) as ended:
        entry.main()
    assert ended.value.code == 130 and capsys.readouterr().err == "Interrupted.\n"


def test_ctrl_c_while_torch_loads_arrives_once_it_has_loaded() -> None:
    """Interrupted in the middle of its start-up, torch can abort the process from C++."""
    child = """if True:
        import os, subprocess, sys, time
        from rwkv_cli import cli
        assert "torch" not in sys.modules
        subprocess.Popen(["sh", "-c", f"sleep 0.3; kill -INT {os.getpid()}"])
        try:
            cli._load_torch()
            time.sleep(60)
            print("not interrupted")
        except KeyboardInterrupt:
            import torch
            print("after" if hasattr(torch, "nn") else "during")
    """
    command = [sys.executable, "-c", child]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SLOW_MACHINE_TIMEOUT_S)
    assert result.stdout == "after\n", result.stderr


def test_a_full_disk_under_stdout_is_a_write_error_and_closed_stdout_none(rwkv7_pth) -> None:
    class FullDisk(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match="cannot write the output: No space left on device"):
        StdoutWriter(FullDisk()).write("text")
    closed = subprocess.run(  # started with stdout closed (>&-): nothing to write to, no error
        [sys.executable, "-m", "rwkv_cli", "generate", "x", "-m", rwkv7_pth, "-n", "2"],
        stdin=subprocess.DEVNULL,
        stdout=None,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
    )
    assert closed.returncode == 0 and closed.stderr == b""


def test_closed_pipe_ends_quietly(rwkv7_pth) -> None:
    process = _start_long_generation(rwkv7_pth)
    process.stdout.read(20)
    process.stdout.close()  # like `| head -c 20`
    stderr = process.stderr.read()
    assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 0
    assert stderr == b""


def test_a_state_not_saved_because_the_output_closed_says_so(rwkv7_pth, tmp_path) -> None:
    saved = tmp_path / "s.rwkvstate"
    process = _start_long_generation(rwkv7_pth, "--save-state", str(saved))
    process.stdout.read(20)
    process.stdout.close()  # like `| head -c 20`
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 0 and not saved.exists()
    warning = "Warning: the output was closed before the end: the state after this text was not"
    assert stderr == f"{warning} saved to {saved}\n"


def test_bench_reports_speed_and_memory_per_dtype(rwkv7_pth) -> None:
    args = ("bench", "-m", rwkv7_pth, "--prompt-tokens", "40", "--decode-tokens", "4")
    dtypes = ("--dtype", "fp32", "--dtype", "int8")
    result = rwkv("--threads", "1", *args, *dtypes, "--batch", "1,3", "--json")
    assert result.returncode == 0, result.stderr
    fp32, int8 = json.loads(result.stdout)
    assert (fp32["dtype"], int8["dtype"]) == ("fp32", "int8")
    for report in (fp32, int8):
        assert report["threads"] == 1 and report["architecture"] == "RWKV-7 L2 D128"
        assert report["prompt_tokens"] == 40 and report["decode_tokens"] == 4
        assert report["prefill_tokens_per_second"] > 0 and report["decode_tokens_per_second"] > 0
        assert report["peak_rss_bytes"] > report["weight_bytes"]
        assert [speed["batch_size"] for speed in report["batches"]] == [1, 3]
        for speed in report["batches"]:  # B tokens per step
            per_step = speed["batch_size"] * 1000 / speed["step_milliseconds"]
            assert speed["decode_tokens_per_second"] == pytest.approx(per_step)
    # The embedding stays float32 (65536 x 128); the head's 65536 x 128 shrinks to a quarter.
    assert fp32["weight_bytes"] > 2 * 65536 * 128 * 4 > int8["weight_bytes"] > 65536 * 128 * 5
    lines = rwkv(*args, "--batch", "2").stdout.decode().splitlines()
    assert lines[2].split()[:4] == ["dtype", "load", "(cached)", "prefill"]
    assert lines[3].startswith("fp32 ")
    assert lines[4:6] == ["", "batched decode: 4 tokens per sequence, sequences together"]
    assert lines[6].split()[:3] == ["dtype", "batch", "aggregate"]
    assert lines[7].split()[:2] == ["fp32", "2"] and len(lines) == 8
    unknown = rwkv(*args, "--dtype", "int3")
    assert unknown.returncode == 2 and b"'int3' is not one of" in unknown.stderr


def test_every_bench_row_times_a_whole_load_tokenizer_included(rwkv7_pth, monkeypatch) -> None:
    loads, read = [], WorldTokenizer.from_file
    monkeypatch.setattr(WorldTokenizer, "from_file", lambda path: loads.append(path) or read(path))
    for _ in range(2):  # the second row must not reuse the first row's tokenizer
        benchmark(str(rwkv7_pth), prompt_tokens=8, decode_tokens=1)
    assert len(loads) == 2


def test_tokenizer_override(rwkv7_pth) -> None:
    args = ("generate", "Hi", "-m", rwkv7_pth, "-n", "4", "--temperature", "0")
    world = rwkv(*args, "--tokenizer", "world")
    assert world.returncode == 0 and world.stdout == rwkv(*args).stdout
    wrong = rwkv(*args, "--tokenizer", "20b")  # 50277 tokens do not spell World ids
    assert wrong.returncode == 0 and wrong.stdout != world.stdout
    unknown = rwkv(*args, "--tokenizer", "klingon")
    assert_one_line_error(unknown, 2, "Invalid value for '--tokenizer': unknown tokenizer")


@pytest.mark.parametrize("args", [["--version"], ["--help"], []])
def test_version_and_help_answer_without_loading_torch(args) -> None:
    """Loading torch takes seconds; `rwkv --help` and `--version` must not wait for it."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "rwkv_cli", *args],
        capture_output=True,
        text=True,
        timeout=SLOW_MACHINE_TIMEOUT_S,
    )
    assert result.returncode in (0, 2), result.stderr  # bare `rwkv` shows the help, exit 2
    assert "Usage" in result.stdout + result.stderr or "rwkv-cli" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not imported & {"torch", "huggingface_hub", "tokenizers", "safetensors"}
