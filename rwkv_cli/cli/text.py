"""Commands on text: ``generate`` continues a prompt, ``save-state`` reads text into a state
file, ``load-state`` resumes one (piped text, or continuations typed on a terminal)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rwkv_cli.cli.options import (
    DecayOption,
    DeviceOption,
    DtypeOption,
    ForceOption,
    FrequencyOption,
    MaxTokensOption,
    ModelOption,
    PresenceOption,
    RevisionOption,
    SaveStateOption,
    SeedOption,
    StateOption,
    StopOption,
    TemperatureOption,
    TokenizerOption,
    TopKOption,
    TopPOption,
    VerboseOption,
    open_requested,
    sampling_params,
    utf8_argument,
    writable_file,
)
from rwkv_cli.errors import InvalidInputError
from rwkv_cli.paths import input_history_file
from rwkv_cli.settings import SamplingParams
from rwkv_cli.textio import (
    OutputClosedError,
    StdoutWriter,
    decode_utf8,
    has_live_reader,
    interactive,
    piped_stdin,
    read_prompt,
    require_visible_output,
    unescape,
)
from rwkv_cli.ui import (
    model_line,
    prefill_progress,
    print_dim,
    print_state_info,
    print_stats,
    stderr_console,
)

if TYPE_CHECKING:
    from rich.console import Console

    from rwkv_cli.continuation import Continuation
    from rwkv_cli.loading.open import Start

PromptArgument = Annotated[
    str | None,
    typer.Argument(
        help="Prompt text. Piped stdin is read too and comes first.",
        show_default=False,
        callback=utf8_argument,
    ),
]
TextArgument = Annotated[
    str | None,
    typer.Argument(
        help="Text to read. Piped stdin is read too and comes first.",
        show_default=False,
        callback=utf8_argument,
    ),
]
OutputOption = Annotated[
    Path,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="State file to write.",
        show_default=False,
        callback=writable_file,
    ),
]
TextFileOption = Annotated[
    Path | None,
    typer.Option(
        "-f", "--file", metavar="FILE", help="Read the text from this file.", show_default=False
    ),
]
StateFileArgument = Annotated[
    Path, typer.Argument(help="State file to resume.", show_default=False)
]
InfoOption = Annotated[bool, typer.Option("--info", help="Describe the file and exit.")]
InfoJsonOption = Annotated[bool, typer.Option("--json", help="With --info: print JSON.")]


def generate(
    ctx: typer.Context,
    prompt: PromptArgument = None,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    state: StateOption = None,
    save_state: SaveStateOption = None,
    force: ForceOption = False,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    top_k: TopKOption = SamplingParams.top_k,
    presence_penalty: PresenceOption = SamplingParams.presence_penalty,
    frequency_penalty: FrequencyOption = SamplingParams.frequency_penalty,
    penalty_decay: DecayOption = SamplingParams.penalty_decay,
    seed: SeedOption = None,
    stop: StopOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Continue a prompt and print only the completion to stdout.

    Examples:
      rwkv generate "Once upon a time" -m model.pth
      cat notes.txt | rwkv generate "Summary:" -m model.pth -n 200 --temperature 0
      rwkv generate "More:" --state s.rwkvstate
    """
    stdin = piped_stdin()
    if prompt is None and stdin is None and state is None:
        raise typer.BadParameter(
            "none given; pass one as an argument or pipe text to stdin",
            ctx=ctx,
            param_hint="PROMPT",
        )
    text = read_prompt(prompt, stdin)
    console = stderr_console()
    start = open_requested(ctx, console, state, force)
    show_info = verbose or interactive(console)
    run = _continuation(ctx, console, start, show_info)
    _print_turn(console, run, text, show_info)


