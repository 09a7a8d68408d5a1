"""Run the ``rwkv`` command as a real process, as users and scripts do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def rwkv(*args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None):
    """Run ``python -m rwkv_cli`` with piped (or empty) stdin; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "rwkv_cli", *map(str, args)],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


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
