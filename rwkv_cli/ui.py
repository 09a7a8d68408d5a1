"""Everything rwkv-cli shows besides generated text: it all goes to stderr.

rich's Console already honours ``NO_COLOR``, ``FORCE_COLOR`` and ``TERM=dumb`` and writes no ANSI
codes when stderr is not a terminal; spinners are shown only on a terminal. ``--no-color`` sets
``NO_COLOR``, so consoles are made when needed rather than once at start.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from rwkv_cli.errors import RwkvCliError
from rwkv_cli.fileio import format_size
from rwkv_cli.textio import interactive

if TYPE_CHECKING:  # the error boundary shows errors with this module: it must not need torch
    from rwkv_cli.generation import GenerationChunk
    from rwkv_cli.models import Model
    from rwkv_cli.perplexity import Perplexity


def stderr_console() -> Console:
    """The console for everything but generated text (``:100:`` in a file name stays as is)."""
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def print_dim(console: Console, text: str) -> None:
    """One line of secondary information, shown exactly as written (file names, model text)."""
    console.print(_shown(text), style="dim")


@contextlib.contextmanager
def activity(console: Console | None, message: str) -> Iterator[None]:
    """A spinner with ``message`` (plain text, not markup) while the block runs, on a terminal
    only."""
    if console is not None and interactive(console):
        with console.status(Text(_displayable(message))):  # no markup, no :emoji: codes
            yield
    else:
        yield


PROGRESS_MIN_TOKENS = 1024  # below this, reading text is quick enough to need no progress bar


@contextlib.contextmanager
def prefill_progress(console: Console) -> Iterator[Callable[[int, int], None]]:
    """Yields ``update(done, total)`` for reading a prompt: from the first update, a progress bar
    on a terminal for prompts of ``PROGRESS_MIN_TOKENS`` or more; it goes once all is read (before
    any reply streams) or when the block ends."""
    shown: list[Progress] = []

    def update(done: int, total: int) -> None:
        if not shown:
            if done >= total or total < PROGRESS_MIN_TOKENS or not interactive(console):
                return
            columns = (
                TextColumn("Reading"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tokens"),
                TimeRemainingColumn(),
            )
            shown.append(Progress(*columns, console=console, transient=True))
            shown[0].add_task("prefill", total=total)
            shown[0].start()
        progress = shown[0]
        progress.update(progress.task_ids[0], completed=done)
        if done >= total:
            progress.stop()

    try:
        yield update
    finally:
        if shown:
            shown[0].stop()


@contextlib.contextmanager
def lines_progress(
    console: Console, total: int | None, done: int = 0
) -> Iterator[Callable[[int], None]]:
    """Yields ``update(tokens)``, called once per finished line with the tokens it generated:
    a bar of lines done out of ``total`` (None: unknown) and the tokens per second generated
    since the start, on a terminal only."""
    if not interactive(console):
        yield lambda tokens: None
        return
    columns = (
        TextColumn("Lines"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("lines", total=total, completed=done, rate="")
        started, generated = time.perf_counter(), [0]

        def update(tokens: int) -> None:
            generated[0] += tokens
            seconds = time.perf_counter() - started
            rate = f"{generated[0] / seconds:.1f} tok/s" if seconds > 0 else ""
            progress.update(task, advance=1, rate=rate)

        yield update


def print_state_info(details: dict) -> None:
    """``load-state --info``: the file's description, on stdout (it is what was asked for)."""
    for key, value in details.items():
        if key == "text_tail":
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{name}={item}" for name, item in value.items())
        print(f"{key + ':':<17}{'-' if value is None else value}")
    tail = details.get("text_tail") or ""
    if tail:
        print(f"{'text tail:':<17}{tail[-200:]!r}")


def print_models(aliases: list, cached: list) -> None:
    """``rwkv models``: aliases and cached checkpoints, as plain aligned text on stdout."""
    print("Aliases (newest matching file of the repo; use with -m):")
    width = max(len(alias.name) for alias in aliases)
    for alias in aliases:
        print(f"  {alias.name:<{width}}  {alias.repo_id}")
    print("\nDownloaded:" if cached else "\nDownloaded: none yet (rwkv download MODEL)")
    versions = Counter((model.repo_id, model.filename) for model in cached)
    for model in cached:
        name = f"{model.repo_id}:{model.filename}"
        if versions[model.repo_id, model.filename] > 1:  # kept for several commits
            name += f" --revision {model.revision[:12]}"
        print(f"  {name}  {format_size(model.size)}  {model.path}")


