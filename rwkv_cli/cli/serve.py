"""``rwkv serve``: a model over an OpenAI-compatible HTTP API (the library side is
rwkv_cli/serve/)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from rwkv_cli.cli.batch import MaxBatchOption
from rwkv_cli.cli.options import (
    DefaultModelOption,
    DeviceOption,
    DtypeOption,
    RevisionOption,
    TokenizerOption,
    model_request,
)
from rwkv_cli.fileio import parse_size
from rwkv_cli.settings import DEFAULT_MAX_BATCH
from rwkv_cli.ui import model_line, stderr_console

HostOption = Annotated[
    str,
    typer.Option(
        metavar="ADDRESS",
        help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every network.",
    ),
]
PortOption = Annotated[
    int, typer.Option(min=0, max=65535, metavar="N", help="Port to listen on (0: any free one).")
]


def _size(value: str) -> int:
    """Option callback: ``512M``, ``2G``, ``1.5G``, ``0`` -> bytes (binary units)."""
    try:
        return parse_size(value)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None


CacheSizeOption = Annotated[
    str,
    typer.Option(
        callback=_size,
        metavar="SIZE",
        help="Memory for the states of prompts read (e.g. 512M, 2G; 0: none): a request that "
        "begins as an earlier one did (the next turn of a chat) reads only what is new.",
    ),
]
StateDirOption = Annotated[
    Path | None,
    typer.Option(
        file_okay=False,
        metavar="DIR",
        help="Keep the named states (/v1/states) as state files in DIR, so they outlive the "
        "server (default: a temporary folder, removed when it stops).",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        envvar="RWKV_CLI_API_KEY",
        metavar="KEY",
        help="Answer only requests with 'Authorization: Bearer KEY'.",
        show_default=False,
    ),
]


def serve(
    ctx: typer.Context,
    model: DefaultModelOption = None,
    revision: RevisionOption = None,
    tokenizer: TokenizerOption = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    max_batch: MaxBatchOption = DEFAULT_MAX_BATCH,
    api_key: ApiKeyOption = None,
    cache_size: CacheSizeOption = "1G",
    state_dir: StateDirOption = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, many requests decoding together.

    Endpoints: GET /health, GET /v1/models,
    POST /v1/completions and POST /v1/chat/completions (stream: true sends events),
    /v1/states (named states: POST, GET, PUT, DELETE; "state": ID continues one).
    Ctrl-C or SIGTERM stops: running replies end where they are.

    Examples:
      rwkv serve -m rwkv7-g1-0.1b --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    from rwkv_cli.loading.open import open_model
    from rwkv_cli.serve.server import listen, url_of
    from rwkv_cli.serve.server import serve as run

    console = stderr_console()
    listening = listen(host, port)  # before the model loads: a port in use fails at once
    loaded = open_model(model_request(ctx), console)
    if api_key is None and not _loopback(host):
        console.print(f"Warning: no --api-key: anyone who reaches {host} can use the model")
    url = url_of(listening)
    console.print(
        f"Serving {loaded.spec} ({model_line(loaded.model)}) at {url}/v1 (Ctrl-C stops)",
        markup=False,
        highlight=False,
    )
    options = {"max_batch": max_batch, "api_key": api_key, "cache_size": cache_size}
    run(loaded, listening, state_dir=state_dir, **options)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: only localhost is known to stay on this machine
        return host == "localhost"
