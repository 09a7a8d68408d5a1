"""Opening a model (and optionally a saved state) the way every command needs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rwkv_cli.errors import InvalidInputError
from rwkv_cli.generate import Session
from rwkv_cli.models import Model, load_model
from rwkv_cli.statefile import StateFile, import_state_tuning, is_state_tuning_file, read_state_file
from rwkv_cli.tokenizer import WorldTokenizer, tokenizer_for_vocab


@dataclass(frozen=True)
class LoadedModel:
    """A model with its tokenizer, and the names it was asked for and found under."""

    model: Model
    tokenizer: WorldTokenizer
    spec: str  # as the user gave it
    resolved: str  # where it was found: an absolute path


@dataclass(frozen=True)
class Start:
    """A loaded model and the session to continue from (a fresh one without a state file)."""

    loaded: LoadedModel
    session: Session
    state_file: StateFile | None = None


def open_model(spec: str) -> LoadedModel:
    """Load the model ``spec`` names (a checkpoint path)."""
    path = Path(spec).expanduser()
    model = load_model(path)
    return LoadedModel(model, tokenizer_for_vocab(model.vocab_size), spec, str(path.resolve()))


def open_start(model_spec: str | None, state_path: Path | None, force: bool = False) -> Start:
    """Load the model, and the saved state to continue from if ``state_path`` is given.

    Without ``model_spec`` the model is the one the state file names. A BlinkDL state-tuning
    file has no such record, so it needs ``model_spec``.
    """
    if state_path is None:
        if model_spec is None:
            raise InvalidInputError("no model given", hint="pass -m MODEL (a checkpoint file)")
        return Start(open_model(model_spec), Session())
    if is_state_tuning_file(state_path):
        if model_spec is None:
            raise InvalidInputError(
                f"{state_path} is a state-tuning file, which does not record its model",
                hint="pass the model it was trained for with -m MODEL",
            )
        loaded = open_model(model_spec)
        return Start(loaded, import_state_tuning(state_path, loaded.model))
    state_file = read_state_file(state_path)
    loaded = open_model(model_spec or _saved_model_spec(state_file))
    session = state_file.session_for(loaded.model, loaded.tokenizer.name, force=force)
    return Start(loaded, session, state_file)


def _saved_model_spec(state_file: StateFile) -> str:
    """The model a state file names: where it was found, else how it was asked for."""
    resolved = Path(state_file.model_resolved)
    return str(resolved) if resolved.is_file() else state_file.model_spec
