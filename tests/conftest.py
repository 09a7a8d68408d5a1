"""Shared fixtures: tiny checkpoints written at test time (never committed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import rwkv7_tensors, write_pth, write_safetensors


@pytest.fixture(scope="session")
def rwkv7_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 128-wide RWKV-7 with the World vocabulary, as an official bf16 .pth."""
    return write_pth(tmp_path_factory.mktemp("models") / "tiny-rwkv7.pth", rwkv7_tensors())


@pytest.fixture(scope="session")
def rwkv7_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as ``rwkv7_pth``, as safetensors."""
    path = tmp_path_factory.mktemp("models") / "tiny-rwkv7.safetensors"
    return write_safetensors(path, rwkv7_tensors())
