"""Run the ``rwkv`` command inside the test process: for option parsing and validation, which
need no process of their own (signals, pipes, terminals and exit-on-signal do: cli_runner.py).

``rwkv_in_process`` calls ``rwkv_cli.cli.main``, the error boundary that the console script
(``rwkv_cli.entry.main``) runs, with ``sys.argv``, stdin, stdout and stderr replaced as a process
would have them, so usage errors reach stderr through the same code as in a real run. Its result
has the attributes of the ``CompletedProcess`` that ``cli_runner.rwkv`` returns, so
``assert_one_line_error`` checks both.
"""

from __future__ import annotations

import contextlib
import io
import signal
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from rwkv_cli.cli import main
from rwkv_cli.kernels.build import kernel_choice, set_kernel_choice

# The signals whose handlers ``main`` installs (kill, a closed terminal).
_STOP_SIGNALS = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]


@dataclass
class InProcessResult:
    """What a run left: the exit code and the bytes written to stdout and stderr."""

    returncode: int
    stdout: bytes
    stderr: bytes


def rwkv_in_process(
    *args: str | Path, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> InProcessResult:
    """Run ``rwkv ARGS`` through ``rwkv_cli.cli.main`` in this process, with ``env`` added to the
    environment; like ``cli_runner.rwkv``, stdin is empty unless given."""
    streams = {name: io.TextIOWrapper(io.BytesIO(), encoding="utf-8") for name in ("out", "err")}
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")
    argv = ["rwkv", *map(str, args)]
    with (
        _process_settings_restored(),
        mock.patch.dict("os.environ", env or {}),  # restores the whole environment (--no-color)
        mock.patch.multiple(
            sys, argv=argv, stdin=stdin_stream, stdout=streams["out"], stderr=streams["err"]
        ),
    ):
        try:
            main()
        except SystemExit as ended:  # main always ends with sys.exit
            code = ended.code
        else:
            raise AssertionError("rwkv_cli.cli.main returned without sys.exit")
    for stream in streams.values():
        stream.flush()
    stdout, stderr = (stream.buffer.getvalue() for stream in streams.values())
    returncode = 0 if code is None else code if isinstance(code, int) else 1  # as Python exits
    return InProcessResult(returncode, stdout, stderr)


@contextlib.contextmanager
def _process_settings_restored() -> Iterator[None]:
    """Undo what ``main`` and the root options set for the whole process: Python's warning
    printer, the stop signals' handlers, torch's thread count and subnormal flushing, and the
    kernel choice."""
    handlers = {stop: signal.getsignal(stop) for stop in _STOP_SIGNALS}
    threads, kernels = torch.get_num_threads(), kernel_choice()
    try:
        with mock.patch.object(warnings, "showwarning", warnings.showwarning):
            yield
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)  # torch's default; configure_cpu turns it on
        set_kernel_choice(kernels)
