"""rwkv-cli: run RWKV language models from the terminal, or from Python.

The Python API (README, "Python API") is importable from here: ``open_model`` loads a model as
the ``rwkv`` command does (a local file, a Hub file, an alias or ``"demo"``, through the
converted-weights cache, with its tokenizer); ``generate``/``stream_generate`` continue a prompt;
``Chat`` holds a conversation; ``generate_batch`` runs many prompts together;
``save_state_file``/``load_state_file`` keep a session on disk.

The names are imported on first use, so ``rwkv --help`` and ``rwkv --version`` start without
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rwkv_cli.version import __version__

if TYPE_CHECKING:
    from rwkv_cli.batching import BatchFailure, BatchRequest, BatchResult, generate_batch
    from rwkv_cli.chat import Chat, template_for
    from rwkv_cli.generation import GenerationChunk, Session, generate, stream_generate
    from rwkv_cli.loading.loaded import LoadedModel
    from rwkv_cli.loading.open import open_model
    from rwkv_cli.loading.provenance import Provenance
    from rwkv_cli.sampling import SamplingParams, make_generator
    from rwkv_cli.settings import ModelRequest
    from rwkv_cli.state import State
    from rwkv_cli.statefile import StateFile, load_state_file, read_state_file, save_state_file

__all__ = [
    "BatchFailure",
    "BatchRequest",
    "BatchResult",
    "Chat",
    "GenerationChunk",
    "LoadedModel",
    "ModelRequest",
    "Provenance",
    "SamplingParams",
    "Session",
    "State",
    "StateFile",
    "__version__",
    "generate",
    "generate_batch",
    "load_state_file",
    "make_generator",
    "open_model",
    "read_state_file",
    "save_state_file",
    "stream_generate",
    "template_for",
]

_EXPORTS = {  # each name of __all__ -> the module that defines it
    "open_model": "rwkv_cli.loading.open",
    "LoadedModel": "rwkv_cli.loading.loaded",
    "ModelRequest": "rwkv_cli.settings",
    "Provenance": "rwkv_cli.loading.provenance",
    "generate": "rwkv_cli.generation",
    "stream_generate": "rwkv_cli.generation",
    "GenerationChunk": "rwkv_cli.generation",
    "Session": "rwkv_cli.generation",
    "SamplingParams": "rwkv_cli.sampling",
    "make_generator": "rwkv_cli.sampling",
    "Chat": "rwkv_cli.chat",
    "template_for": "rwkv_cli.chat",
    "State": "rwkv_cli.state",
    "BatchFailure": "rwkv_cli.batching",
    "BatchRequest": "rwkv_cli.batching",
    "BatchResult": "rwkv_cli.batching",
    "generate_batch": "rwkv_cli.batching",
    "StateFile": "rwkv_cli.statefile",
    "save_state_file": "rwkv_cli.statefile",
    "load_state_file": "rwkv_cli.statefile",
    "read_state_file": "rwkv_cli.statefile",
}


def __getattr__(name: str) -> object:
    """The exported ``name``, imported from its module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
