"""``rwkv batch``: the prompts of a JSON-lines file, many at once, a JSON line out for each
(the library side is rwkv_cli/batching/jobs.py, and ray_jobs.py for --ray)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
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
    given,
    model_request,
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
    from rwkv_cli.batching.jobs import BatchSummary, Job, JobDefaults, RecordFile
    from rwkv_cli.batching.ray_jobs import RayCluster
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
RAY = "Ray cluster"
RayOption = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Run on a Ray cluster through Ray Data: RAY_ADDRESS's, else a local instance "
        "(needs pip install 'rwkv-cli\\[ray]').",
        rich_help_panel=RAY,
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        metavar="ADDRESS",
        help="Run on the Ray cluster at this address (ray://HEAD:10001, or auto); implies --ray.",
        show_default=False,
        rich_help_panel=RAY,
    ),
]
RayWorkersOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        metavar="N",
        help="Ray workers, each with the model loaded (default: as many as the CPUs allow).",
        show_default=False,
        rich_help_panel=RAY,
    ),
]
RayCpusOption = Annotated[
    int,
    typer.Option(
        min=1, metavar="N", help="CPUs (model threads) of each Ray worker.", rich_help_panel=RAY
    ),
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
    ray: RayOption = False,
    ray_address: RayAddressOption = None,
    ray_workers: RayWorkersOption = None,
    ray_cpus: RayCpusOption = 1,
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

    With --ray the lines run on Ray workers, each with the model loaded (a file
    every node can read, or a Hub model): a block of lines at a time.

    Examples:
      rwkv batch prompts.jsonl -o results.jsonl -m model.pth --temperature 0
      cat prompts.jsonl | rwkv batch - -o - > results.jsonl
      rwkv batch prompts.jsonl -o results.jsonl -m owner/model --ray-address ray://head:10001
    """
    from rwkv_cli.batching.jobs import count_lines, input_lines, output_records

    cluster = _ray_cluster(ctx)  # first: a missing Ray stops the run before any work
    console = stderr_console()
    with input_lines(input_file) as lines:
        total = count_lines(input_file)
        start = open_requested(ctx, console, state, force)
        run = _runner(ctx, start, max_batch, cluster)
        with output_records(output) as (records, done):
            progress = lines_progress(console, total, min(len(done), total or 0))
            summary = _run(run, start, _defaults(ctx, start), lines, records, done, progress)
    if summary.failed:
        raise RwkvCliError(
            f"{summary.failed} of {summary.failed + summary.finished} lines failed",
            hint=f"see the error records in {'stdout' if str(output) == '-' else output}",
        )


def _ray_cluster(ctx: typer.Context) -> RayCluster | None:
    """Where the Ray options send the run (None: this process); Ray must be installed."""
    options = ctx.params
    if not (options["ray"] or options["ray_address"]):
        for name in ("ray_workers", "ray_cpus"):
            if given(ctx, name):
                flag = f"--{name.replace('_', '-')}"
                raise typer.BadParameter("runs on Ray only: add --ray", param_hint=f"'{flag}'")
        return None
    from rwkv_cli.batching.ray_jobs import RayCluster, import_ray

    import_ray()
    return RayCluster(options["ray_address"], options["ray_workers"], options["ray_cpus"])


RunJobs = Callable[[Iterable["Job"]], Iterator[dict]]  # jobs in, their records out


def _runner(
    ctx: typer.Context, start: Start, max_batch: int, cluster: RayCluster | None
) -> RunJobs:
    """How the jobs run: through one batch here, or on Ray workers that open the same model."""
    if cluster is None:
        from rwkv_cli.batching.jobs import run_jobs

        return lambda jobs: run_jobs(start.loaded, jobs, max_batch)
    from rwkv_cli.batching.ray_jobs import run_jobs_on_ray, worker_request

    request = worker_request(model_request(ctx), start.loaded)
    return lambda jobs: run_jobs_on_ray(jobs, request, start.session, max_batch, cluster)


def _run(
    run: RunJobs,
    start: Start,
    defaults: JobDefaults,
    lines: Iterator[bytes],
    records: RecordFile,
    done: set[str],
    progress: AbstractContextManager[Callable[[int], None]],
) -> BatchSummary:
    """Every line not ``done`` yet, its record written to ``records`` as it finishes."""
    from rwkv_cli.batching.jobs import read_jobs, write_records

    jobs = read_jobs(lines, start.loaded, defaults, skip=done)
    with progress as advance:
        try:
            return write_records(
                run(jobs),
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
