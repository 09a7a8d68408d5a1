"""Decode speed by thread count and OpenMP wait policy, on a quiet machine and beside a busy core.

A laptop always has something else running. OpenMP threads that spin while they wait for each
other lose whole scheduler time slices to a process that holds a core, at every one of the
hundreds of parallel regions a token takes; threads that sleep while they wait do not. This
measures `rwkv bench` decoding (fp32) with:

- each wait policy, with the default thread count: `passive` (what `rwkv` sets unless
  OMP_WAIT_POLICY or GOMP_SPINCOUNT is set) and libgomp's own default (spin, then sleep);
- one thread, which never waits for another;

first on an otherwise idle machine, then with one busy-looping process per `--busy` core.

    python benchmarks/bench_threads.py [--model demo] [--runs 3] [--tokens 128] [--busy 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator

# libgomp's default when nothing is set: spin 300,000 times, then sleep. rwkv sets
# OMP_WAIT_POLICY=PASSIVE only where neither variable is set, so this one brings the default back.
LIBGOMP_DEFAULT = {"GOMP_SPINCOUNT": "300000"}
SETTINGS = {  # label -> (rwkv root options, environment)
    "default threads, passive wait (rwkv's)": ([], {}),
    "default threads, libgomp's spin-then-sleep": ([], LIBGOMP_DEFAULT),
    "1 thread": (["--threads", "1"], {}),
}


def decode_speed(model: str, tokens: int, options: list[str], env: dict[str, str]) -> float:
    command = [
        *("rwkv", *options, "bench", "-m", model, "--json"),
        *("--prompt-tokens", "64", "--decode-tokens", str(tokens), "--dtype", "fp32"),
    ]
    environment = {
        **{k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        **env,
    }
    result = subprocess.run(command, capture_output=True, text=True, env=environment, check=True)
    return json.loads(result.stdout)[0]["decode_tokens_per_second"]


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` processes that each keep one core busy until the block ends."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def measure(model: str, tokens: int, runs: int) -> dict[str, list[float]]:
    """Tokens per second for each setting, runs alternating between the settings."""
    speeds: dict[str, list[float]] = {label: [] for label in SETTINGS}
    for _ in range(runs):
        for label, (options, env) in SETTINGS.items():
            speeds[label].append(decode_speed(model, tokens, options, env))
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="anything `rwkv -m` takes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128, help="tokens decoded per run")
    parser.add_argument("--busy", type=int, default=1, help="cores to keep busy")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        os.environ["RWKV_CLI_HOME"] = home  # kernels are built by the first run (not timed)
        subprocess.run(["rwkv", "generate", "-m", args.model, "x", "-n", "1"], check=True,
                       capture_output=True)  # fmt: skip
        quiet = measure(args.model, args.tokens, args.runs)
        with busy_cores(args.busy):
            loaded = measure(args.model, args.tokens, args.runs)

    print(f"model: {args.model}; {os.cpu_count()} CPUs; decode tok/s, median of {args.runs} runs")
    print(f"{'setting':<45} {'idle machine':>13} {f'{args.busy} busy core(s)':>15}")
    for label in SETTINGS:
        print(
            f"{label:<45} {statistics.median(quiet[label]):>13.1f}"
            f" {statistics.median(loaded[label]):>15.1f}"
        )


if __name__ == "__main__":
    main()
