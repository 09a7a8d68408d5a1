"""The ``rwkv`` command. Thin: parse options, call the library, print.

Library modules that load torch are imported inside the commands that use them, so that
``rwkv --help`` and ``rwkv --version`` answer at once (tests/test_cli.py checks that importing
this module loads no torch); what the options declare comes from ``settings`` and ``templates``.

``main()`` is the one error boundary: known errors become one ``Error:`` line (plus a ``Hint:``)
on stderr and exit code 1; usage errors exit 2; Ctrl-C exits 130. ``RWKV_CLI_DEBUG=1`` shows
tracebacks instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup

from rwkv_cli import __version__
from rwkv_cli.errors import EXIT_INTERRUPTED, InvalidInputError, RwkvCliError
from rwkv_cli.fileio import check_writable
from rwkv_cli.paths import input_history_file
from rwkv_cli.settings import (
    CHAT_SAMPLING,
    DEFAULT_MODEL,
    DTYPE_NAMES,
    KERNEL_CHOICES,
    MAX_REPLY_TOKENS,
    MAX_SEED,
    MAX_THREADS,
    TOKENIZER_CHOICES,
    DtypeName,
    KernelChoice,
    ModelRequest,
    SamplingParams,
)
from rwkv_cli.templates import TEMPLATES
from rwkv_cli.textio import (
    OutputClosedError,
    StdoutWriter,
    decode_utf8,
    has_live_reader,
    interactive,
    piped_stdin,
    read_prompt,
    require_utf8,
    require_visible_output,
    unescape,
)
from rwkv_cli.ui import (
    activity,
    prefill_progress,
    print_bench,
    print_dim,
    print_error,
    print_models,
    print_state_info,
    print_stats,
    show_warnings_on_stderr,
    stderr_console,
)

if TYPE_CHECKING:
    import torch

    from rwkv_cli.generate import Session
    from rwkv_cli.loading.loaded import LoadedModel
    from rwkv_cli.loading.open import Start
    from rwkv_cli.statefile import StateFile

EXIT_ERROR = 1


class _HelpInWords:
    """Help that labels values with words. Typer labels every value by its Python type, even
    where none is taken: ``<bool>`` after a flag, ``<str>`` after an argument (whose name says
    what it is). Options declare their words (``metavar``: MODEL, FILE, N); flags and
    arguments get none."""

    def format_help(self, ctx: typer.Context, formatter) -> None:
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                param.display_type_rich = _no_label  # typer reads no metavar here
            elif param.is_flag:
                param.metavar = ""
        super().format_help(ctx, formatter)


def _no_label(ctx: typer.Context) -> None:
    return None


class _Command(_HelpInWords, TyperCommand):
    """A command of ``rwkv``, with its help in words."""


class _Group(_HelpInWords, TyperGroup):
    """``rwkv`` itself, with its help in words."""


app = typer.Typer(
    name="rwkv",
    cls=_Group,
    help="Run RWKV language models from the terminal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

SAMPLING = "Sampling"
STATE = "State"
WEIGHT_TYPES = "|".join(DTYPE_NAMES)  # --dtype's choices, as its help shows them


def _writable_file(ctx: typer.Context, value: Path | None) -> Path | None:
    """Option callback for files a command writes: stop before any work if it cannot."""
    if value is not None and not ctx.resilient_parsing:
        if str(value) == "-":
            raise typer.BadParameter("state files are binary: name a file (- is not stdout here)")
        check_writable(value)
    return value


@contextlib.contextmanager
def _as_usage_error(ctx: typer.Context | None = None, option: str | None = None) -> Iterator[None]:
    """Our own checks of a value given on the command line fail as usage errors (exit 2, with
    the check's hint), as typer's checks of types and ranges do."""
    try:
        yield
    except RwkvCliError as error:
        hint = None if option is None else f"'{option}'"
        raise typer.BadParameter(error.message, ctx=ctx, param_hint=hint) from error


def _model_spec(value: str | None) -> str | None:
    """Option callback: an empty -m is a usage error (it used to mean the default model)."""
    if value is not None and not value.strip():
        raise typer.BadParameter("empty; name a checkpoint file or folder, Hub repo or alias")
    return value


def _known_tokenizer(value: str | None) -> str | None:
    """Option callback: a name that names no tokenizer is a usage error."""
    from rwkv_cli.tokenizer import check_tokenizer_name

    if value is not None:
        with _as_usage_error():
            check_tokenizer_name(value)
    return value


def _stop_texts(values: list[str] | None) -> list[str] | None:
    """Option callback: an empty stop text, found everywhere, is a usage error."""
    if values and not all(values):
        raise typer.BadParameter("empty; give the text to stop at")
    return values


# Options shared by several commands, declared once.
MODEL_SPECS = (
    "A checkpoint file or folder, a Hub repo (owner/name or owner/name:file) or an alias from "
    "`rwkv models`."
)
ModelOption = Annotated[
    str | None,
    typer.Option(
        "-m",
        "--model",
        metavar="MODEL",
        help=f"{MODEL_SPECS} Default: the model of the state resumed, else {DEFAULT_MODEL}.",
        show_default=False,
        callback=_model_spec,
    ),
]
BenchModelOption = Annotated[
    str | None,
    typer.Option(
        "-m",
        "--model",
        metavar="MODEL",
        help=f"{MODEL_SPECS} Default: {DEFAULT_MODEL}.",
        show_default=False,
        callback=_model_spec,
    ),
]
TokenizerOption = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help=f"Tokenizer: {' or '.join(TOKENIZER_CHOICES)} (default: from the vocabulary size, "
        "or a state file's).",
        show_default=False,
        callback=_known_tokenizer,
    ),
]
RevisionOption = Annotated[
    str | None,
    typer.Option(metavar="REV", help="Hub branch, tag or commit of the model.", show_default=False),
]
StateOption = Annotated[
    Path | None,
    typer.Option(
        "--state",
        metavar="FILE",
        help="Continue from this state file (or a BlinkDL state-tuning .pth).",
        show_default=False,
        rich_help_panel=STATE,
    ),
]
SaveStateOption = Annotated[
    Path | None,
    typer.Option(
        "--save-state",
        metavar="FILE",
        help="Save the state after the output to this file (may equal --state).",
        show_default=False,
        callback=_writable_file,
        rich_help_panel=STATE,
    ),
]
ForceOption = Annotated[
    bool,
    typer.Option(
        "--force",
        help="Use a state made by other weights of the same shape (e.g. a fine-tune).",
        rich_help_panel=STATE,
    ),
]
MaxTokensOption = Annotated[
    int, typer.Option("-n", "--max-tokens", min=0, metavar="N", help="Most tokens to generate.")
]
ReplyTokensOption = Annotated[
    int, typer.Option("-n", "--max-tokens", min=1, metavar="N", help="Most tokens in a reply.")
]
TemperatureOption = Annotated[
    float,
    typer.Option(
        metavar="T", help="0 means greedy (always the likeliest token).", rich_help_panel=SAMPLING
    ),
]
TopPOption = Annotated[
    float,
    typer.Option(metavar="P", help="Nucleus sampling; 1 disables.", rich_help_panel=SAMPLING),
]
TopKOption = Annotated[
    int,
    typer.Option(
        metavar="K", help="Keep the k likeliest tokens; 0 disables.", rich_help_panel=SAMPLING
    ),
]
PresenceOption = Annotated[
    float,
    typer.Option(
        metavar="X",
        help="Subtracted once from tokens already generated.",
        rich_help_panel=SAMPLING,
    ),
]
FrequencyOption = Annotated[
    float,
    typer.Option(
        metavar="X", help="Subtracted per (decayed) occurrence.", rich_help_panel=SAMPLING
    ),
]
DecayOption = Annotated[
    float,
    typer.Option(
        metavar="X",
        help="Occurrence counts decay by this factor per token.",
        rich_help_panel=SAMPLING,
    ),
]
SeedOption = Annotated[
    int | None,
    typer.Option(
        min=0,
        max=MAX_SEED,
        metavar="SEED",
        help="Random seed for reproducible sampling (a resumed state continues its own).",
        show_default=False,
        rich_help_panel=SAMPLING,
    ),
]
StopOption = Annotated[
    list[str] | None,
    typer.Option(
        metavar="TEXT",
        help=r"Stop at this text, which is not printed (repeatable; \n and \t understood).",
        show_default=False,
        callback=_stop_texts,
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option("-v", "--verbose", help="Show info and stats even when not on a terminal."),
]


def _checked_device(ctx: typer.Context, value: str) -> str:
    """Option callback: an unknown device name is a usage error, and a device this machine
    lacks fails before any work; either error names RWKV_CLI_DEVICE when the value came from
    there."""
    from rwkv_cli.device import device_name, resolve_device

    if ctx.resilient_parsing:
        return value
    with _as_usage_error(option="--device"):  # typer's hint would name RWKV_CLI_DEVICE always
        _check_device(ctx, value, device_name)
    _check_device(ctx, value, resolve_device)
    return value


def _check_device(ctx: typer.Context, value: str, check: Callable[[str], object]) -> None:
    try:
        check(value)
    except InvalidInputError as error:
        source = ctx.get_parameter_source("device")
        if source is None or source.name != "ENVIRONMENT":
            raise
        raise InvalidInputError(
            f"{error.message} (RWKV_CLI_DEVICE={value})",
            hint=f"unset RWKV_CLI_DEVICE or pass --device; {error.hint}",
        ) from error


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device",
        envvar="RWKV_CLI_DEVICE",
        callback=_checked_device,
        metavar="DEVICE",
        help="Where to run the model: cpu, cuda (the current GPU), cuda:N, or auto (a GPU if "
        "there is one).",
    ),
]
DtypeOption = Annotated[
    DtypeName | None,
    typer.Option(
        "--dtype",
        metavar=WEIGHT_TYPES,
        help="Weight type (default: fp16 on a GPU, fp32 on the CPU). On the CPU bf16 and int8 "
        "take a half and a quarter of the memory and decode faster; int8 costs a little accuracy.",
        show_default=False,
    ),
]
SAMPLING_OPTIONS = (
    "temperature",
    "top_p",
    "top_k",
    "presence_penalty",
    "frequency_penalty",
    "penalty_decay",
)


def _dtype_names(values: list[str] | None) -> list[str] | None:
    """Option callback: an unknown weight type is a usage error, as for the single --dtype."""
    for name in values or []:
        if name.strip().lower() not in DTYPE_NAMES:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return values


def _utf8_argument(param: typer.CallbackParam, value: str | None) -> str | None:
    """Text from the command line, which must be UTF-8 like piped text."""
    name = (param.name or "").upper() if param.param_type_name == "argument" else param.opts[0]
    return None if value is None else require_utf8(value, name)


def _no_color(value: bool) -> None:
    if value:
        os.environ["NO_COLOR"] = "1"  # rich, prompt_toolkit and the help screens all read it


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
    set_kernel_choice(_kernel_choice(kernel))


def _kernel_choice(option: str) -> KernelChoice:
    """--kernel's value as a choice ("cuda" is another name for "compiled")."""
    return "compiled" if option == "cuda" else option


@app.command(cls=_Command)
def generate(
    ctx: typer.Context,
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="Prompt text. Piped stdin is read too and comes first.",
            show_default=False,
            callback=_utf8_argument,
        ),
    ] = None,
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
    start = _open(ctx, console, state, force)
    run = _Continuation.begin(
        ctx,
        start,
        verbose or interactive(console),
        seed=seed,
        stop=stop,
        max_tokens=max_tokens,
        save_path=save_state,
    )
    run.announce(console)
    run.turn(console, text)


