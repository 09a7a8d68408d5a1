"""``rwkv batch`` as users run it, on the demo model: greedy output as ``rwkv generate`` gives
it, stdin and stdout, error records and exit codes, and runs that resume where they stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.cli_in_process import rwkv_in_process
from tests.support.cli_runner import SLOW_MACHINE_TIMEOUT_S, assert_one_line_error, rwkv, rwkv_ok

GREEDY_OPTIONS = ("-m", "demo", "-n", "8", "--temperature", "0")
PROMPTS = {"a": "Once upon a time", "b": "The cat", "c": "And the LORD said"}


def _write_lines(path: Path, *lines: dict | str) -> Path:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
    return path


def _records(data: bytes) -> dict:
    """The records of an output, by id; every line is whole and each id appears once."""
    assert data.endswith(b"\n")
    records = [json.loads(line) for line in data.decode().splitlines()]
    by_id = {record["id"]: record for record in records}
    assert len(by_id) == len(records), "an id was written twice"
    return by_id


def test_greedy_output_of_each_line_is_what_generate_prints(tmp_path) -> None:
    lines = [{"id": key, "prompt": prompt} for key, prompt in PROMPTS.items()]
    source = _write_lines(tmp_path / "in.jsonl", *lines)
    output = tmp_path / "out.jsonl"
    result = rwkv_ok("batch", source, "-o", output, *GREEDY_OPTIONS)
    assert result.stdout == b"" and result.stderr == b""
    records = _records(output.read_bytes())
    assert set(records) == set(PROMPTS)
    for key, prompt in list(PROMPTS.items())[:2]:
        alone = rwkv_ok("generate", prompt, *GREEDY_OPTIONS).stdout.decode()
        assert records[key]["text"] == alone
    assert set(records["c"]) == {
        "id",
        "text",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    }
    assert records["c"]["finish_reason"] == "length" and records["c"]["completion_tokens"] == 8


def test_dash_reads_stdin_and_writes_only_records_to_stdout() -> None:
    lines = "".join(
        json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS.values())
    )
    result = rwkv("batch", "-", "-o", "-", *GREEDY_OPTIONS, stdin=lines.encode())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    assert set(_records(result.stdout)) == {0, 1, 2}


def test_a_malformed_line_gets_an_error_record_while_the_others_finish(tmp_path) -> None:
    source = _write_lines(
        tmp_path / "in.jsonl",
        {"id": "a", "prompt": "Once"},
        '{"id": "b", "prompt": ',
        {"id": "c", "prompt": "The cat", "temperature": -1},
        {"id": "d", "prompt": "The"},
    )
    output = tmp_path / "out.jsonl"
    result = rwkv("batch", source, "-o", output, *GREEDY_OPTIONS)
    assert_one_line_error(result, 1, "2 of 4 lines failed")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    errors = {record["line"]: record for record in records if "error" in record}
    assert errors[2]["id"] is None and "not JSON" in errors[2]["error"]["message"]
    assert errors[3]["id"] == "c" and "temperature" in errors[3]["error"]["message"]
    assert {record["id"] for record in records if "text" in record} == {"a", "d"}


def test_a_rerun_skips_the_ids_already_finished(tmp_path) -> None:
    lines = [{"id": key, "prompt": prompt} for key, prompt in PROMPTS.items()]
    source = _write_lines(tmp_path / "in.jsonl", *lines)
    output = tmp_path / "out.jsonl"
    earlier = {"id": "a", "text": "kept", "finish_reason": "length"}
    failed = {"id": "b", "line": 2, "error": {"message": "failed before"}}
    _write_lines(output, earlier, failed)
    rwkv_ok("batch", source, "-o", output, *GREEDY_OPTIONS)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[:2] == [earlier, failed]  # finished lines stay; failed ones are tried again
    assert sorted(record["id"] for record in records[2:]) == ["b", "c"]


def test_ctrl_c_keeps_only_whole_lines_and_a_rerun_finishes_the_rest(tmp_path) -> None:
    lines = [{"id": i, "prompt": f"Line {i}"} for i in range(12)]
    source = _write_lines(tmp_path / "in.jsonl", *lines)
    output = tmp_path / "out.jsonl"
    options = ("-m", "demo", "-n", "200", "--temperature", "0", "--max-batch", "1")
    process = subprocess.Popen(
        [sys.executable, "-m", "rwkv_cli", "batch", str(source), "-o", str(output), *options],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + SLOW_MACHINE_TIMEOUT_S
    while not (output.exists() and output.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first line is written
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=SLOW_MACHINE_TIMEOUT_S) == 130
    assert "Traceback" not in process.stderr.read().decode()
    kept = _records(output.read_bytes())
    assert 1 <= len(kept) < len(lines)
    rwkv_ok("batch", source, "-o", output, *options)
    finished = _records(output.read_bytes())  # each id once: none was run twice
    assert set(finished) == set(range(12))
    assert all(finished[key] == record for key, record in kept.items())


def test_an_input_file_that_cannot_be_read_is_a_one_line_error(tmp_path) -> None:
    result = rwkv_in_process("batch", tmp_path / "missing.jsonl", "-o", tmp_path / "out.jsonl")
    assert_one_line_error(result, 1, "cannot read", "missing.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_an_output_that_cannot_be_written_is_an_error_before_any_work(tmp_path) -> None:
    source = _write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "x"})
    result = rwkv_in_process("batch", source, "-o", tmp_path / "no" / "out.jsonl", "-m", "demo")
    assert_one_line_error(result, 1, "cannot write", "there is no directory")


def test_an_output_that_holds_something_else_is_refused(tmp_path) -> None:
    source = _write_lines(tmp_path / "in.jsonl", {"id": 1, "prompt": "x"})
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    result = rwkv_in_process("batch", source, "-o", notes, "-m", "demo")
    assert_one_line_error(result, 1, "not the output of rwkv batch")
    assert notes.read_text() == "my notes\n"
