"""CPU threads: torch runs its matrix products on one thread per physical core by default."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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


def use_threads(count: int | None) -> int:
    """Set torch's thread count (default: the physical cores); returns the count in use."""
    torch.set_num_threads(count if count else physical_cores())
    return torch.get_num_threads()