@app.command("save-state", cls=_Command)
def save_state_command(
    ctx: typer.Context,
    text: Annotated[
        str | None,
        typer.Argument(
            help="Text to read. Piped stdin is read too and comes first.",
            show_default=False,
            callback=_utf8_argument,
        ),
    ] = None,
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            metavar="FILE",
            help="State file to write.",
            show_default=False,
            callback=_writable_file,
        ),
    ] = ...,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "-f", "--file", metavar="FILE", help="Read the text from this file.", show_default=False
        ),
    ] = None,
    state: StateOption = None,
    force: ForceOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Read text into the model and save the resulting state (prefix caching).

    Process a system prompt or a whole document once, then continue from it many times:
      rwkv generate --state FILE
      rwkv load-state FILE
    """
    from rwkv_cli.generate import prefill
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
    start = _open(ctx, console, state, force)
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


@app.command("load-state", cls=_Command)
def load_state_command(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="State file to resume.", show_default=False)],
    info: Annotated[bool, typer.Option("--info", help="Describe the file and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --info: print JSON.")] = False,
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
    from rwkv_cli.repl import TerminalLines
    from rwkv_cli.statefile import read_state_file

    if as_json and not info:
        raise typer.BadParameter(
            "it goes with --info (rwkv load-state FILE --info --json)",
            ctx=ctx,
            param_hint="'--json'",
        )
    if info:
        details = read_state_file(file).info()
        if as_json:
            typer.echo(json.dumps(details, indent=2, ensure_ascii=False))
        else:
            print_state_info(details)
        return
    require_visible_output(
        "the continuations",
        "give the text on stdin (< /dev/null continues without any), or use | tee",
    )
    console = stderr_console()
    stdin = piped_stdin()
    start = _open(ctx, console, file, force)
    run = _Continuation.begin(
        ctx,
        start,
        verbose or interactive(console),
        seed=seed,
        stop=stop,
        max_tokens=max_tokens,
        save_path=save_state,
    )
    run.announce(console)
    if stdin is not None:
        run.turn(console, decode_utf8(stdin.read(), "stdin"))
        return
    if run.text_tail:
        print_dim(console, f"…{run.text_tail[-300:]}")
    console.print(
        '[dim]Type text to append (empty: just continue; """ starts and ends several lines); '
        "Ctrl-D ends.[/dim]"
    )
    lines = TerminalLines(input_history_file())
    while (line := lines.read()) is not None:
        with lines.busy():
            run.turn(console, unescape(line))


