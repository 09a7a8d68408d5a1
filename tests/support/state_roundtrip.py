"""Saving a session with one model and resuming it with another (other device or weight type)."""

from __future__ import annotations

from pathlib import Path

from rwkv_cli.generate import Session, prefill
from rwkv_cli.statefile import StateFile, read_state_file, save_state_file


def save_and_resume(
    saver, resumer, tokens: list[int], path: Path, start: Session | None = None
) -> tuple[Session, StateFile, Session]:
    """Prefill ``tokens`` with ``saver`` (after ``start``), save to ``path``, resume with
    ``resumer``: returns the saver's session, the file as read, and the resumer's session."""
    session = prefill(saver, tokens, start)
    save_state_file(
        path,
        model=saver,
        tokenizer_name="world",
        session=session,
        model_spec="m",
        model_resolved="m",
    )
    saved = read_state_file(path)
    return session, saved, saved.session_for(resumer, "world")
