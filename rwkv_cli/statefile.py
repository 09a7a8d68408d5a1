"""State files: a saved :class:`Session` and everything needed to check and resume it.

Format version 2 is a safetensors file (layout in the README, "The state file"). Tensors:
``blocks.{i}.*`` (the model's recurrent state, float32), ``logits`` (next-token logits),
``sampling.counts`` (penalty occurrence counts) and ``sampling.rng_state`` (uint8, the sampler's
torch generator). String metadata names the model, the format, and how the state was made, and
holds the SHA-256 of the tensor data (version 1 files, without it, load unchecked), and where
the model was found as fields (:class:`Provenance`; older files hold only a string, still read).

BlinkDL "state tuning" files (``.pth`` with ``blocks.N.att.time_state``) load as initial states
(:mod:`rwkv_cli.statetuning`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_tensors
from safetensors.torch import save as safetensors_bytes

from rwkv_cli.errors import RwkvCliError, StateFileError
from rwkv_cli.fileio import atomic_write_bytes
from rwkv_cli.generation import Session
from rwkv_cli.loading.checkpoint import (
    GENERATION_NAMES,
    first_non_finite,
    is_model_checkpoint,
    is_state_tuning,
    read_tensors,
)
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.models import Model
from rwkv_cli.sampling import SamplingParams
from rwkv_cli.version import __version__

if TYPE_CHECKING:
    from rwkv_cli.loading.loaded import LoadedModel

FORMAT_NAME = "rwkv-cli-state"
FORMAT_VERSION = 2  # 2: the metadata holds the tensor data's SHA-256
_UNCHECKED_VERSION = "1"  # files from before the checksum: read without it
CHECKSUM = "tensors_sha256"  # the metadata key
TEXT_TAIL_CHARS = 2000  # how much of the text read so far a state file keeps, for display only
_LOGITS, _COUNTS, _RNG = "logits", "sampling.counts", "sampling.rng_state"
# A chat that began after a saved state (a document, a state-tuning file) keeps that state too,
# so its transcript can be read again from there (/undo, /system, /reset after a resume).
_CHAT_START = "chat_start."
_FORCE_HINT = "if the model is a fine-tune of the one that made the state, pass --force"


@dataclass(frozen=True)
class ModelIdentity:
    """What a state depends on: the model's shape, tokenizer and exact weights."""

    generation: str
    n_layer: int
    n_embd: int
    head_size: int  # 0 for RWKV-4, which has no heads
    vocab_size: int
    tokenizer: str
    fingerprint: str

    @classmethod
    def of(cls, model: Model, tokenizer_name: str) -> ModelIdentity:
        config = model.config
        return cls(
            generation=model.generation,
            n_layer=config.n_layer,
            n_embd=config.n_embd,
            head_size=getattr(config, "head_size", 0),
            vocab_size=config.vocab_size,
            tokenizer=tokenizer_name,
            fingerprint=model.fingerprint,
        )

    def describe(self) -> str:
        name = GENERATION_NAMES.get(self.generation, f"RWKV-{self.generation}")
        return f"{name} L{self.n_layer} D{self.n_embd}"

    def difference(self, model: ModelIdentity) -> tuple[str, str | None] | None:
        """How a state made by ``self`` does not fit ``model``: (message, hint), or None."""
        if (self.generation, self.n_layer, self.n_embd) != (
            model.generation,
            model.n_layer,
            model.n_embd,
        ):
            return f"state was made by {self.describe()}; model is {model.describe()}", None
        if self.head_size != model.head_size:
            return f"state has head size {self.head_size}; model has {model.head_size}", None
        if self.vocab_size != model.vocab_size:
            return (
                f"state was made with a vocabulary of {self.vocab_size} tokens; "
                f"model has {model.vocab_size}",
                None,
            )
        if self.tokenizer != model.tokenizer:
            return f"state used tokenizer {self.tokenizer}; model uses {model.tokenizer}", None
        if self.fingerprint != model.fingerprint:
            return (
                f"state was made by other weights of the same shape (fingerprint "
                f"{self.fingerprint}; model's is {model.fingerprint})",
                _FORCE_HINT,
            )
        return None


