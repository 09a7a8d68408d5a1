"""Saving a session with one model and resuming it with another (other device or weight type)."""

from __future__ import annotations

from pathlib import Path

from rwkv_cli.generation import Session, prefill
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.statefile import StateFile, read_state_file, save_state_file
from rwkv_cli.tokenizer.world import load_world_tokenizer


def save_and_resume(
    saver, resumer, tokens: list[int], path: Path, start: Session | None = None
) -> tuple[Session, StateFile, Session]:
    """Prefill ``tokens`` with ``saver`` (after ``start``), save to ``path``, resume with
    ``resumer``: returns the saver's session, the file as read, and the resumer's session."""
    session = prefill(saver, tokens, start)
    tokenizer = load_world_tokenizer()
    save_state_file(path, LoadedModel(saver, tokenizer, "m", Provenance(Path("m"))), session)
    saved = read_state_file(path)
    return session, saved, saved.session_for(resumer, tokenizer.name)
