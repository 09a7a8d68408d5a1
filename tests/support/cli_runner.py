"""Run the ``rwkv`` command as a real process, as users and scripts do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The longest a test waits for an ``rwkv`` process to finish or to show something. A quiet machine
# needs seconds; a loaded 2-core CI machine (two test processes each building kernels, say) can
# need minutes, and a shorter wait would fail a correct run. Only a hang uses it all.
# RWKV_CLI_TEST_TIMEOUT_S overrides it.
SLOW_MACHINE_TIMEOUT_S = float(os.environ.get("RWKV_CLI_TEST_TIMEOUT_S", "300"))


def rwkv(*args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None):
    """Run ``python -m rwkv_cli`` with piped (or empty) stdin; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "rwkv_cli", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=SLOW_MACHINE_TIMEOUT_S,
    )


def rwkv_ok(*args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None):
    """``rwkv`` for a test's setup step: it must succeed, or the test fails here with its stderr
    (not later, on an assertion about what the step should have made)."""
    result = rwkv(*args, stdin=stdin, env=env)
    command = " ".join(map(str, args))
    assert result.returncode == 0, f"rwkv {command} failed:\n{result.stderr.decode()}"
    return result


def assert_one_line_error(result, code: int, *fragments: str) -> None:
    stderr = result.stderr.decode()
    assert result.returncode == code, stderr
    assert result.stdout == b""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert lines[0].startswith("Error: ")
    assert len(lines) == 1 or (len(lines) == 2 and lines[1].startswith("Hint: "))
    for fragment in fragments:
        assert fragment in lines[0]
