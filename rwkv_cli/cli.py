"""The ``rwkv`` command. Thin: parse options, call the library, print.

``main()`` is the one error boundary: known errors become one ``Error:`` line (plus a ``Hint:``)
on stderr and exit code 1; usage errors exit 2; Ctrl-C exits 130. ``RWKV_CLI_DEBUG=1`` shows
tracebacks instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from rwkv_cli import __version__
from rwkv_cli.errors import InvalidInputError, RwkvCliError
from rwkv_cli.generate import GenerationChunk, stream_generate
from rwkv_cli.models import load_model
from rwkv_cli.sampling import SamplingParams, make_generator
from rwkv_cli.textio import OutputClosedError, StdoutWriter, piped_stdin, read_prompt, unescape
from rwkv_cli.tokenizer import tokenizer_for_vocab
from rwkv_cli.ui import activity, print_error, print_stats, stderr_console

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention for Ctrl-C

app = typer.Typer(
    name="rwkv",
    help="Run RWKV language models from the terminal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOption = Annotated[
    Path,
    typer.Option(
        "-m", "--model", help="RWKV checkpoint file (.pth or .safetensors).", show_default=False
    ),
]
SAMPLING = "Sampling"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"rwkv-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Run RWKV language models from the terminal."""


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="Prompt text. Piped stdin is read too and comes first.", show_default=False
        ),
    ] = None,
    model: ModelOption = ...,
    max_tokens: Annotated[
        int, typer.Option("-n", "--max-tokens", min=0, help="Most tokens to generate.")
    ] = 256,
    temperature: Annotated[
        float,
        typer.Option(help="0 means greedy (always the likeliest token).", rich_help_panel=SAMPLING),
    ] = SamplingParams.temperature,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling; 1 disables.", rich_help_panel=SAMPLING)
    ] = SamplingParams.top_p,
    top_k: Annotated[
        int, typer.Option(help="Keep the k likeliest tokens; 0 disables.", rich_help_panel=SAMPLING)
    ] = SamplingParams.top_k,
    presence_penalty: Annotated[
        float,
        typer.Option(
            help="Subtracted once from tokens already generated.", rich_help_panel=SAMPLING
        ),
    ] = SamplingParams.presence_penalty,
    frequency_penalty: Annotated[
        float, typer.Option(help="Subtracted per (decayed) occurrence.", rich_help_panel=SAMPLING)
    ] = SamplingParams.frequency_penalty,
    penalty_decay: Annotated[
        float,
        typer.Option(
            help="Occurrence counts decay by this factor per token.", rich_help_panel=SAMPLING
        ),
    ] = SamplingParams.penalty_decay,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Random seed for reproducible sampling.",
            show_default=False,
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            help=r"Stop at this text, which is not printed (repeatable; \n and \t understood).",
            show_default=False,
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "-v", "--verbose", help="Show model info and stats even when not on a terminal."
        ),
    ] = False,
) -> None:
    """Continue a prompt and print only the completion to stdout.

    Examples: rwkv generate "Once upon a time" -m model.pth · cat notes.txt | rwkv generate
    "Summary:" -m model.pth -n 200 --temperature 0
    """
    params = _validated(
        ctx,
        SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            penalty_decay=penalty_decay,
        ),
    )
    stdin = piped_stdin()
    if prompt is None and stdin is None:
        raise typer.BadParameter(
            "none given; pass one as an argument or pipe text to stdin",
            ctx=ctx,
            param_hint="PROMPT",
        )
    text = read_prompt(prompt, stdin)
    console = stderr_console()
    show_info = verbose or console.is_terminal
    with activity(console, f"Loading {model}"):
        loaded = load_model(model)
        tokenizer = tokenizer_for_vocab(loaded.vocab_size)
    generator, seed_used = make_generator(seed)
    if show_info:
        console.print(f"[dim]{loaded.describe()} · {model.name} · seed {seed_used}[/dim]")

    writer = StdoutWriter(sys.stdout)
    last: GenerationChunk | None = None
    try:
        for last in stream_generate(
            loaded,
            tokenizer,
            text,
            params=params,
            generator=generator,
            max_tokens=max_tokens,
            stop=[unescape(item) for item in stop or ()],
        ):
            writer.write(last.text)
    except OutputClosedError:
        return
    finally:
        if sys.stdout.isatty() and not writer.ends_with_newline:
            writer.write("\n")
    if show_info and last is not None:
        print_stats(console, last)


def _validated(ctx: typer.Context, params: SamplingParams) -> SamplingParams:
    """Out-of-range sampling values are usage errors (exit 2), like unparsable ones."""
    try:
        return params.validated()
    except InvalidInputError as error:
        raise typer.BadParameter(error.message, ctx=ctx) from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


def main() -> None:
    """Console-script entry point and the single error boundary."""
    console = stderr_console()
    debug = os.environ.get("RWKV_CLI_DEBUG") == "1"
    try:
        code = typer.main.get_command(app).main(prog_name="rwkv", standalone_mode=False)
    except typer.TyperException as error:  # usage errors (exit 2) and other option problems
        context = getattr(error, "ctx", None)
        command = context.command_path if context is not None else "rwkv"
        print_error(console, RwkvCliError(error.format_message(), f"see '{command} --help'"))
        code = error.exit_code
    except typer.Abort:
        code = EXIT_INTERRUPTED
    except RwkvCliError as error:
        if debug:
            raise
        print_error(console, error)
        code = EXIT_ERROR
    except Exception as error:
        if debug:
            raise
        print_error(
            console,
            RwkvCliError(
                f"unexpected {type(error).__name__}: {_first_line(error)}",
                hint="set RWKV_CLI_DEBUG=1 for a traceback and please report it",
            ),
        )
        code = EXIT_ERROR
    if code == EXIT_INTERRUPTED:
        console.print("Interrupted.")
    sys.exit(code if isinstance(code, int) else 0)
