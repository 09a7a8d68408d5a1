"""Running the application: a listening socket, uvicorn, and a clean stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from types import FrameType

import uvicorn

from rwkv_cli.errors import InvalidInputError
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.serve.app import create_app
from rwkv_cli.serve.scheduler import Scheduler
from rwkv_cli.settings import DEFAULT_MAX_BATCH
from rwkv_cli.statecache import PrefixCache
from rwkv_cli.statestore import StateStore

DEFAULT_CACHE_BYTES = 1 << 30  # states of prompts read, kept for requests that begin alike


class _Server(uvicorn.Server):
    """uvicorn's server, whose stop signals first end the running replies where they are (so
    every stream closes with a finish reason and ``[DONE]``), then stop it as uvicorn does.

    uvicorn's own handler also records the signal to raise it again once it has stopped; this
    one does not, so the command ends with exit code 0.
    """

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler) -> None:
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.scheduler.stop()
        if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: stop at once
            self.force_exit = True
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host``:``port`` (0: any free port), or a clear error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        raise InvalidInputError(
            f"cannot listen on {host}:{port}: {error.strerror or error}",
            hint="choose another --port, or stop the program that uses it",
        ) from error


def url_of(listening: socket.socket) -> str:
    host, port = listening.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    loaded: LoadedModel,
    listening: socket.socket,
    *,
    max_batch: int = DEFAULT_MAX_BATCH,
    api_key: str | None = None,
    cache_size: int = DEFAULT_CACHE_BYTES,
    state_dir: Path | None = None,
) -> None:
    """Serve ``loaded`` on ``listening`` until Ctrl-C or SIGTERM: then new requests are refused,
    running replies end where they are, and this returns. Up to ``cache_size`` bytes of states
    of prompts read are kept for requests that begin the same way (0: none). Named states are
    files in ``state_dir``, kept after the server stops (None: a temporary folder)."""
    cache = PrefixCache(cache_size) if cache_size > 0 else None
    scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch, cache=cache)
    store = StateStore(loaded, state_dir) if state_dir is not None else None
    app = create_app(loaded, scheduler, api_key=api_key, store=store)
    config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=10)
    _Server(config, scheduler).run(sockets=[listening])