@dataclass(frozen=True)
class StateFile:
    """The contents of a state file, read without needing the model."""

    path: Path
    identity: ModelIdentity
    state_tensors: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    counts: torch.Tensor | None
    rng_state: torch.Tensor | None
    model_spec: str  # as the user gave it
    provenance: Provenance  # where the model was found
    tokens_consumed: int
    created: str
    tool_version: str
    sampling: SamplingParams | None = None
    seed: int | None = None
    text_tail: str = ""
    chat: dict | None = None  # transcript and template, for chat sessions
    metadata: dict[str, str] = field(default_factory=dict)
    chat_start: dict[str, torch.Tensor] = field(default_factory=dict)  # state before the chat

    @property
    def model_resolved(self) -> str:
        """Where the model was found, to show: an absolute path, or repo:file@commit."""
        return self.provenance.resolved

    def session_for(self, model: Model, tokenizer_name: str, force: bool = False) -> Session:
        """The saved session, after checking it fits ``model``; StateFileError if not."""
        problem = self.identity.difference(ModelIdentity.of(model, tokenizer_name))
        if problem is not None and not (force and problem[1] == _FORCE_HINT):
            message, hint = problem
            made_with = f"it was made with {self.model_spec} ({self.identity.describe()})"
            raise StateFileError(message, hint=hint or f"{made_with}: use that model")
        return self._session(model, self.state_tensors, self.logits, self.counts)

    def chat_start_session(self, model: Model) -> Session | None:
        """The session a saved chat began from, when that was not a fresh start (checked with
        ``session_for`` first); None for files that do not hold it."""
        if not self.chat_start:
            return None
        blocks = {name: t for name, t in self.chat_start.items() if name.startswith("blocks.")}
        start_tokens = int((self.chat or {}).get("start_tokens", 0))
        return self._session(model, blocks, self.chat_start.get(_LOGITS), None, start_tokens)

    def _session(self, model, tensors, logits, counts, tokens: int | None = None) -> Session:
        try:
            state = model.new_state().with_tensors(tensors)
        except ValueError as error:
            raise StateFileError(f"state file {self.path} is corrupt: {error}") from error
        logits, counts = (None if t is None else t.to(model.device) for t in (logits, counts))
        return Session(state, logits, counts, self.tokens_consumed if tokens is None else tokens)

    def restore_generator(self, generator: torch.Generator) -> bool:
        """Continue the saved sampler's random sequence; False when the file has none."""
        if self.rng_state is None:
            return False
        try:
            generator.set_state(self.rng_state)
        except RuntimeError as error:
            raise StateFileError(f"state file {self.path} has a corrupt RNG state") from error
        return True

    def info(self) -> dict:
        """Everything about the file, as plain JSON-able values (for ``load-state --info``)."""
        state_bytes = sum(t.numel() * t.element_size() for t in self.state_tensors.values())
        return {
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "state_bytes": state_bytes,
            "format": f"{FORMAT_NAME} {self.metadata.get('format_version', '')}",
            "model": self.model_spec,
            "model_resolved": self.model_resolved,
            "architecture": self.identity.describe(),
            "generation": self.identity.generation,
            "n_layer": self.identity.n_layer,
            "n_embd": self.identity.n_embd,
            "head_size": self.identity.head_size,
            "vocab_size": self.identity.vocab_size,
            "tokenizer": self.identity.tokenizer,
            "fingerprint": self.identity.fingerprint,
            "tokens_consumed": self.tokens_consumed,
            "created": self.created,
            "tool_version": self.tool_version,
            "sampling": self.sampling.to_dict() if self.sampling else None,
            "seed": self.seed,
            "has_logits": self.logits is not None,
            "has_rng_state": self.rng_state is not None,
            "chat": self.chat is not None,
            "text_tail": self.text_tail,
        }


