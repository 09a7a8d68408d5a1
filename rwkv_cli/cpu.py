"""CPU setup: one thread per physical core, and subnormal floats flushed to zero.

Subnormal floats (below 1.2e-38 in magnitude) take a slow microcode path on x86 CPUs, 10 to 100
times slower per operation. They do come up in RWKV: a sigmoid of a large negative logit, or a
state channel decaying for thousands of tokens. Flushing them to zero changes results by less
than 1e-38 and keeps every token at full speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import torch

from rwkv_cli.settings import MAX_THREADS


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's arithmetic units, so they do not help)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.cpu_count() or 1
    cores, physical = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            physical = value.strip()
        elif key.strip() == "core id":
            cores.add((physical, value.strip()))
    return len(cores) or os.cpu_count() or 1


def configure_cpu(threads: int | None) -> int:
    """Set torch's thread count (default: the physical cores, at most MAX_THREADS), flush
    subnormals to zero and return freed memory to the system; returns the thread count in use."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be from 1 to {MAX_THREADS}, not {threads}")
    torch.set_flush_denormal(True)  # before the thread pool starts: its threads inherit it
    torch.set_num_threads(threads if threads else physical_cores())
    _return_large_frees()
    return torch.get_num_threads()


# glibc's malloc serves blocks above a threshold with their own mmap, returned to the system when
# freed, but it raises that threshold (up to 32 MiB) each time such a block is freed. After that
# every activation lives on the heap, which keeps its peak size: about 0.1 GB for a 0.1B model.
# A fixed threshold keeps freed activations from counting as resident memory.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _return_large_frees() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass  # not glibc (musl): its malloc returns large blocks anyway
