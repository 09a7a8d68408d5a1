"""Time the RWKV-5/6 WKV recurrence: token by token against chunked, for several chunk lengths.

    python benchmarks/bench_wkv5.py [--tokens 512] [--heads 12 32] [--chunk-lens 4 8 16 32]
        [--block-lens 128] [--threads 2] [--repeats 9] [--keep-subnormals]

Decays are drawn like a trained RWKV-6's, ``exp(-exp(x))`` with x spread over [-6, 2] across
channels plus per-token noise, so some channels forget almost everything at every token.
Subnormals are flushed to zero as the CLI does (``--keep-subnormals`` to time without that).
Prints the median and best of ``--repeats`` runs in milliseconds; runs are interleaved so a busy
machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from rwkv_cli.kernels.wkv5 import BLOCK_LEN, wkv5_chunked, wkv5_sequential

HEAD_SIZE = 64


def rwkv6_like_inputs(tokens: int, heads: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """float32 (state, r, w, k, v, u) with RWKV-6-like decays."""
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, heads, HEAD_SIZE)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g)

    per_channel = torch.linspace(-6.0, 2.0, heads * HEAD_SIZE).view(heads, HEAD_SIZE)
    w = torch.exp(-torch.exp(per_channel + 0.5 * randn(*shape)))
    r, k, v = randn(*shape), randn(*shape), randn(*shape)
    return randn(heads, HEAD_SIZE, HEAD_SIZE), r, w, k, v, randn(heads, HEAD_SIZE)


def time_all(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each run, ``repeats`` times, interleaved; one warm-up call each."""
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, nargs="+", default=[12, 32])
    parser.add_argument("--chunk-lens", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--block-lens", type=int, nargs="+", default=[BLOCK_LEN])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--keep-subnormals", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(not args.keep_subnormals)
    torch.set_num_threads(args.threads)

    for heads in args.heads:
        inputs = rwkv6_like_inputs(args.tokens, heads)
        runs = {"token by token": partial(wkv5_sequential, *inputs)}
        for chunk_len, block_len in itertools.product(args.chunk_lens, args.block_lens):
            name = f"chunks of {chunk_len}, blocks of {block_len}"
            runs[name] = partial(wkv5_chunked, *inputs, chunk_len=chunk_len, block_len=block_len)
        print(f"{args.tokens} tokens, {heads} heads of {HEAD_SIZE}, {args.threads} threads:")
        for name, seconds in time_all(runs, args.repeats).items():
            median, best = statistics.median(seconds) * 1e3, min(seconds) * 1e3
            print(f"  {name:>28}: median {median:6.1f} ms, best {best:6.1f} ms")


if __name__ == "__main__":
    main()