@app.command(cls=_Command)
def chat(
    ctx: typer.Context,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state",
            metavar="FILE",
            help="Resume a saved chat, or chat after a saved state (e.g. a document).",
            show_default=False,
            rich_help_panel=STATE,
        ),
    ] = None,
    autosave: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Save the chat to this state file after every turn.",
            show_default=False,
            callback=_writable_file,
            rich_help_panel=STATE,
        ),
    ] = None,
    force: ForceOption = False,
    system: Annotated[
        str | None,
        typer.Option(
            metavar="TEXT",
            help="A system prompt before the conversation.",
            show_default=False,
            callback=_utf8_argument,
        ),
    ] = None,
    think: Annotated[
        bool, typer.Option("--think", help="Let G1 models think before answering.")
    ] = False,
    hide_thinking: Annotated[
        bool, typer.Option("--hide-thinking", help="Do not show G1 thinking, only answers.")
    ] = False,
    template: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="Turn format: world, g1 or pile (default: from the model).",
            show_default=False,
        ),
    ] = None,
    max_tokens: ReplyTokensOption = MAX_REPLY_TOKENS,
    temperature: TemperatureOption = CHAT_SAMPLING.temperature,
    top_p: TopPOption = CHAT_SAMPLING.top_p,
    top_k: TopKOption = CHAT_SAMPLING.top_k,
    presence_penalty: PresenceOption = CHAT_SAMPLING.presence_penalty,
    frequency_penalty: FrequencyOption = CHAT_SAMPLING.frequency_penalty,
    penalty_decay: DecayOption = CHAT_SAMPLING.penalty_decay,
    seed: SeedOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Chat with a model in the terminal (or one message per stdin line in scripts).

    Replies stop at a blank line; /help lists the commands (/retry, /undo, /save, /set ...).
    """
    from rwkv_cli.chat import Chat, template_for
    from rwkv_cli.device import dtype_name
    from rwkv_cli.repl import (
        ChatRepl,
        ScriptLines,
        TerminalLines,
        chat_from_saved,
        show_transcript_tail,
    )

    if template is not None and template not in TEMPLATES:
        raise typer.BadParameter(
            f"choose one of {', '.join(TEMPLATES)}", ctx=ctx, param_hint="'--template'"
        )
    require_visible_output(
        "the replies",
        "script a chat with the messages on stdin (rwkv chat < messages.txt > replies.txt); "
        "keep one with --autosave or | tee",
    )
    if autosave is not None:
        _refuse_to_overwrite_a_state(autosave, state)
    console = stderr_console()
    start = _open(ctx, console, state, force)
    saved = start.state_file
    generator, seed_used = _generator(seed, saved)
    loaded = start.loaded
    base = Chat(
        loaded,
        TEMPLATES[template] if template else template_for(loaded),
        _sampling_params(ctx, None),
        generator,
        max_tokens,
        think,
        start=start.session,
    )
    conversation = base
    if saved is not None:
        conversation = chat_from_saved(base, saved, start.session)
        conversation.params = _sampling_params(ctx, saved.sampling)
        if _given(ctx, "max_tokens"):  # the command line wins over the saved chat's settings
            conversation.max_reply_tokens = max_tokens
        if _given(ctx, "think"):
            conversation.think = think
        if template is not None:
            conversation.template = TEMPLATES[template]
    if system is not None:
        conversation.set_system(system)
    if conversation.thinking_ignored:
        warnings.warn(conversation.thinking_ignored, stacklevel=1)
    on_terminal = sys.stdin.isatty()
    if on_terminal or verbose:
        weights = dtype_name(loaded.model.weight_dtype)
        model_line = f"{loaded.model.describe()} · {loaded.model.device} · {weights}"
        print_dim(
            console,
            f"rwkv chat · {model_line} · {loaded.spec} · {conversation.template.name} "
            f"template · seed {seed_used} · /help",
        )
        show_transcript_tail(console, conversation)
    lines = TerminalLines(input_history_file()) if on_terminal else ScriptLines(sys.stdin.buffer)
    stdout = Console(file=sys.stdout)
    repl = ChatRepl(
        conversation,
        console,
        lines,
        StdoutWriter(sys.stdout),
        seed=seed_used,
        autosave=autosave,
        force=force,
        hide_thinking=hide_thinking,
        dim_thinking=interactive(stdout) and stdout.color_system is not None,
        show_stats=on_terminal or verbose,
    )
    with contextlib.suppress(OutputClosedError):  # `| head`: the reader has all it wanted
        repl.run()
    if repl.failed and not on_terminal:  # a script learns that a command went wrong
        raise typer.Exit(EXIT_ERROR)


def _refuse_to_overwrite_a_state(autosave: Path, resumed: Path | None) -> None:
    """--autosave onto another state file (a saved chat, a document read once) would replace it
    after the first turn; only the file resumed may be replaced."""
    from rwkv_cli.statefile import state_file_kind

    kind = state_file_kind(autosave)
    if kind is None:
        return
    if resumed is not None and resumed.exists() and os.path.samefile(autosave, resumed):
        return
    if kind == "chat":
        held, hint = "a saved chat", f"resume it with --state {autosave} --autosave {autosave}"
    else:
        held, hint = "a saved state (not a chat)", f"chat after it with --state {autosave}"
    raise InvalidInputError(
        f"{autosave} holds {held}, which --autosave would replace",
        hint=f"{hint}, or autosave to another file",
    )


@app.command(cls=_Command)
def bench(
    model: BenchModelOption = None,
    prompt_tokens: Annotated[
        int,
        typer.Option("--prompt-tokens", min=1, metavar="N", help="Prompt length to prefill."),
    ] = 512,
    decode_tokens: Annotated[
        int,
        typer.Option("--decode-tokens", min=1, metavar="N", help="Tokens to decode one by one."),
    ] = 128,
    device: DeviceOption = "cpu",
    dtypes: Annotated[
        list[str] | None,
        typer.Option(
            "--dtype",
            callback=_dtype_names,
            metavar=WEIGHT_TYPES,
            help="Weight type to measure (default: fp16 on a GPU, fp32 on the CPU); repeat the "
            "option to measure several.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (a list, one entry per dtype).")
    ] = False,
) -> None:
    """Measure load time, prefill and decode speed, and peak memory of a model on this machine."""
    from rwkv_cli.bench import benchmark
    from rwkv_cli.device import resolve_device, resolve_dtype
    from rwkv_cli.loading.open import default_model

    console = stderr_console()
    spec = model or default_model(console)
    for name in dtypes or []:
        resolve_dtype(name, resolve_device(device))  # a typo fails now, not after a benchmark
    results = []
    for dtype in dtypes or [None]:
        with activity(console, f"Benchmarking {dtype or 'the default dtype'}"):
            results.append(benchmark(spec, prompt_tokens, decode_tokens, device, dtype))
    if as_json:
        typer.echo(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        print_bench(results)


@app.command(cls=_Command)
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    no_build: Annotated[
        bool, typer.Option("--no-build", help="Do not build and test the compiled kernels.")
    ] = False,
) -> None:
    """Check this machine: torch, the GPUs, the kernel toolchain, the compiled kernels, the caches.

    Builds the compiled kernels and compares them with the torch path (not with --no-build).
    Exits 1 with a hint if something is broken.
    """
    from rwkv_cli.doctor import diagnose

    with activity(stderr_console(), "Checking (a first CUDA kernel build takes a minute)"):
        report = diagnose(build_kernels=not no_build)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format())
    problem = report.problem()
    if problem is not None:
        raise problem


@app.command(cls=_Command)
def download(
    spec: Annotated[
        str,
        typer.Argument(
            help="A Hub repo (owner/name or owner/name:file) or an alias from `rwkv models`.",
            show_default=False,
        ),
    ],
    revision: RevisionOption = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Download again even if cached (replaces a damaged copy)."),
    ] = False,
) -> None:
    """Download a model into the Hugging Face cache and print its local path."""
    from rwkv_cli.loading.hub import resolve_model

    typer.echo(resolve_model(spec, revision, console=stderr_console(), again=force).path)


@app.command(cls=_Command)
def models() -> None:
    """List the model aliases and the checkpoints already downloaded."""
    from rwkv_cli.loading.hub import cached_models
    from rwkv_cli.loading.spec import list_aliases

    print_models(list_aliases(), cached_models())


def _read_text_file(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InvalidInputError(f"cannot read {path}: {error.strerror or error}") from error
    return decode_utf8(data, str(path))


def _open(ctx: typer.Context, console, state: Path | None, force: bool) -> Start:
    """The model the command's options ask for, and the state to continue from."""
    from rwkv_cli.loading.open import open_start

    return open_start(_model_request(ctx), state, force, console)


