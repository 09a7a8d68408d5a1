"""Rows of a tensor read from its file on demand (the embedding table)."""

from __future__ import annotations

import ctypes
import json
import struct
import threading
import weakref
from pathlib import Path

import torch


class FileRows:
    """A 2-D tensor in a safetensors file whose rows are read from the file when indexed.

    For the embedding table: a token needs one row, and a memory map would bring in far more
    (read-ahead, and large page-cache folios on recent Linux): a few hundred tokens make the
    whole table resident (0.2 GB for a World-vocabulary 0.1B model). Reading rows costs a
    system call each, microseconds next to a forward pass.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, int], dtype: torch.dtype):
        # Open for the table's lifetime (a file replaced meanwhile stays readable), unbuffered:
        # each read is one row, and nothing is read ahead.
        self._file = path.open("rb", buffering=0)
        weakref.finalize(self, self._file.close)
        self._lock = threading.Lock()
        self._offset = offset
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._row_bytes = shape[1] * dtype.itemsize

    @classmethod
    def of(cls, path: Path, name: str, tensor: torch.Tensor) -> FileRows:
        """The rows of ``tensor``, which is stored as ``name`` in the safetensors file ``path``."""
        with path.open("rb") as file:
            header_size = struct.unpack("<Q", file.read(8))[0]
            start, _ = json.loads(file.read(header_size))[name]["data_offsets"]
        return cls(path, 8 + header_size + start, tuple(tensor.shape), tensor.dtype)

    device = torch.device("cpu")  # where the rows it returns are

    def to(self, device: torch.device) -> FileRows | torch.Tensor:
        """Itself on the CPU; elsewhere the whole table, read once and moved to ``device``."""
        if torch.device(device).type == "cpu":
            return self
        return self[torch.arange(self.shape[0])].to(device)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows ``rows`` (a 1-D index tensor), shape (len(rows), columns)."""
        indices = rows.reshape(-1).tolist()
        if indices and not 0 <= min(indices) <= max(indices) < self.shape[0]:
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        out = torch.empty((len(indices), self.shape[1]), dtype=self.dtype)
        buffer = (ctypes.c_char * (len(indices) * self._row_bytes)).from_address(out.data_ptr())
        view = memoryview(buffer).cast("B")
        with self._lock:
            for position, row in enumerate(indices):
                self._file.seek(self._offset + row * self._row_bytes)
                start = position * self._row_bytes
                if self._file.readinto(view[start : start + self._row_bytes]) != self._row_bytes:
                    raise OSError(f"{self._file.name} is shorter than its header says")
        return out
