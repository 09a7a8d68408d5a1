"""``rwkv batch``: the prompts of a JSON-lines file, many at once, a JSON line out for each
(the library side is rwkv_cli/batching/jobs.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from rwkv_cli.cli.chat import TemplateOption, ThinkOption
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
    SeedOption,
    StateOption,
    StopOption,
    TemperatureOption,
    TokenizerOption,
    TopKOption,
    TopPOption,
    open_requested,
    sampling_params,
)
from rwkv_cli.errors import RwkvCliError
from rwkv_cli.fileio import check_writable
from rwkv_cli.settings import DEFAULT_MAX_BATCH, SamplingParams
from rwkv_cli.templates import TEMPLATES
from rwkv_cli.textio import OutputClosedError, unescape
from rwkv_cli.ui import lines_progress, stderr_console

if TYPE_CHECKING:
    from rwkv_cli.batching.jobs import BatchSummary, JobDefaults, RecordFile
    from rwkv_cli.loading.open import Start


def _writable_output(ctx: typer.Context, value: Path) -> Path:
    """Option callback: stop before any work if the output file cannot be written."""
    if not ctx.resilient_parsing and str(value) != "-":
        check_writable(value)
    return value


InputArgument = Annotated[
    Path,
    typer.Argument(
        metavar="INPUT", help="JSON-lines file of prompts (- reads stdin).", show_default=False
    ),
]
RecordsOption = Annotated[
    Path,
    typer.Option(
        "-o",
        "--output",
        metavar="FILE",
        help="JSON-lines file the results are appended to (- writes stdout); a rerun with the "
        "same file skips the ids finished there.",
        show_default=False,
        callback=_writable_output,
    ),
]
MaxBatchOption = Annotated[
    int,
    typer.Option(min=1, metavar="N", help="Most prompts generated together."),
]


def batch(
    ctx: typer.Context,
    input_file: InputArgument,
    output: RecordsOption = ...,
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    max_batch: MaxBatchOption = DEFAULT_MAX_BATCH,
    state: StateOption = None,
    force: ForceOption = False,
    template: TemplateOption = None,
    think: ThinkOption = False,
    max_tokens: MaxTokensOption = 256,
    temperature: TemperatureOption = SamplingParams.temperature,
    top_p: TopPOption = SamplingParams.top_p,
    top_k: TopKOption = SamplingParams.top_k,
    presence_penalty: PresenceOption = SamplingParams.presence_penalty,
    frequency_penalty: FrequencyOption = SamplingParams.frequency_penalty,
    penalty_decay: DecayOption = SamplingParams.penalty_decay,
    seed: SeedOption = None,
    stop: StopOption = None,
) -> None:
    """Generate for every line of a JSON-lines file, many lines at once.

    Input lines: {"id": ..., "prompt": "..."} or {"id": ..., "messages": [...]}
    (messages written out with the chat template, as rwkv chat writes them).
    A line's max_tokens, sampling fields, seed and stop override the options.
    With --seed S, a line without a seed gets one made from S and its id.

    Output lines, each written as it finishes (so in the order lines finish):
    {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens"},
    or {"id", "line", "error": {"message"}} for a line that cannot run (exit 1).
    A rerun with the same output skips the ids finished there.

    Examples:
      rwkv batch prompts.jsonl -o results.jsonl -m model.pth --temperature 0
      cat prompts.jsonl | rwkv batch - -o - > results.jsonl
    """
    from rwkv_cli.batching.jobs import count_lines, input_lines, output_records

    console = stderr_console()
    with input_lines(input_file) as lines:
        total = count_lines(input_file)
        start = open_requested(ctx, console, state, force)
        with output_records(output) as (records, done):
            progress = lines_progress(console, total, min(len(done), total or 0))
            summary = _run(start, _defaults(ctx, start), lines, records, done, progress, max_batch)
    if summary.failed:
        raise RwkvCliError(
            f"{summary.failed} of {summary.failed + summary.finished} lines failed",
            hint=f"see the error records in {'stdout' if str(output) == '-' else output}",
        )


def _run(
    start: Start,
    defaults: JobDefaults,
    lines: Iterator[bytes],
    records: RecordFile,
    done: set[str],
    progress: AbstractContextManager[Callable[[int], None]],
    max_batch: int,
) -> BatchSummary:
    """Every line not ``done`` yet, its record written to ``records`` as it finishes."""
    from rwkv_cli.batching.jobs import read_jobs, run_jobs, write_records

    jobs = read_jobs(lines, start.loaded, defaults, skip=done)
    with progress as advance:
        try:
            return write_records(
                run_jobs(start.loaded, jobs, max_batch),
                records,
                lambda record: advance(record.get("completion_tokens", 0)),
            )
        except OutputClosedError:  # `-o - | head`: the reader has all it wanted
            raise typer.Exit() from None


def _defaults(ctx: typer.Context, start: Start) -> JobDefaults:
    """The run's options, over which each line sets its own: sampling as ``generate``'s
    (command line > the state file's > defaults), the shared start and the chat template."""
    from rwkv_cli.batching.jobs import JobDefaults
    from rwkv_cli.chat import template_for

    options, saved = ctx.params, start.state_file
    template = options["template"]
    return JobDefaults(
        params=sampling_params(ctx, saved.sampling if saved else None, SamplingParams()),
        max_tokens=options["max_tokens"],
        template=TEMPLATES[template] if template else template_for(start.loaded),
        stop=tuple(unescape(item) for item in options["stop"] or ()),
        seed=options["seed"],
        session=start.session,
        think=options["think"],
    )
