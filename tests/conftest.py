"""Shared fixtures: tiny checkpoints written at test time (never committed)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import close_session

from rwkv_cli.kernels.build import set_kernel_choice
from tests.support.fixtures import rwkv7_tensors, write_pth, write_safetensors
from tests.support.hub_server import HubServer


@pytest.fixture(autouse=True, scope="session")
def _isolated_homes(tmp_path_factory: pytest.TempPathFactory):
    """rwkv-cli's own files and the Hugging Face cache go to temp dirs, and the Hub is off limits,
    for this process and the CLI processes tests start. Tests that need a Hub use ``local_hub``."""
    hf_home = tmp_path_factory.mktemp("hf-home")
    patch = pytest.MonkeyPatch()
    patch.setenv("RWKV_CLI_HOME", str(tmp_path_factory.mktemp("rwkv-cli-home")))
    patch.setenv("HF_HOME", str(hf_home))
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.delenv("HF_HUB_CACHE", raising=False)
    patch.setattr(hf_constants, "HF_HOME", str(hf_home))
    patch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    patch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def rwkv7_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 128-wide RWKV-7 with the World vocabulary, as an official bf16 .pth."""
    return write_pth(tmp_path_factory.mktemp("models") / "tiny-rwkv7.pth", rwkv7_tensors())


@pytest.fixture(scope="session")
def rwkv7_safetensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights as ``rwkv7_pth``, as safetensors."""
    path = tmp_path_factory.mktemp("models") / "tiny-rwkv7.safetensors"
    return write_safetensors(path, rwkv7_tensors())


@pytest.fixture(scope="session")
def rwkv7_other_weights_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes as ``rwkv7_pth``, different weights (like a fine-tune of the same base)."""
    path = tmp_path_factory.mktemp("models") / "tiny-rwkv7-finetune.pth"
    return write_pth(path, rwkv7_tensors(seed=1))


@pytest.fixture(scope="session")
def rwkv7_deeper_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer model: states of the 2-layer one do not fit it."""
    path = tmp_path_factory.mktemp("models") / "tiny-rwkv7-l3.pth"
    return write_pth(path, rwkv7_tensors(n_layer=3, seed=2))


@pytest.fixture(scope="session")
def state_tuning_pth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BlinkDL-style state-tuning file for ``rwkv7_pth``: bf16 time_state per layer."""
    generator = torch.Generator().manual_seed(3)
    tensors = {
        f"blocks.{layer}.att.time_state": (torch.randn(2, 64, 64, generator=generator) * 0.5).to(
            torch.bfloat16
        )
        for layer in range(2)
    }
    return write_pth(tmp_path_factory.mktemp("states") / "tuned-state.pth", tensors)


# --- a local Hugging Face Hub (tests/support/hub_server.py) -------------------------------------


@dataclass
class LocalHub:
    """A Hub look-alike with huggingface_hub pointed at it and an empty cache in ``home``."""

    server: HubServer
    home: Path  # HF_HOME

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a child process: HF_* variables only, nothing from the user's."""
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        return base | {"HF_ENDPOINT": self.server.url, "HF_HOME": str(self.home)} | extra


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A Hub-compatible HTTP server on 127.0.0.1 (plus its "CDN"), stopped at teardown."""
    with HubServer() as server:
        yield server
    close_session()  # drop huggingface_hub's keep-alive connections to it


@pytest.fixture
def local_hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalHub:
    """Point huggingface_hub at ``hub_server``, online, with no token and a fresh cache.

    huggingface_hub reads its environment variables once, at import, so the settings are patched in
    ``huggingface_hub.constants`` (for this process) and in ``os.environ`` (for child processes).
    """
    home = tmp_path / "hf-home"
    settings = {
        "ENDPOINT": hub_server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub_server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_PROGRESS_BARS": None,
    }
    for name, value in settings.items():
        monkeypatch.setattr(hf_constants, name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    return LocalHub(hub_server, home)


@pytest.fixture
def kernel_choice():
    """Set the process-wide kernel choice for one test; "auto" again afterwards."""
    yield set_kernel_choice
    set_kernel_choice("auto")