def save_state_file(
    path: str | Path,
    loaded: LoadedModel,
    session: Session,
    *,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    text_tail: str = "",
    chat: dict | None = None,
    chat_start: Session | None = None,
) -> None:
    """Write ``session`` of the model ``loaded``, and where that model came from, to ``path``
    atomically (format version 2). ``sampling``, ``seed`` and ``generator`` let a resumed run
    sample exactly as this one would have; ``text_tail`` is the text read so far, for display.
    A chat saves its transcript as ``chat``, and the state it began from, if not a fresh one, as
    ``chat_start``."""
    model = loaded.model
    state = session.state if session.state is not None else model.new_state()
    tensors = {name: _stored(tensor) for name, tensor in state.named_tensors().items()}
    if chat_start is not None and chat_start.state is not None:
        for name, tensor in chat_start.state.named_tensors().items():
            tensors[_CHAT_START + name] = _stored(tensor)
        if chat_start.logits is not None:
            tensors[_CHAT_START + _LOGITS] = _stored(chat_start.logits)
    if session.logits is not None:
        tensors[_LOGITS] = _stored(session.logits)
    if session.counts is not None:
        tensors[_COUNTS] = _stored(session.counts)
    if generator is not None:
        tensors[_RNG] = generator.get_state()
    identity = ModelIdentity.of(model, loaded.tokenizer.name)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "generation": identity.generation,
        "n_layer": str(identity.n_layer),
        "n_embd": str(identity.n_embd),
        "head_size": str(identity.head_size),
        "vocab_size": str(identity.vocab_size),
        "tokenizer": identity.tokenizer,
        "fingerprint": identity.fingerprint,
        "model": loaded.spec,
        **loaded.provenance.to_metadata(),
        "tokens_consumed": str(session.tokens_consumed),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__,
        "text_tail": text_tail[-TEXT_TAIL_CHARS:],
    }
    if sampling is not None:
        metadata["sampling"] = json.dumps(sampling.to_dict())
    if seed is not None:
        metadata["seed"] = str(seed)
    if chat is not None:
        metadata["chat"] = json.dumps(chat, ensure_ascii=False)
    metadata[CHECKSUM] = data_checksum(tensors)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def data_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 (hex) of the data section of a safetensors file holding ``tensors``: the
    bytes after the header, which do not depend on the metadata."""
    _, data = _sections(safetensors_bytes(tensors))
    return _sha256(data)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """As state files keep tensors: float32, in CPU memory (a file made on a GPU loads anywhere)."""
    return tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()


def read_state_file(path: str | Path) -> StateFile:
    """Read and structurally check a state file; StateFileError says what is wrong."""
    path = Path(path)
    metadata, tensors, data = _read_safetensors(path)
    _check_format(path, metadata, data)
    broken = first_non_finite(tensors)
    if broken is not None:
        raise StateFileError(f"state file {path} is corrupt: {broken} holds NaN or infinite values")
    try:
        return _state_file_from(path, metadata, tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise StateFileError(f"state file {path} is corrupt: bad metadata ({error})") from error


def load_state_file(path: str | Path, loaded: LoadedModel, *, force: bool = False) -> Session:
    """The session saved in ``path``, to continue with ``loaded``: StateFileError says what
    differs when the file was made by another model; ``force`` accepts a model of the same
    shape with other weights (a fine-tune)."""
    return read_state_file(path).session_for(loaded.model, loaded.tokenizer.name, force=force)


def _check_format(path: Path, metadata: dict[str, str], data: bytes) -> None:
    """A state file of a version this rwkv-cli reads, whose tensor data is as it was written."""
    version = metadata.get("format_version", "")
    if version not in (_UNCHECKED_VERSION, str(FORMAT_VERSION)):
        raise StateFileError(
            f"{path} is a state file of format version {version or '?'}; "
            f"this rwkv-cli reads versions up to {FORMAT_VERSION}",
            hint="upgrade rwkv-cli to read newer state files",
        )
    if version != _UNCHECKED_VERSION and metadata.get(CHECKSUM) != _sha256(data):
        raise StateFileError(
            f"state file {path} is corrupt: its tensor data does not match its checksum",
            hint="the file was damaged after it was written (disk, copy or transfer): use "
            "another copy",
        )


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor], bytes]:
    """A state file's metadata, tensors and data section, from one read of the file; a file
    of another kind is named as such from its header alone (a model may be large)."""
    if path.is_dir():
        raise StateFileError(f"{path} is a directory, not a state file")
    if not path.is_file():
        raise StateFileError(f"no such state file: {path}")
    try:
        with safe_open(path, framework="pt") as file:
            if (file.metadata() or {}).get("format") != FORMAT_NAME:
                raise not_a_state_file(path, file.keys())
        contents = path.read_bytes()
        tensors = safetensors_tensors(contents)  # checks the whole layout
        header, data = _sections(contents)
        return header.get("__metadata__") or {}, tensors, data
    except (SafetensorError, OSError, ValueError) as error:
        if is_pytorch_file(path):
            raise not_a_state_file(path, pth_tensors(path)) from error
        raise StateFileError(
            f"state file {path} is truncated or corrupt",
            hint="state files are safetensors files written by rwkv-cli",
        ) from error


def not_a_state_file(path: Path, names: Collection[str]) -> StateFileError:
    """The error for a file given as a state file that is none: what it is, and where it goes."""
    if is_model_checkpoint(names):
        return StateFileError(
            f"{path} is a model checkpoint, not a state file", hint=f"pass it with -m {path}"
        )
    if is_state_tuning(names):
        return StateFileError(
            f"{path} is a BlinkDL state-tuning file, not an rwkv-cli state file",
            hint="it loads as an initial state with --state FILE and its model, -m MODEL",
        )
    return StateFileError(
        f"{path} is not an rwkv-cli state file",
        hint="state files are made by `rwkv save-state` or `--save-state`",
    )


def pth_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .pth given as a state (read memory-mapped, never executed)."""
    try:
        return read_tensors(path)
    except RwkvCliError as error:
        raise StateFileError(error.message, error.hint) from error


