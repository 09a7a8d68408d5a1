"""Aggregate streaming speed of ``rwkv serve`` by the number of concurrent clients (issue #20).

Serves a model in-process (uvicorn on a thread, 127.0.0.1, a free port), then for each client
count C starts C streaming ``/v1/completions`` requests at once (``max_tokens`` each, seeded
sampling, so each runs to its length unless the text ends) and prints the aggregate completion
tok/s (tokens from ``usage`` over the wall time of the slowest) and the median time to first
token. Over HTTP and SSE, so it measures what a client sees, unlike bench_batch.py. OpenMP
threads sleep while they wait, as under ``rwkv`` (rwkv_cli/entry.py).

    python benchmarks/bench_serve.py [-m demo] [--clients 1 4 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path


async def one_client(client, seed: int, tokens: int) -> tuple[float, int]:
    """Seconds to the first token and completion tokens of one streamed request."""
    body = {"prompt": "The", "max_tokens": tokens, "seed": seed, "stream": True}
    body["stream_options"] = {"include_usage": True}
    started, first, used = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line.removeprefix("data: "))
            if first is None and data["choices"]:
                first = time.perf_counter() - started
            if data.get("usage"):
                used = data["usage"]["completion_tokens"]
    return first or 0.0, used


async def measure(url: str, clients: int, tokens: int) -> tuple[float, float]:
    """Aggregate tok/s and the median seconds to the first token of ``clients`` at once."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        started = time.perf_counter()
        runs = await asyncio.gather(*(one_client(client, seed, tokens) for seed in range(clients)))
        seconds = time.perf_counter() - started
    return sum(used for _, used in runs) / seconds, statistics.median(f for f, _ in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="demo")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    options = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_cli.entry import sleep_while_waiting

    sleep_while_waiting(os.environ)  # as `rwkv` does, before torch loads OpenMP (entry.py)
    import uvicorn

    from rwkv_cli.loading.open import open_model
    from rwkv_cli.serve import Scheduler, create_app
    from rwkv_cli.serve.server import listen, url_of

    loaded = open_model(options.model)
    scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch=max(options.clients))
    listening = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, scheduler), log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    asyncio.run(measure(url_of(listening), 1, 4))  # warm up
    print(f"model {options.model}, {options.tokens} tokens per client")
    print("clients  aggregate tok/s  median first token (s)")
    for clients in options.clients:
        speed, first = asyncio.run(measure(url_of(listening), clients, options.tokens))
        print(f"{clients:>7}  {speed:>15.1f}  {first:>22.3f}")
    server.should_exit = True


if __name__ == "__main__":
    main()