def _model_request(ctx: typer.Context) -> ModelRequest:
    """The model options of a command (and the root's --kernel) as one request."""
    options = ctx.params
    return ModelRequest(
        spec=options["model"],
        revision=options["revision"],
        device=options["device"],
        dtype=options["dtype"],
        tokenizer=options["tokenizer"],
        kernel=_kernel_choice(ctx.find_root().params["kernel"]),
    )


def _sampling_params(ctx: typer.Context, saved: SamplingParams | None) -> SamplingParams:
    """Options given on the command line win; the rest come from the state file, if any."""
    values = {}
    for name in SAMPLING_OPTIONS:
        use_saved = saved is not None and not _given(ctx, name)
        values[name] = getattr(saved, name) if use_saved else ctx.params[name]
    with _as_usage_error(ctx):
        return SamplingParams(**values).validated()


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given (on the command line or by its variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _generator(
    seed: int | None, state_file: StateFile | None
) -> tuple[torch.Generator, int | None]:
    """A sampler seeded by --seed, else continuing a saved one, else freshly seeded."""
    import torch

    from rwkv_cli.sampling import make_generator

    if seed is None and state_file is not None:
        generator = torch.Generator()
        if state_file.restore_generator(generator):
            return generator, state_file.seed
    return make_generator(seed)


@dataclass
class _Continuation:
    """One command's generation turns: the settings, the sampler, and where the text stands."""

    loaded: LoadedModel
    session: Session
    params: SamplingParams
    generator: torch.Generator
    seed: int | None
    max_tokens: int
    stop: list[str]
    save_path: Path | None
    show_info: bool
    text_tail: str

    @classmethod
    def begin(cls, ctx: typer.Context, start: Start, show_info: bool, **options) -> _Continuation:
        saved = start.state_file
        generator, seed = _generator(options.pop("seed"), saved)
        return cls(
            loaded=start.loaded,
            session=start.session,
            params=_sampling_params(ctx, saved.sampling if saved else None),
            generator=generator,
            seed=seed,
            stop=[unescape(item) for item in options.pop("stop") or ()],
            show_info=show_info,
            text_tail=saved.text_tail if saved else "",
            **options,
        )

    def announce(self, console) -> None:
        """The header line: model, where it came from, where it runs, and the seed (to
        reproduce the run)."""
        from rwkv_cli.device import dtype_name

        if self.show_info:
            model = self.loaded.model
            print_dim(
                console,
                f"{model.describe()} · {self.loaded.spec} · {model.device} "
                f"{dtype_name(model.weight_dtype)} · seed {self.seed}",
            )

    def _not_saved(self, reason: str) -> None:
        if self.save_path is not None:
            warnings.warn(
                f"{reason}: the state after this text was not saved to {self.save_path}",
                stacklevel=3,
            )

    def turn(self, console, text: str) -> None:
        """Generate after ``text``, streaming to stdout; then save the state if asked."""
        from rwkv_cli.generate import stream_generate
        from rwkv_cli.statefile import TEXT_TAIL_CHARS, save_state_file

        loaded = self.loaded
        writer = StdoutWriter(sys.stdout)
        completion = []
        try:
            with prefill_progress(console) as on_prefill:  # gone before the text streams
                for last in stream_generate(
                    loaded.model,
                    loaded.tokenizer,
                    text,
                    params=self.params,
                    generator=self.generator,
                    max_tokens=self.max_tokens,
                    stop=self.stop,
                    session=self.session,
                    on_prefill=on_prefill,
                ):
                    writer.write(last.text)
                    completion.append(last.text)
        except OutputClosedError:
            self._not_saved("the output was closed before the end")
            raise typer.Exit() from None
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, kill
            self._not_saved("interrupted")
            raise
        finally:
            if not writer.ends_with_newline:
                if sys.stdout.isatty():
                    writer.write("\n")
                elif self.show_info and interactive(console) and has_live_reader(sys.stdout):
                    console.print()  # `| tee`: the footer starts a line of its own
        if self.show_info:
            print_stats(console, last)
        self.session = last.session
        self.text_tail = (self.text_tail + text + "".join(completion))[-TEXT_TAIL_CHARS:]
        if self.save_path is not None:
            save_state_file(
                self.save_path,
                loaded,
                self.session,
                sampling=self.params,
                seed=self.seed,
                generator=self.generator,
                text_tail=self.text_tail,
            )


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