def save_state(
    ctx: typer.Context,
    text: TextArgument = None,
    output: OutputOption = ...,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    file: TextFileOption = None,
    state: StateOption = None,
    force: ForceOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Read text into the model and save the resulting state (prefix caching).

    Process a system prompt or a whole document once, then continue from it many times:
      rwkv generate --state FILE
      rwkv load-state FILE
    """
    from rwkv_cli.generation import prefill
    from rwkv_cli.statefile import TEXT_TAIL_CHARS, save_state_file

    stdin = piped_stdin()
    if text is None and stdin is None and file is None:
        raise typer.BadParameter(
            "none given; pass it as an argument, with -f FILE or on stdin",
            ctx=ctx,
            param_hint="TEXT",
        )
    content = read_prompt(text, stdin)
    if file is not None:
        content = _read_text_file(file) + content
    console = stderr_console()
    start = open_requested(ctx, console, state, force)
    tokens = start.loaded.tokenizer.encode(content)
    with prefill_progress(console) as on_progress:
        session = prefill(start.loaded.model, tokens, start.session, on_progress=on_progress)
    previous = start.state_file
    save_state_file(
        output,
        start.loaded,
        session,
        sampling=previous.sampling if previous else None,
        text_tail=((previous.text_tail if previous else "") + content)[-TEXT_TAIL_CHARS:],
    )
    if verbose or interactive(console):
        print_dim(
            console,
            f"Saved the state after {session.tokens_consumed} tokens ({len(tokens)} new) "
            f"to {output}",
        )


def load_state(
    ctx: typer.Context,
    file: StateFileArgument,
    info: InfoOption = False,
    as_json: InfoJsonOption = False,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    force: ForceOption = False,
    save_state: SaveStateOption = None,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    top_k: TopKOption = SamplingParams.top_k,
    presence_penalty: PresenceOption = SamplingParams.presence_penalty,
    frequency_penalty: FrequencyOption = SamplingParams.frequency_penalty,
    penalty_decay: DecayOption = SamplingParams.penalty_decay,
    seed: SeedOption = None,
    stop: StopOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Resume a saved state: continue piped stdin text, or type continuations on a terminal.

    The model is the one the state file names, unless -m overrides it.
    """
    if as_json and not info:
        raise typer.BadParameter(
            "it goes with --info (rwkv load-state FILE --info --json)",
            ctx=ctx,
            param_hint="'--json'",
        )
    if info:
        _describe_state_file(file, as_json)
        return
    require_visible_output(
        "the continuations",
        "give the text on stdin (< /dev/null continues without any), or use | tee",
    )
    console = stderr_console()
    stdin = piped_stdin()
    start = open_requested(ctx, console, file, force)
    show_info = verbose or interactive(console)
    run = _continuation(ctx, console, start, show_info)
    if stdin is not None:
        _print_turn(console, run, decode_utf8(stdin.read(), "stdin"), show_info)
    else:
        _continue_on_the_terminal(console, run, show_info)


def _describe_state_file(path: Path, as_json: bool) -> None:
    """``load-state --info``: what the file holds, as text or JSON."""
    from rwkv_cli.statefile import read_state_file

    details = read_state_file(path).info()
    if as_json:
        typer.echo(json.dumps(details, indent=2, ensure_ascii=False))
    else:
        print_state_info(details)


def _continue_on_the_terminal(console: Console, run: Continuation, show_info: bool) -> None:
    """Continuations typed line by line until Ctrl-D, each generated after the text so far."""
    from rwkv_cli.lines import TerminalLines

    if run.text_tail:
        print_dim(console, f"…{run.text_tail[-300:]}")
    console.print(
        '[dim]Type text to append (empty: just continue; """ starts and ends several lines); '
        "Ctrl-D ends.[/dim]"
    )
    lines = TerminalLines(input_history_file())
    while (line := lines.read()) is not None:
        with lines.busy():
            _print_turn(console, run, unescape(line), show_info)


def _continuation(
    ctx: typer.Context, console: Console, start: Start, show_info: bool
) -> Continuation:
    """The command's generation turns, announced by a header line on a terminal (or -v): the
    model, where it came from and runs, and the seed that reproduces the run."""
    from rwkv_cli.continuation import Continuation

    options = ctx.params
    saved = start.state_file
    run = Continuation.begin(
        start,
        sampling_params(ctx, saved.sampling if saved else None, SamplingParams()),
        seed=options["seed"],
        max_tokens=options["max_tokens"],
        stop=[unescape(item) for item in options["stop"] or ()],
        save_path=options["save_state"],
    )
    if show_info:
        print_dim(console, f"{model_line(run.loaded.model)} · {run.loaded.spec} · seed {run.seed}")
    return run


def _print_turn(console: Console, run: Continuation, text: str, show_info: bool) -> None:
    """One turn, streamed to stdout, with the stats footer when ``show_info``."""
    writer = StdoutWriter(sys.stdout)
    last = None
    try:
        with prefill_progress(console) as on_prefill:  # gone before the text streams
            for last in run.turn(text, on_prefill):
                writer.write(last.text)
    except OutputClosedError:
        _warn_not_saved(run, "the output was closed before the end")
        raise typer.Exit() from None
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, kill
        _warn_not_saved(run, "interrupted")
        raise
    finally:
        if not writer.ends_with_newline:
            if sys.stdout.isatty():
                writer.write("\n")
            elif show_info and interactive(console) and has_live_reader(sys.stdout):
                console.print()  # `| tee`: the footer starts a line of its own
    if show_info and last is not None:
        print_stats(console, last)


def _warn_not_saved(run: Continuation, reason: str) -> None:
    if run.save_path is not None:
        warnings.warn(
            f"{reason}: the state after this text was not saved to {run.save_path}",
            stacklevel=3,
        )


def _read_text_file(path: Path) -> str:
    """The UTF-8 text of a file given by -f."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from error
    return decode_utf8(data, str(path))
