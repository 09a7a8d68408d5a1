"""``rwkv chat``: a conversation in the terminal, or one message per stdin line in scripts."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from rwkv_cli.cli.options import (
    STATE,
    DecayOption,
    DeviceOption,
    DtypeOption,
    ForceOption,
    FrequencyOption,
    ModelOption,
    PresenceOption,
    ReplyTokensOption,
    RevisionOption,
    SeedOption,
    TemperatureOption,
    TokenizerOption,
    TopKOption,
    TopPOption,
    VerboseOption,
    given,
    open_requested,
    sampling_params,
    utf8_argument,
    writable_file,
)
from rwkv_cli.errors import EXIT_ERROR
from rwkv_cli.paths import input_history_file
from rwkv_cli.settings import CHAT_SAMPLING, MAX_REPLY_TOKENS
from rwkv_cli.templates import TEMPLATES
from rwkv_cli.textio import OutputClosedError, StdoutWriter, interactive, require_visible_output
from rwkv_cli.ui import model_line, print_dim, stderr_console

if TYPE_CHECKING:
    from rwkv_cli.chat import Chat
    from rwkv_cli.loading.open import Start


def _known_template(value: str | None) -> str | None:
    """Option callback: a template name must name one."""
    if value is not None and value not in TEMPLATES:
        raise typer.BadParameter(f"choose one of {', '.join(TEMPLATES)}")
    return value


ChatStateOption = Annotated[
    Path | None,
    typer.Option(
        "--state",
        metavar="FILE",
        help="Resume a saved chat, or chat after a saved state (e.g. a document).",
        show_default=False,
        rich_help_panel=STATE,
    ),
]
AutosaveOption = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Save the chat to this state file after every turn.",
        show_default=False,
        callback=writable_file,
        rich_help_panel=STATE,
    ),
]
SystemOption = Annotated[
    str | None,
    typer.Option(
        metavar="TEXT",
        help="A system prompt before the conversation.",
        show_default=False,
        callback=utf8_argument,
    ),
]
ThinkOption = Annotated[bool, typer.Option("--think", help="Let G1 models think before answering.")]
HideThinkingOption = Annotated[
    bool, typer.Option("--hide-thinking", help="Do not show G1 thinking, only answers.")
]
TemplateOption = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Turn format: world, g1 or pile (default: from the model).",
        show_default=False,
        callback=_known_template,
    ),
]


def chat(
    ctx: typer.Context,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    state: ChatStateOption = None,
    autosave: AutosaveOption = None,
    force: ForceOption = False,
    system: SystemOption = None,
    think: ThinkOption = False,
    hide_thinking: HideThinkingOption = False,
    template: TemplateOption = None,
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
    from rwkv_cli.chatfile import check_autosave_target
    from rwkv_cli.lines import ScriptLines, TerminalLines
    from rwkv_cli.repl import ChatRepl

    require_visible_output(
        "the replies",
        "script a chat with the messages on stdin (rwkv chat < messages.txt > replies.txt); "
        "keep one with --autosave or | tee",
    )
    if autosave is not None:
        check_autosave_target(autosave, state)
    console = stderr_console()
    start = open_requested(ctx, console, state, force)
    conversation, seed_used = _conversation(ctx, start)
    on_terminal = sys.stdin.isatty()
    if on_terminal or verbose:
        _show_header(console, start, conversation, seed_used)
    lines = TerminalLines(input_history_file()) if on_terminal else ScriptLines(sys.stdin.buffer)
    repl = ChatRepl(
        conversation,
        console,
        lines,
        StdoutWriter(sys.stdout),
        seed=seed_used,
        autosave=autosave,
        force=force,
        hide_thinking=hide_thinking,
        dim_thinking=_stdout_shows_dim_text(),
        show_stats=on_terminal or verbose,
    )
    with contextlib.suppress(OutputClosedError):  # `| head`: the reader has all it wanted
        repl.run()
    if repl.failed and not on_terminal:  # a script learns that a command went wrong
        raise typer.Exit(EXIT_ERROR)


def _show_header(console: Console, start: Start, conversation: Chat, seed: int | None) -> None:
    """What runs (model, template, seed: to reproduce the chat) and where a resumed chat stands."""
    from rwkv_cli.repl import show_transcript_tail

    print_dim(
        console,
        f"rwkv chat · {model_line(start.loaded.model)} · {start.loaded.spec} · "
        f"{conversation.template.name} template · seed {seed} · /help",
    )
    show_transcript_tail(console, conversation)


def _stdout_shows_dim_text() -> bool:
    """Whether stdout is a terminal with colours, where G1 thinking is shown dimmed."""
    stdout = Console(file=sys.stdout)
    return interactive(stdout) and stdout.color_system is not None


def _conversation(ctx: typer.Context, start: Start) -> tuple[Chat, int | None]:
    """The chat to go on with and its seed: a saved chat resumed (the options given on the
    command line win over its settings) or a new one, with the system prompt if given."""
    from rwkv_cli.chat import Chat, template_for
    from rwkv_cli.chatfile import resume_chat
    from rwkv_cli.continuation import sampler_for

    options, saved = ctx.params, start.state_file
    generator, seed = sampler_for(options["seed"], saved)
    template = options["template"]
    base = Chat(
        start.loaded,
        TEMPLATES[template] if template else template_for(start.loaded),
        sampling_params(ctx, saved.sampling if saved else None, CHAT_SAMPLING),
        generator,
        options["max_tokens"],
        options["think"],
        start=start.session,
    )
    set_here = {"max_tokens": "max_reply_tokens", "think": "think", "template": "template"}
    chat = resume_chat(
        base, saved, start.session, [field for name, field in set_here.items() if given(ctx, name)]
    )
    if options["system"] is not None:
        chat.set_system(options["system"])
    if chat.thinking_ignored:
        warnings.warn(chat.thinking_ignored, stacklevel=1)
    return chat, seed
