"""The ``rwkv`` command's entry point: a Ctrl-C at any moment, even while the command is still
being set up, ends it as Ctrl-C does later on, without a traceback."""

import os
import sys
from collections.abc import MutableMapping

from rwkv_cli.errors import EXIT_INTERRUPTED

# OpenMP threads that spin while they wait for each other lose whole scheduler time slices to any
# other busy process, at each of the hundreds of parallel regions a token takes: beside one busy
# core, decoding fell from ~90 to ~4 tok/s. Threads that sleep while they wait cost little on an
# idle machine (benchmarks/bench_threads.py). libgomp reads this when torch loads it, so it is set
# before anything imports torch, and only where the user chose no OpenMP wait behaviour.
WAIT_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def sleep_while_waiting(environ: MutableMapping[str, str]) -> None:
    """Make OpenMP threads sleep while they wait, unless ``environ`` chooses otherwise."""
    if not any(name in environ for name in WAIT_POLICY_VARIABLES):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main() -> None:
    """Load the command, then run it (``cli.main``: the error boundary). A Ctrl-C that comes
    before that boundary is set up, or after it is done, ends the command the same way."""
    sleep_while_waiting(os.environ)
    try:
        from rwkv_cli.cli import main as run_command

        run_command()
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
