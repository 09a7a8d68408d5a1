"""BlinkDL "state tuning" files: a ``.pth`` of ``blocks.N.att.time_state`` tensors, trained for
one model, loaded as that model's initial state."""

from __future__ import annotations

from pathlib import Path

import torch

from rwkv_cli.errors import StateFileError
from rwkv_cli.generation import Session
from rwkv_cli.loading.checkpoint import first_non_finite, is_state_tuning
from rwkv_cli.models import Model
from rwkv_cli.statefile import not_a_state_file, pth_tensors


def read_state_tuning(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``time_state`` tensors of a BlinkDL state-tuning file; for any other file a
    StateFileError saying what it is (a model checkpoint given as a state says so)."""
    path = Path(path)
    tensors = pth_tensors(path)
    if not is_state_tuning(tensors):
        raise not_a_state_file(path, tensors)
    return tensors


def import_state_tuning(path: str | Path, model: Model) -> Session:
    """An initial session from a BlinkDL state-tuning file: its ``time_state`` per layer.

    Token-shift states start at zero, as in BlinkDL's demos; no token has been read, so the
    session has no logits yet. RWKV-7 stores ``time_state`` as [head, value, key], our layout.
    """
    path = Path(path)
    states = read_state_tuning(path)
    template = model.new_state()
    named = template.named_tensors()
    for name, tensor in states.items():
        target = name.replace(".att.time_state", ".att.wkv")
        if target not in named:
            raise StateFileError(
                f"state-tuning file {path} has {name}, but the model has no such layer"
            )
        if tensor.shape != named[target].shape:
            raise StateFileError(
                f"state-tuning file {path} does not fit the model: {name} has shape "
                f"{list(tensor.shape)}, model needs {list(named[target].shape)}",
                hint="a state-tuning file only works with the model it was trained on",
            )
        named[target] = tensor.float()
    broken = first_non_finite(states)
    if broken is not None:
        raise StateFileError(f"state-tuning file {path} holds non-finite values in {broken}")
    missing = len(template.layers) - len(states)
    if missing:
        raise StateFileError(f"state-tuning file {path} lacks {missing} of the model's layers")
    return Session(template.with_tensors(named))
