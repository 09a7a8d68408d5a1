"""The ``rwkv`` command: the app, its root options, and the one error boundary.

The commands live by group in ``text`` (generate, save-state, load-state), ``chat``, ``batch``,
``serve`` and ``tools`` (bench, doctor, download, models), with the options they share in
``options``.
Library modules that load torch are imported inside the commands that use them, so that
``rwkv --help`` and ``rwkv --version`` answer at once (tests/test_cli.py checks that they load no
torch).

``main()`` is the one error boundary: known errors become one ``Error:`` line (plus a ``Hint:``)
on stderr and exit code 1; usage errors exit 2; Ctrl-C exits 130. ``RWKV_CLI_DEBUG=1`` shows
tracebacks instead.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from typing import Annotated, Literal

import typer

from rwkv_cli import __version__
from rwkv_cli.cli import batch, chat, serve, text, tools
from rwkv_cli.cli.options import Command, Group, kernel_choice
from rwkv_cli.errors import EXIT_ERROR, EXIT_INTERRUPTED, RwkvCliError
from rwkv_cli.settings import KERNEL_CHOICES, MAX_THREADS, KernelChoice
from rwkv_cli.ui import print_error, show_warnings_on_stderr, stderr_console

app = typer.Typer(
    name="rwkv",
    cls=Group,
    help="Run RWKV language models from the terminal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _no_color(value: bool) -> None:
    if value:
        os.environ["NO_COLOR"] = "1"  # rich, prompt_toolkit and the help screens all read it


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rwkv-cli {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version."),
    ] = False,
    no_color: Annotated[
        bool,
        typer.Option(
            "--no-color",
            callback=_no_color,
            is_eager=True,
            help="No colours on the terminal (as NO_COLOR=1 does).",
        ),
    ] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            envvar="RWKV_CLI_THREADS",
            min=1,
            max=MAX_THREADS,
            metavar="N",
            help="CPU threads for the model (default: the physical cores).",
            show_default=False,
        ),
    ] = None,
    kernel: Annotated[
        Literal[KernelChoice, "cuda"],
        typer.Option(
            "--kernel",
            envvar="RWKV_CLI_KERNEL",
            metavar="|".join(KERNEL_CHOICES),
            help="Compiled C++/CUDA kernels where they build, else the torch path (auto); always "
            "the torch path; or compiled (cuda is the same), failing if they do not build.",
        ),
    ] = "auto",
) -> None:
    """Run RWKV language models from the terminal."""
    _load_torch()
    from rwkv_cli.cpu import configure_cpu
    from rwkv_cli.kernels.build import set_kernel_choice

    configure_cpu(threads)
    set_kernel_choice(kernel_choice(kernel))


app.callback()(_root)
app.command(cls=Command)(text.generate)
app.command("save-state", cls=Command)(text.save_state)
app.command("load-state", cls=Command)(text.load_state)
app.command(cls=Command)(chat.chat)
app.command(cls=Command)(batch.batch)
app.command(cls=Command)(serve.serve)
app.command(cls=Command)(tools.bench)
app.command(cls=Command)(tools.perplexity)
app.command(cls=Command)(tools.doctor)
app.command(cls=Command)(tools.download)
app.command(cls=Command)(tools.models)


def _usage_hint(error: typer.TyperException, root_options: set[str]) -> str:
    """What to do about a usage error: a value our own checks refused says what to use instead;
    an option of ``rwkv`` itself given after the command goes before it; else the help."""
    context = getattr(error, "ctx", None)
    command = context.command_path if context is not None else "rwkv"
    cause = error.__cause__
    if isinstance(cause, RwkvCliError) and cause.hint:
        return cause.hint
    option = getattr(error, "option_name", None)
    after_the_command = context is not None and context.parent is not None
    unknown_here = type(error).__name__ == "NoSuchOption"  # typer carries its own click
    if unknown_here and after_the_command and option in root_options:
        subcommand = command.removeprefix("rwkv ")
        return (
            f"{option} is an option of rwkv itself: put it first, 'rwkv {option} ... {subcommand}'"
        )
    return f"see '{command} --help'"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def _load_torch() -> None:
    """Import torch (a second or more) with Ctrl-C and the stop signals held until it is done.

    An interruption in the middle of torch's own start-up aborts the process from C++ ("terminate
    called after throwing ..."); held, it arrives right after and ends the command as a Ctrl-C.
    """
    held = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        import torch  # noqa: F401 (loaded here; the library modules import it again)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_on_signal(signum: int, frame: object) -> None:
    """End like Ctrl-C does: cleanup runs (temporary files go, the previous files stay)."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point and the single error boundary."""
    show_warnings_on_stderr()
    if sys.stdout is None:  # started with stdout closed (>&-): as if its reader had gone
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open until the process ends)
    if isinstance(sys.stdout, io.TextIOWrapper):  # an encoding without é gets "?", not a crash
        sys.stdout.reconfigure(errors="replace")
    for stop in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):  # kill; a closed terminal
        if stop is not None:
            signal.signal(stop, _exit_on_signal)
    debug = os.environ.get("RWKV_CLI_DEBUG") == "1"
    problem = None
    root = typer.main.get_command(app)
    try:
        code = root.main(prog_name="rwkv", standalone_mode=False)
    except typer.TyperException as error:  # usage errors (exit 2) and other option problems
        message = error.format_message()  # none when the help was shown (no arguments)
        root_options = {name for param in root.params for name in param.opts}
        problem = RwkvCliError(message, _usage_hint(error, root_options)) if message else None
        code = error.exit_code
    except typer.Abort:
        code = EXIT_INTERRUPTED
    except RwkvCliError as error:
        if debug:
            raise
        problem, code = error, EXIT_ERROR
    except Exception as error:
        if debug:
            raise
        problem = RwkvCliError(
            f"unexpected {type(error).__name__}: {_first_line(error)}",
            hint="set RWKV_CLI_DEBUG=1 for a traceback and please report it",
        )
        code = EXIT_ERROR
    console = stderr_console()  # made now, after --no-color has had its say
    if problem is not None:
        print_error(console, problem)
    if code == EXIT_INTERRUPTED:
        console.print("Interrupted.")
    sys.exit(code if isinstance(code, int) else 0)
