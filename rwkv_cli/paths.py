"""Where rwkv-cli keeps its own files (converted weights now; history and config later)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_VARIABLE = "RWKV_CLI_HOME"


def home_dir() -> Path:
    """``$RWKV_CLI_HOME``, else ``$XDG_DATA_HOME/rwkv-cli``, else ``~/.local/share/rwkv-cli``."""
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "rwkv-cli"


def converted_dir() -> Path:
    """Checkpoints converted to rwkv-cli's prepared safetensors layout."""
    return home_dir() / "converted"


def input_history_file() -> Path:
    """Lines typed in ``rwkv chat`` and ``rwkv load-state``, for recall with the arrow keys."""
    return home_dir() / "chat_history"
