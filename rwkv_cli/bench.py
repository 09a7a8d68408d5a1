"""``rwkv bench``: load time, prefill and decode speed, and peak memory, for one model; with
batch sizes, the aggregate decode speed of that many sequences stepping together."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rwkv_cli.batching.engine import Batch
from rwkv_cli.device import dtype_name
from rwkv_cli.generation import prefill
from rwkv_cli.kernels.linear import QuantizedMatrix
from rwkv_cli.loading.filerows import FileRows
from rwkv_cli.loading.open import open_model
from rwkv_cli.settings import ModelRequest
from rwkv_cli.tokenizer.bpe import load_neox_tokenizer
from rwkv_cli.tokenizer.world import load_world_tokenizer

WARM_UP_TOKENS = 16  # a short prefill and one decode step before timing


@dataclass(frozen=True)
class BatchSpeed:
    """Decoding ``batch_size`` sequences together, one token each per step."""

    batch_size: int
    decode_tokens_per_second: float  # all sequences together
    step_milliseconds: float  # one step: the time each sequence waits for its next token


@dataclass(frozen=True)
class BenchResult:
    model: str
    architecture: str
    device: str
    dtype: str
    threads: int
    load_seconds: float
    prompt_tokens: int
    prefill_tokens_per_second: float
    decode_tokens: int
    decode_tokens_per_second: float
    peak_rss_bytes: int
    weight_bytes: int
    peak_gpu_bytes: int = 0  # torch's peak allocation on the GPU during prefill and decode
    batches: tuple[BatchSpeed, ...] = ()  # batched decode, by batch size, when asked for

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark(
    spec: str,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_sizes: tuple[int, ...] = (),
) -> BenchResult:
    """Load ``spec`` (its converted cache already warm) on ``device`` with ``dtype`` weights,
    read a prompt, then decode greedily; then, for each of ``batch_sizes``, decode as many
    sequences together (``batch_decode_speed``). A short warm-up first builds any compiled
    kernels and starts the GPU. Peak memory is measured from the timed load on."""
    # Convert (on first use) in another process, so the timed load and the peak memory are
    # those of every later run.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pool.apply(_load_once, (spec, device, dtype))
    for tokenizer_loader in (load_world_tokenizer, load_neox_tokenizer):
        tokenizer_loader.cache_clear()  # every row loads its tokenizer, as a new process does
    gc.collect()
    reset_peak_rss()
    started = time.perf_counter()
    loaded = open_model(ModelRequest(spec, device=device, dtype=dtype))
    load_seconds = time.perf_counter() - started
    model = loaded.model
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, loaded.tokenizer.token_count, (prompt_tokens,), generator=generator)
    _, warm = model.forward(prompt[:WARM_UP_TOKENS].tolist())
    model.forward([0], warm)
    on_gpu = model.device.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(model.device)

    started = time.perf_counter()
    session = prefill(model, prompt.tolist())
    _wait_for(model.device)
    prefill_seconds = time.perf_counter() - started

    logits, state = session.logits, session.state
    started = time.perf_counter()
    for _ in range(decode_tokens):
        logits, state = model.forward([int(torch.argmax(logits))], state)  # int() waits
    decode_seconds = time.perf_counter() - started
    batches = tuple(batch_decode_speed(model, size, decode_tokens) for size in batch_sizes)

    return BenchResult(
        model=spec,
        architecture=model.describe(),
        device=str(model.device),
        dtype=dtype_name(model.weight_dtype),
        threads=torch.get_num_threads(),
        load_seconds=load_seconds,
        prompt_tokens=prompt_tokens,
        prefill_tokens_per_second=prompt_tokens / prefill_seconds,
        decode_tokens=decode_tokens,
        decode_tokens_per_second=decode_tokens / decode_seconds,
        peak_rss_bytes=peak_rss_bytes(),
        weight_bytes=weight_bytes(model),
        peak_gpu_bytes=torch.cuda.max_memory_allocated(model.device) if on_gpu else 0,
        batches=batches,
    )


def batch_decode_speed(model, size: int, decode_tokens: int) -> BatchSpeed:
    """Decode ``decode_tokens`` greedy tokens for each of ``size`` sequences stepping together.

    Each sequence first reads a short prompt of its own: an RNN's step costs the same at any
    position, so the prompts' length does not change the speed. One untimed step comes first.
    """
    batch = Batch(model)
    for sequence in range(size):
        first = 1 + 37 * sequence
        prompt = [(first + i) % model.vocab_size for i in range(WARM_UP_TOKENS)]
        batch.add(prefill(model, prompt))
    logits = batch.step(dict.fromkeys(batch.slots, 0))
    started = time.perf_counter()
    for _ in range(decode_tokens):
        chosen = logits.argmax(-1).tolist()  # waits for the step, as sampling would
        logits = batch.step(dict(zip(batch.slots, chosen, strict=True)))
    _wait_for(model.device)
    seconds = time.perf_counter() - started
    return BatchSpeed(size, size * decode_tokens / seconds, 1000 * seconds / decode_tokens)


def _load_once(spec: str, device: str | torch.device | None, dtype) -> None:
    """Load (converting on first use) and drop the model: run in a child process."""
    open_model(ModelRequest(spec, device=device, dtype=dtype))


def _wait_for(device: torch.device) -> None:
    """Let queued GPU work finish, so the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model) -> int:
    """Bytes of the model's weights (each tensor counted once; the embedding table too, though
    only the rows used are ever read)."""
    seen, total = set(), 0
    for weights in _weights(model):
        if isinstance(weights, FileRows):
            total += weights.nbytes
        elif weights.data_ptr() not in seen:
            seen.add(weights.data_ptr())
            total += weights.numel() * weights.element_size()
    return total


def _weights(value, depth: int = 0):
    """Every tensor (and file-backed table) a model holds, walking its attributes."""
    if isinstance(value, (torch.Tensor, FileRows)):
        yield value
    elif isinstance(value, QuantizedMatrix):
        yield from (value.values, value.scale)
    elif depth < 4 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _weights(item, depth + 1)
    elif depth < 4 and hasattr(value, "__dict__"):
        for item in vars(value).values():
            yield from _weights(item, depth + 1)


def reset_peak_rss() -> None:
    """Start peak-memory accounting afresh (Linux: ``/proc/self/clear_refs``), so each
    measurement in one process counts only itself; elsewhere the peak keeps counting."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM on Linux; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
