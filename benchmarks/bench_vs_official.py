"""rwkv-cli against BlinkDL's official `rwkv` package, same machine, same run, same workload.

For each model shape, writes a random checkpoint in the official bf16 .pth format, then measures
in fresh processes: prefill tok/s for a prompt, decode tok/s (greedy, one token at a time) and
peak RSS (and on a GPU torch's peak GPU allocation); rwkv-cli through `rwkv bench --json`, the
official package with the same strategy (`cpu fp32`, or on a GPU `cuda fp16` with its CUDA
kernels, RWKV_CUDA_ON=1). Both get a short warm-up first.

rwkv-cli can run several weight types (``--dtypes fp32 bf16 int8``); each is compared with the
official package's run in ``--official-dtype`` (default fp32 on the CPU, where its bf16 is 50x
slower, and fp16 on a GPU). Shared machines are noisy: both systems run ``--repeat`` times,
alternating, and the best speed of each (and its lowest peak memory) is reported.

    python benchmarks/bench_vs_official.py [--prompt-tokens 512] [--decode-tokens 128]
    python benchmarks/bench_vs_official.py --dtypes fp32 bf16 int8
    python benchmarks/bench_vs_official.py --device cuda --dtypes fp16 bf16 --shapes "RWKV-7 1.5B"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name: (fixture function in tests/support/fixtures.py, its arguments, official RWKV_V7_ON switch)
SHAPES = {
    "RWKV-7 0.1B": ("rwkv7_tensors", {"n_layer": 12, "n_embd": 768, "lora": 64}, "1"),
    "RWKV-4 169M": ("rwkv4_tensors", {"n_layer": 12, "n_embd": 768}, "0"),
    "RWKV-7 1.5B": ("rwkv7_tensors", {"n_layer": 24, "n_embd": 2048, "lora": 96}, "1"),
}
DEFAULT_SHAPES = ("RWKV-7 0.1B", "RWKV-4 169M")

OFFICIAL = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from rwkv.model import RWKV

def peak_rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

path, prompt_tokens, decode_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
strategy = sys.argv[5]
gpu = strategy.startswith("cuda")
model = RWKV(path.removesuffix(".pth"), strategy)
prompt = torch.randint(1, 50000, (prompt_tokens,), generator=torch.Generator().manual_seed(0))
logits, state = model.forward(prompt[:16].tolist(), None)  # warm-up, as rwkv bench does
model.forward([0], state)
wait = torch.cuda.synchronize if gpu else (lambda: None)
if gpu:
    torch.cuda.reset_peak_memory_stats()
wait()
started = time.perf_counter()
logits, state = model.forward(prompt.tolist(), None)
wait()
prefill = prompt_tokens / (time.perf_counter() - started)
started = time.perf_counter()
for _ in range(decode_tokens):
    logits, state = model.forward([int(torch.argmax(logits))], state)
decode = decode_tokens / (time.perf_counter() - started)
peak_gpu = torch.cuda.max_memory_allocated() if gpu else 0
result = {"prefill": prefill, "decode": decode, "peak_rss": peak_rss(), "peak_gpu": peak_gpu}
print(json.dumps(result))
"""


def run_ours(checkpoint: Path, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    command = [
        sys.executable,
        "-m",
        "rwkv_cli",
        "--threads",
        str(args.threads),
        "bench",
        "--device",
        args.device,
        *(option for dtype in args.dtypes for option in ("--dtype", dtype)),
        "-m",
        str(checkpoint),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--decode-tokens",
        str(args.decode_tokens),
        "--json",
    ]
    results = json.loads(subprocess.run(command, env=env, check=True, capture_output=True).stdout)
    return [
        {
            "dtype": result["dtype"],
            "prefill": result["prefill_tokens_per_second"],
            "decode": result["decode_tokens_per_second"],
            "peak_rss": result["peak_rss_bytes"],
            "peak_gpu": result["peak_gpu_bytes"],
            "weights": result["weight_bytes"],
        }
        for result in results
    ]


def run_official(checkpoint: Path, args: argparse.Namespace, env: dict[str, str], v7: str) -> dict:
    cuda_on = "1" if args.device.startswith("cuda") else "0"
    official_env = {**env, "RWKV_V7_ON": v7, "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": cuda_on}
    command = [
        sys.executable,
        "-c",
        OFFICIAL,
        str(checkpoint),
        str(args.prompt_tokens),
        str(args.decode_tokens),
        str(args.threads),
        f"{args.device} {args.official_dtype}",
    ]
    output = subprocess.run(command, env=official_env, check=True, capture_output=True).stdout
    return json.loads(output.decode().strip().splitlines()[-1])


def best(results: list[dict]) -> dict:
    """The best of repeated runs: highest speeds, lowest peak memory."""
    merged = dict(results[0])
    for key in ("prefill", "decode"):
        merged[key] = max(result[key] for result in results)
    for key in ("peak_rss", "peak_gpu"):
        merged[key] = min(result[key] for result in results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtypes", nargs="+", default=["fp32"], choices=("fp32", "fp16", "bf16", "int8")
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per system (best is kept)")
    parser.add_argument("--official-dtype", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, choices=tuple(SHAPES))
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.official_dtype = args.official_dtype or ("fp16" if gpu else "fp32")
    sys.path.insert(0, str(ROOT))
    from tests.support import fixtures

    gib = 1024**3
    memory = "peak GPU mem" if gpu else "peak RSS"
    print(f"{'shape':<13} {'system':<24} {'prefill tok/s':>14} {'decode tok/s':>13} {memory:>16}")
    # One rwkv-cli home for the run: kernels are built once, each checkpoint converted once.
    home = tempfile.TemporaryDirectory()
    env = {**os.environ, "RWKV_CLI_HOME": home.name}
    for name in args.shapes:
        fixture, shape, v7 = SHAPES[name]
        with tempfile.TemporaryDirectory() as work:
            tensors = getattr(fixtures, fixture)(**shape)
            checkpoint = fixtures.write_pth(Path(work) / "model.pth", tensors)
            del tensors
            runs = [
                (run_ours(checkpoint, args, env), run_official(checkpoint, args, env, v7))
                for _ in range(args.repeat)
            ]
            ours = [best(list(by_dtype)) for by_dtype in zip(*(r[0] for r in runs), strict=True)]
            theirs = best([r[1] for r in runs])
        # The official package's weights weigh what ours do in the same type.
        same_type = [r["weights"] for r in ours if r["dtype"] == args.official_dtype]
        theirs["weights"] = same_type[0] if same_type else None
        rows = [(f"rwkv-cli {args.device} {r['dtype']}", r) for r in ours]
        rows.append((f"official {args.device} {args.official_dtype}", theirs))
        for system, result in rows:
            peak = result["peak_gpu"] or result["peak_rss"]  # GPU memory on a GPU
            ratio = f" ({peak / result['weights']:.1f}x)" if result["weights"] else ""
            print(
                f"{name:<13} {system:<24} {result['prefill']:>14.1f} {result['decode']:>13.1f} "
                f"{f'{peak / gib:.2f} GiB{ratio}':>16}"
            )
        for result in ours:
            print(
                f"{name:<13} {'ratio ' + result['dtype']:<24} "
                f"{result['prefill'] / theirs['prefill']:>13.2f}x "
                f"{result['decode'] / theirs['decode']:>12.2f}x"
            )


if __name__ == "__main__":
    main()