def _sections(contents: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header (JSON) and its data section (the tensors' bytes): an 8-byte
    little-endian header size, the header, then the data."""
    size = int.from_bytes(contents[:8], "little")
    return json.loads(contents[8 : 8 + size]), contents[8 + size :]


def _state_file_from(path: Path, metadata: dict[str, str], tensors: dict) -> StateFile:
    identity = ModelIdentity(
        generation=metadata["generation"],
        n_layer=int(metadata["n_layer"]),
        n_embd=int(metadata["n_embd"]),
        head_size=int(metadata["head_size"]),
        vocab_size=int(metadata["vocab_size"]),
        tokenizer=metadata["tokenizer"],
        fingerprint=metadata["fingerprint"],
    )
    for name in (_LOGITS, _COUNTS, _CHAT_START + _LOGITS):
        tensor = tensors.get(name)
        if tensor is not None and tuple(tensor.shape) != (identity.vocab_size,):
            raise ValueError(f"{name} has shape {list(tensor.shape)}")
    sampling = metadata.get("sampling")
    chat = metadata.get("chat")
    return StateFile(
        path=path,
        identity=identity,
        state_tensors={name: t for name, t in tensors.items() if name.startswith("blocks.")},
        logits=tensors.get(_LOGITS),
        counts=tensors.get(_COUNTS),
        rng_state=tensors.get(_RNG),
        model_spec=metadata["model"],
        provenance=Provenance.from_metadata(metadata, metadata["model"]),
        tokens_consumed=int(metadata["tokens_consumed"]),
        created=metadata.get("created", ""),
        tool_version=metadata.get("tool_version", ""),
        sampling=SamplingParams.from_dict(json.loads(sampling)) if sampling else None,
        seed=int(metadata["seed"]) if "seed" in metadata else None,
        text_tail=metadata.get("text_tail", ""),
        chat=json.loads(chat) if chat else None,
        metadata=metadata,
        chat_start={
            name.removeprefix(_CHAT_START): t
            for name, t in tensors.items()
            if name.startswith(_CHAT_START)
        },
    )


def state_file_kind(path: str | Path) -> Literal["chat", "state"] | None:
    """What ``path`` holds, from its header alone: "chat" for a saved chat, "state" for another
    state file (a document read once, say), None for anything else."""
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    if metadata.get("format") != FORMAT_NAME:
        return None
    return "chat" if "chat" in metadata else "state"


def is_pytorch_file(path: str | Path) -> bool:
    """Whether ``path`` is a PyTorch .pth (a zip archive): as a state, a BlinkDL state-tuning
    file, or a model checkpoint given in the wrong place."""
    try:
        with Path(path).open("rb") as file:
            return file.read(4) == b"PK\x03\x04"
    except OSError:
        return False
