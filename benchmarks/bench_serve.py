"""``rwkv serve``: aggregate streaming speed by concurrent clients, and the next turn's latency
by conversation length (issue #20).

Serves a model in-process (uvicorn on a thread, 127.0.0.1, a free port; ``--random L D`` writes
a random RWKV-7 of that shape, World vocabulary, and serves it), then:

- for each client count C starts C streaming ``/v1/completions`` requests at once (``--tokens``
  each, seeded sampling) and prints the aggregate completion tok/s (tokens from ``usage`` over
  the wall time of the slowest) and the median time to first token;
- for each ``--history`` length N, a chat whose first user message is about N tokens: the first
  turn, then the time to the first token of the next turn, which sends the whole history again
  (as OpenAI clients do), with the prefix cache (the server's default) and without it
  (``--cache-size 0``: every turn reads the whole history, as servers without state reuse do).

Over HTTP and SSE, so it measures what a client sees. OpenMP threads sleep while they wait, as
under ``rwkv`` (rwkv_cli/entry.py).

    python benchmarks/bench_serve.py [-m demo | --random 12 768] [--clients 1 4 16]
        [--tokens 64] [--history 100 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
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


async def next_turn(url: str, history_words: int) -> tuple[float, int, int]:
    """Time to the first token of a chat's second turn after a first message of about
    ``history_words`` tokens; the second turn's prompt tokens and how many were cached."""
    import httpx

    words = " ".join(WORDS[i % len(WORDS)] for i in range(history_words))
    messages = [{"role": "user", "content": words}]
    body = {"messages": messages, "max_tokens": 8, "seed": 0}
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        first = (await client.post("/v1/chat/completions", json=body)).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "And then?"}]
        body |= {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
        started, ttft, usage = time.perf_counter(), None, {}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line.removeprefix("data: "))
                if ttft is None and any(c["delta"].get("content") for c in data["choices"]):
                    ttft = time.perf_counter() - started
                usage = data.get("usage") or usage
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return ttft or 0.0, usage["prompt_tokens"], cached


WORDS = ("the", "river", "carried", "old", "stories", "past", "quiet", "towns", "at", "night")


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
    parser.add_argument("--random", type=int, nargs=2, metavar=("LAYERS", "WIDTH"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--history", type=int, nargs="*", default=[100, 4000])
    options = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_cli.entry import sleep_while_waiting

    sleep_while_waiting(os.environ)  # as `rwkv` does, before torch loads OpenMP (entry.py)
    with tempfile.TemporaryDirectory() as work:
        if options.random:
            from tests.support.fixtures import rwkv7_tensors, write_pth

            os.environ["RWKV_CLI_HOME"] = str(Path(work) / "home")
            layers, width = options.random
            tensors = rwkv7_tensors(n_layer=layers, n_embd=width, lora=64)
            options.model = str(write_pth(Path(work) / f"random-L{layers}-D{width}.pth", tensors))
            del tensors
        run(options)


def run(options: argparse.Namespace) -> None:
    from rwkv_cli.loading.open import open_model

    loaded = open_model(options.model)
    print(f"model {Path(options.model).name}: {loaded.model.describe()}, cpu fp32")
    with serving(loaded, max(options.clients)) as url:
        asyncio.run(measure(url, 1, 4))  # warm up
        print(f"{options.tokens} tokens per client")
        print("clients  aggregate tok/s  median first token (s)")
        for clients in options.clients:
            speed, first = asyncio.run(measure(url, clients, options.tokens))
            print(f"{clients:>7}  {speed:>15.1f}  {first:>22.3f}")
    if options.history:
        print("next turn: prompt tokens (cached), first token (s); with cache | without")
    for words in options.history:
        results = []
        for cache_size in (1 << 30, 0):
            with serving(loaded, 4, cache_size) as url:
                results.append(asyncio.run(next_turn(url, words)))
        (cached_s, prompt, cached), (plain_s, _, _) = results
        timings = f"{cached_s:.3f} | {plain_s:.3f}"
        print(f"history ~{words:>5} words: {prompt:>5} ({cached:>5}), {timings}")


@contextlib.contextmanager
def serving(loaded, max_batch: int, cache_size: int = 1 << 30) -> Iterator[str]:
    """The server's URL while it runs on a thread."""
    import uvicorn

    from rwkv_cli.serve import Scheduler, create_app
    from rwkv_cli.serve.server import listen, url_of
    from rwkv_cli.statecache import PrefixCache

    cache = PrefixCache(cache_size) if cache_size else None
    scheduler = Scheduler(loaded.model, loaded.tokenizer, max_batch=max_batch, cache=cache)
    listening = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(loaded, scheduler), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield url_of(listening)
    finally:
        server.should_exit = True
        thread.join()


if __name__ == "__main__":
    main()
