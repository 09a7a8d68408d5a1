"""The demo model shipped with rwkv-cli: a small RWKV-7 trained on the King James Bible.

``-m demo`` names it. It lives in ``rwkv_cli/data/demo/`` with the byte-level BPE tokenizer it was
trained with (``tokenizer.json``, picked up because it sits beside the checkpoint) and a held-out
text sample for the tests. ``python -m rwkv_cli.demo.train`` rebuilds all three (see
:mod:`rwkv_cli.demo.train`); only that needs the Debian ``bible-kjv`` package.
"""

from __future__ import annotations

from pathlib import Path

DEMO_SPEC = "demo"  # what -m accepts
CHECKPOINT_FILE = "demo.safetensors"
HELDOUT_FILE = "heldout.txt"  # text the model never trained on


def demo_dir() -> Path:
    """The folder of the shipped demo files (package data: installed as plain files)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo"


def demo_checkpoint() -> Path:
    """The shipped demo checkpoint."""
    return demo_dir() / CHECKPOINT_FILE
