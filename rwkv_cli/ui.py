"""Everything rwkv-cli shows besides generated text: it all goes to stderr.

rich's Console already honours ``NO_COLOR``, ``FORCE_COLOR`` and ``TERM=dumb`` and writes no ANSI
codes when stderr is not a terminal; spinners are shown only on a terminal.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape

from rwkv_cli.errors import RwkvCliError
from rwkv_cli.generate import GenerationChunk


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def activity(console: Console, message: str) -> Iterator[None]:
    """A spinner with ``message`` while the block runs, on a terminal only."""
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        yield


def print_stats(console: Console, last: GenerationChunk) -> None:
    """The one-line footer after a generation."""
    console.print(
        f"[dim]prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s · "
        f"generated: {last.generated_tokens} tokens, {last.generation_tps:.1f} tok/s · "
        f"stop: {last.finish_reason}[/dim]"
    )


def print_error(console: Console, error: RwkvCliError) -> None:
    console.print(f"[bold red]Error:[/bold red] {escape(error.message)}")
    if error.hint:
        console.print(f"[yellow]Hint:[/yellow] {escape(error.hint)}")
