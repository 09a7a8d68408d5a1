"""`rwkv batch` over many prompts against one `rwkv generate` per prompt, end to end (issue #19).

Writes a random RWKV-7 checkpoint with the shape of the 0.1B release (L12 D768, World
vocabulary) in the official .pth format, converts it once (an untimed `rwkv generate`), then
times, as a user would run them:

- ``rwkv batch prompts.jsonl -o out.jsonl`` over ``--prompts`` prompts of different lengths,
  ``--max-batch`` at a time, greedy;
- the same prompts through one ``rwkv generate PROMPT --temperature 0`` process each, in turn.

Both decode ``--tokens`` tokens per prompt. It prints both wall times, the ratio, the batch
process's peak memory, and how many prompts got the same text both ways (greedy decoding gives
the same tokens unless a batched float32 sum rounds a near-tie the other way; a random model's
flat logits make near-ties likelier than a trained model's).

    python benchmarks/bench_batch_command.py [--prompts 64] [--tokens 32] [--max-batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the", "river", "carried", "old", "stories", "past", "quiet", "towns", "where", "lanterns")


def prompts(count: int) -> list[str]:
    """``count`` prompts of 4 to 40 words, all different."""
    return [
        " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + (i * 7) % 37)) + f" ({i})"
        for i in range(count)
    ]


def rwkv(*args: str, env: dict[str, str]) -> tuple[str, int]:
    """Run the command as a user would (a fresh process): its stdout and peak RSS in bytes."""
    with tempfile.TemporaryFile("w+") as stdout:
        command = [sys.executable, "-m", "rwkv_cli", *args]
        process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise SystemExit(f"rwkv {args[0]} failed with exit code {process.returncode}")
        stdout.seek(0)
        return stdout.read(), usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="decoded per prompt")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    args = parser.parse_args()

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from tests.support.fixtures import rwkv7_tensors, write_pth

    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        tensors = rwkv7_tensors(n_layer=args.layers, n_embd=args.width, lora=64)
        checkpoint = str(write_pth(work_dir / "model.pth", tensors))
        del tensors
        env = {**os.environ, "RWKV_CLI_HOME": str(work_dir / "home"), "PYTHONPATH": str(root)}
        greedy = ("-m", checkpoint, "--temperature", "0", "-n", str(args.tokens))
        rwkv("generate", "warm-up", *greedy, env=env)  # converts the checkpoint, builds kernels

        jobs = work_dir / "prompts.jsonl"
        lines = (json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(texts))
        jobs.write_text("".join(lines))
        output = work_dir / "out.jsonl"
        batch_options = ("-o", str(output), "--max-batch", str(args.max_batch))
        started = time.perf_counter()
        _, batch_rss = rwkv("batch", str(jobs), *batch_options, *greedy, env=env)
        batch_seconds = time.perf_counter() - started
        batched = {record["id"]: record["text"] for record in map(json.loads, output.open())}

        started = time.perf_counter()
        runs = [rwkv("generate", text, *greedy, env=env) for text in texts]
        alone_seconds = time.perf_counter() - started
        alone = [text for text, _ in runs]
        alone_rss = max(rss for _, rss in runs)

    same = sum(batched[i] == text for i, text in enumerate(alone))
    print(f"RWKV-7 L{args.layers} D{args.width} (random weights), fp32, CPU")
    print(f"{args.prompts} prompts of 4-40 words, {args.tokens} tokens each, greedy")
    print(f"rwkv batch --max-batch {args.max_batch}: {batch_seconds:7.1f} s (one process)")
    print(f"rwkv generate, one per prompt: {alone_seconds:7.1f} s")
    print(f"speed-up: {alone_seconds / batch_seconds:.1f}x")
    gib = 1024**3
    print(f"peak RSS: rwkv batch {batch_rss / gib:.2f} GiB, rwkv generate {alone_rss / gib:.2f}")
    print(f"same text both ways: {same} of {args.prompts}")


if __name__ == "__main__":
    main()
