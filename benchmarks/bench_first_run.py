"""A newcomer's first commands: `rwkv --version`, `rwkv --help`, and the first
`rwkv generate -m demo` on a machine that has built nothing yet (an empty RWKV_CLI_HOME, so the
compiled kernels are built and the demo model converted), then the same command again.

For `generate` it reports the time to the first byte of generated text on stdout and to the end
of the command, as a user sees them (starting Python and importing torch included).

    python benchmarks/bench_first_run.py [--runs 3] [--tokens 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

PROMPT = "And God said"


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Seconds to the first byte on stdout and to the exit of ``command``."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert process.stdout is not None
    first = process.stdout.read(1)
    first_byte = time.perf_counter() - started
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise SystemExit(f"failed: {' '.join(command)}")
    return first_byte, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()

    generate = ["rwkv", "generate", "-m", "demo", PROMPT, "-n", str(args.tokens)]
    rows: dict[str, list[tuple[float, float]]] = {
        "rwkv --version": [],
        "rwkv --help": [],
        "first generate (builds kernels)": [],
        "second generate": [],
    }
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as home:
            env = {**os.environ, "RWKV_CLI_HOME": home}
            rows["rwkv --version"].append(timed(["rwkv", "--version"], env))
            rows["rwkv --help"].append(timed(["rwkv", "--help"], env))
            rows["first generate (builds kernels)"].append(timed(generate, env))
            rows["second generate"].append(timed(generate, env))

    print(f"{os.cpu_count()} CPUs; median of {args.runs} runs; -m demo, {args.tokens} tokens")
    print(f"{'command':<34} {'first output':>13} {'done':>8}")
    for label, times in rows.items():
        first = statistics.median(t[0] for t in times)
        done = statistics.median(t[1] for t in times)
        print(f"{label:<34} {first:>11.2f} s {done:>6.2f} s")


if __name__ == "__main__":
    main()
