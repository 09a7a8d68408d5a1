"""The ``rwkv`` command's entry point. Importing the command takes a second or so (torch, the
Hub client); Ctrl-C in that second ends it as Ctrl-C does later on, without a traceback."""

import sys

from rwkv_cli.errors import EXIT_INTERRUPTED


def main() -> None:
    """Load the command, then run it (``cli.main``: the error boundary)."""
    try:
        from rwkv_cli.cli import main as run_command
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
    run_command()
