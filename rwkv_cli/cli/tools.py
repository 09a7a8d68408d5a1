"""Tool commands: ``bench`` (speed and memory), ``perplexity`` (how well a model predicts a
text), ``doctor`` (what this machine can do), ``download`` (into the Hub cache) and ``models``
(aliases and what is cached)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rwkv_cli.cli.options import (
    WEIGHT_TYPES,
    DefaultModelOption,
    DeviceOption,
    DtypeOption,
    ModelOption,
    RevisionOption,
    TokenizerOption,
    open_requested,
)
from rwkv_cli.settings import DTYPE_NAMES
from rwkv_cli.ui import (
    activity,
    format_perplexity,
    prefill_progress,
    print_bench,
    print_models,
    stderr_console,
)


def _dtype_names(values: list[str] | None) -> list[str] | None:
    """Option callback: an unknown weight type is a usage error, as for the single --dtype."""
    for name in values or []:
        if name.strip().lower() not in DTYPE_NAMES:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return values


def _batch_sizes(value: str | None) -> tuple[int, ...]:
    """Option callback: ``1,4,16`` -> (1, 4, 16); anything else is a usage error."""
    if value is None:
        return ()
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of positive numbers")
    return sizes


def bench(
    model: DefaultModelOption = None,
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
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            "--batch",
            callback=_batch_sizes,
            metavar="SIZES",
            help="Also decode this many sequences together, e.g. 1,4,16: aggregate tok/s and "
            "the time per step (each sequence's wait for its next token).",
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
            results.append(
                benchmark(spec, prompt_tokens, decode_tokens, device, dtype, batch_sizes)
            )
    if as_json:
        typer.echo(json.dumps([result.to_dict() for result in results], indent=2))
    else:
        print_bench(results)


def perplexity(
    ctx: typer.Context,
    text_file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="UTF-8 text to score (- reads stdin).", show_default=False
        ),
    ],
    model: ModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """How well a model predicts a text: perplexity and bits per byte (lower is better).

    Compare weight types (--dtype) or models on your own text, e.g.:
      rwkv perplexity notes.txt -m rwkv7-g1-0.1b --dtype int8
    """
    from rwkv_cli.device import dtype_name
    from rwkv_cli.errors import InvalidInputError
    from rwkv_cli.perplexity import score_text
    from rwkv_cli.textio import read_text_file

    text = read_text_file(text_file)
    console = stderr_console()
    loaded = open_requested(ctx, console, None, False).loaded
    tokens = loaded.tokenizer.encode(text)
    if not tokens:
        raise InvalidInputError(f"{text_file} holds no text to score")
    model = loaded.model
    with prefill_progress(console) as update:
        result = score_text(model, tokens, len(text.encode()), loaded.tokenizer.eos_id, update)
    if as_json:
        about = {"model": loaded.spec, "architecture": model.describe()}
        report = {**about, "dtype": dtype_name(model.weight_dtype), **result.to_dict()}
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(format_perplexity(model, result))


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


def models() -> None:
    """List the model aliases and the checkpoints already downloaded."""
    from rwkv_cli.loading.hub import cached_models
    from rwkv_cli.loading.spec import list_aliases

    print_models(list_aliases(), cached_models())
