"""Model loading: first load (conversion) vs later loads (memory-mapped), and peak memory.

Writes a random RWKV-7 checkpoint with the shape of the 0.1B release (L12 D768, World vocabulary)
in the official bf16 .pth format, then loads it in fresh processes through rwkv-cli's
converted-weights cache and reports wall time and peak RSS against the prepared weights' size.

    python benchmarks/bench_load.py [--layers 12] [--width 768]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PEAK_RSS = """
def peak_rss():  # VmHWM: this process's peak resident memory (ru_maxrss survives exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

CHILD = (
    PEAK_RSS
    + """
import json, sys, time
from rwkv_cli.loading.open import open_model
started = time.perf_counter()
loaded = open_model(sys.argv[1])
elapsed = time.perf_counter() - started
loaded.model.forward([1, 2, 3])  # touch every weight once
print(json.dumps({"seconds": elapsed, "peak_rss": peak_rss()}))
"""
)

BASELINE = (
    PEAK_RSS
    + """
import json
import torch, rwkv_cli.loading.open  # the interpreter, torch and rwkv-cli without a model
print(json.dumps({"peak_rss": peak_rss()}))
"""
)


def run(code: str, *args: str, env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import os

    from tests.support.fixtures import rwkv7_tensors, write_pth

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        tensors = rwkv7_tensors(n_layer=args.layers, n_embd=args.width, lora=64)
        checkpoint = write_pth(work_dir / "model.pth", tensors)
        fp32_bytes = sum(t.numel() * 4 for t in tensors.values())
        del tensors
        env = {**os.environ, "RWKV_CLI_HOME": str(work_dir / "home")}
        baseline = run(BASELINE, env=env)["peak_rss"]
        first = run(CHILD, str(checkpoint), env=env)
        later = [run(CHILD, str(checkpoint), env=env) for _ in range(3)]

    best = min(later, key=lambda r: r["seconds"])
    gib = 1024**3
    print(f"shape: RWKV-7 L{args.layers} D{args.width}; checkpoint {checkpoint.name}")
    print(f"prepared fp32 weights: {fp32_bytes / gib:.2f} GiB")
    print(f"baseline process (python + torch + rwkv_cli): {baseline / gib:.2f} GiB peak RSS")
    print("load time excludes starting Python and importing torch; peak RSS includes a forward")
    for label, result in (("first load (converts)", first), ("later load (mmap)", best)):
        extra = (result["peak_rss"] - baseline) / fp32_bytes
        print(
            f"{label:<22} {result['seconds']:6.2f} s   peak RSS {result['peak_rss'] / gib:.2f} GiB"
            f"   (above baseline: {extra:.2f}x the weights)"
        )


if __name__ == "__main__":
    main()