def print_bench(results: list) -> None:
    """``rwkv bench``: one aligned table on stdout, a row per weight format."""
    gib = 1024**3
    first = results[0]
    print(
        f"model: {first.model} ({first.architecture}, {first.device}, "
        f"{first.threads} thread{'s' if first.threads != 1 else ''})"
    )
    print(f"prompt: {first.prompt_tokens} tokens, then {first.decode_tokens} decoded one by one")
    on_gpu = any(result.peak_gpu_bytes for result in results)
    header = ("dtype", "load (cached)", "prefill tok/s", "decode tok/s", "peak RSS", "weights")
    header += ("peak GPU",) if on_gpu else ()
    rows = []
    for result in results:
        row = (
            result.dtype,
            f"{result.load_seconds:.2f} s",
            f"{result.prefill_tokens_per_second:.1f}",
            f"{result.decode_tokens_per_second:.1f}",
            f"{result.peak_rss_bytes / gib:.2f} GiB "
            f"({result.peak_rss_bytes / result.weight_bytes:.2f}x)",
            f"{result.weight_bytes / gib:.2f} GiB",
        )
        rows.append(row + ((f"{result.peak_gpu_bytes / gib:.2f} GiB",) if on_gpu else ()))
    _print_table(header, rows)
    batched = [(result, speed) for result in results for speed in result.batches]
    if batched:
        print(f"\nbatched decode: {first.decode_tokens} tokens per sequence, sequences together")
        header = ("dtype", "batch", "aggregate tok/s", "ms per step", "vs one sequence")
        rows = [
            (
                result.dtype,
                str(speed.batch_size),
                f"{speed.decode_tokens_per_second:.1f}",
                f"{speed.step_milliseconds:.1f}",
                f"{speed.decode_tokens_per_second / result.decode_tokens_per_second:.2f}x",
            )
            for result, speed in batched
        ]
        _print_table(header, rows)


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header))]
    for row in (header, *rows):
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def format_perplexity(model: Model, result: Perplexity) -> str:
    """``rwkv perplexity``'s report."""
    return (
        f"model: {model_line(model)}\n"
        f"perplexity: {result.perplexity:.4f}\n"
        f"bits per byte: {result.bits_per_byte:.4f}\n"
        f"tokens: {result.tokens} ({result.text_bytes} bytes), scored in {result.seconds:.1f} s"
    )


def model_line(model: Model) -> str:
    """The model as headers and /info show it: architecture, device and weight type."""
    from rwkv_cli.device import dtype_name

    return f"{model.describe()} · {model.device} {dtype_name(model.weight_dtype)}"


def print_stats(console: Console, last: GenerationChunk) -> None:
    """The one-line footer after a generation (a chat reply's prompt, read before the reply
    started, has no part in it)."""
    read = ""
    if last.prompt_tokens:
        read = f"prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tok/s · "
    console.print(
        f"[dim]{read}generated: {last.generated_tokens} tokens, {last.generation_tps:.1f} tok/s · "
        f"stop: {last.finish_reason}[/dim]"
    )


def show_warnings_on_stderr() -> None:
    """Print Python warnings raised by the library as one ``Warning:`` line each (on a console
    made when the warning comes, so it follows ``--no-color``)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stderr_console().print(f"[yellow]Warning:[/yellow] {_shown(str(message))}")

    warnings.showwarning = show


def print_error(console: Console, error: RwkvCliError) -> None:
    console.print(f"[bold red]Error:[/bold red] {_shown(error.message)}")
    if error.hint:
        console.print(f"[yellow]Hint:[/yellow] {_shown(error.hint)}")


def _shown(text: str) -> str:
    """``text`` as markup that shows it as written (see ``_displayable``)."""
    return escape(_displayable(text))


def _displayable(text: str) -> str:
    """A byte of a non-UTF-8 file name (which Python carries as a lone surrogate) as U+FFFD
    rather than as an escape."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
