"""What the commands share: their options (declared once), the checks on option values, help
in words, and how options become library requests (a model request, sampling parameters)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from rwkv_cli.errors import InvalidInputError, RwkvCliError
from rwkv_cli.fileio import check_writable
from rwkv_cli.settings import (
    DEFAULT_MODEL,
    DTYPE_NAMES,
    MAX_SEED,
    TOKENIZER_CHOICES,
    DtypeName,
    KernelChoice,
    ModelRequest,
    SamplingParams,
    choose_sampling,
)
from rwkv_cli.textio import require_utf8

if TYPE_CHECKING:
    from rwkv_cli.loading.open import Start


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


class Command(_HelpInWords, TyperCommand):
    """A command of ``rwkv``, with its help in words."""


class Group(_HelpInWords, TyperGroup):
    """``rwkv`` itself, with its help in words."""


SAMPLING = "Sampling"
STATE = "State"
WEIGHT_TYPES = "|".join(DTYPE_NAMES)  # --dtype's choices, as its help shows them


def writable_file(ctx: typer.Context, value: Path | None) -> Path | None:
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
DefaultModelOption = Annotated[
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
        callback=writable_file,
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
        help="Weight type (default: fp16 on a GPU, fp32 on the CPU). On the CPU bf16, int8 and "
        "int4 take a half, a quarter and about a seventh of the memory and decode faster; int8 "
        "costs a little accuracy, int4 more (check with rwkv perplexity).",
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


def utf8_argument(param: typer.CallbackParam, value: str | None) -> str | None:
    """Text from the command line, which must be UTF-8 like piped text."""
    name = (param.name or "").upper() if param.param_type_name == "argument" else param.opts[0]
    return None if value is None else require_utf8(value, name)


def open_requested(ctx: typer.Context, console, state: Path | None, force: bool) -> Start:
    """The model the command's options ask for, and the state to continue from."""
    from rwkv_cli.loading.open import open_start

    return open_start(model_request(ctx), state, force, console)


def model_request(ctx: typer.Context) -> ModelRequest:
    """The model options of a command (and the root's --kernel) as one request."""
    options = ctx.params
    return ModelRequest(
        spec=options["model"],
        revision=options["revision"],
        device=options["device"],
        dtype=options["dtype"],
        tokenizer=options["tokenizer"],
        kernel=kernel_choice(ctx.find_root().params["kernel"]),
    )


def kernel_choice(option: str) -> KernelChoice:
    """--kernel's value as a choice ("cuda" is another name for "compiled")."""
    return "compiled" if option == "cuda" else option


def sampling_params(
    ctx: typer.Context, saved: SamplingParams | None, default: SamplingParams
) -> SamplingParams:
    """The sampling options given on the command line win over ``saved`` (a state file's),
    which wins over the command's ``default``; a value no sampler takes is a usage error."""
    given_here = {name: ctx.params[name] for name in SAMPLING_OPTIONS if given(ctx, name)}
    with _as_usage_error(ctx):
        return choose_sampling(given_here, saved, default)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the option ``name`` was given (on the command line or by its variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
