"""Aggregate decode speed of the batched engine by batch size (issue #19).

Builds a random RWKV-7 with the shape of the 0.1B release (L12 D768, World vocabulary, LoRAs of
64) in memory, reads a short prompt into each of B sequences, then decodes ``--tokens`` tokens
per sequence with ``batching.Batch`` (B sequences per step), as ``rwkv bench --batch`` does
(rwkv_cli.bench.batch_decode_speed), and prints the aggregate decode tok/s (B x tokens /
seconds) and the time per step. Tokens are chosen greedily, so every step does the work a real
decode does, sampling excepted. OpenMP
threads sleep while they wait, as under ``rwkv`` (rwkv_cli/entry.py), unless the environment
chooses otherwise.

    python benchmarks/bench_batch.py [--sizes 1 2 4 8 16] [--tokens 32] [--dtype fp32 bf16 int8]
        [--device cuda]

With several weight formats it builds and measures one model per format, in turn. On a GPU
(``--device cuda``, fp16 or bf16) the model runs as ``rwkv`` runs it there: activations in the
weights' type, and each step a CUDA graph (one per batch-size bucket, captured in the untimed
warm-up steps).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=32, help="decoded per sequence")
    parser.add_argument(
        "--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16", "int8", "int4"]
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rwkv_cli.entry import sleep_while_waiting

    sleep_while_waiting(os.environ)  # as `rwkv` does, before torch loads OpenMP (entry.py)
    import torch

    from rwkv_cli.bench import batch_decode_speed
    from rwkv_cli.device import compute_dtype, resolve_dtype, use_own_stream
    from rwkv_cli.kernels import prepare_kernels
    from rwkv_cli.models.rwkv7 import RWKV7
    from tests.support.fixtures import rwkv7_tensors

    tensors = rwkv7_tensors(n_layer=args.layers, n_embd=args.width, lora=64)
    device = torch.device(args.device)
    use_own_stream(device)  # as commands do
    prepare_kernels(device)
    for dtype in args.dtype:
        weights = resolve_dtype(dtype, device)
        prepared = RWKV7.prepare(tensors, weights)
        model = RWKV7.from_prepared(prepared, compute_dtype(weights, device)).to(device)
        print(
            f"RWKV-7 L{args.layers} D{args.width}, {dtype} weights, {device}, "
            f"{torch.get_num_threads()} CPU threads; {args.tokens} tokens decoded per sequence"
        )
        print(f"{'B':>4} {'aggregate tok/s':>16} {'ms per step':>12} {'vs B=1':>8}")
        single = None
        for size in args.sizes:
            result = batch_decode_speed(model, size, args.tokens)
            speed, step_ms = result.decode_tokens_per_second, result.step_milliseconds
            single = single or speed
            print(f"{size:>4} {speed:>16.1f} {step_ms:>12.1f} {speed / single:>7.2f}x")
        del model


if __name__ == "__main__":
    main()
