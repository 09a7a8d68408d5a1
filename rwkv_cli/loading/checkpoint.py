"""Read RWKV checkpoint files and tell which RWKV generation they hold.

Two containers are read: BlinkDL's ``.pth`` files (``torch.save`` zip pickles, opened only with
``weights_only=True`` so nothing in the file is executed) and ``.safetensors`` files. The container
is recognised from the file's first bytes, never from its name, and so is the generation: from the
tensor names (docs/DESIGN.md section 3).
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import re
import zipfile
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from rwkv_cli.errors import (
    CheckpointError,
    DamagedFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)

_DAMAGED_HINT = "download or copy the file again"

GENERATION_NAMES = {
    "4": "RWKV-4",
    "5.0": "RWKV-5.0",
    "5.1": "RWKV-5.1",
    "5.2": "RWKV-5.2",
    "6": "RWKV-6",
    "7": "RWKV-7",
}

_ZIP_MAGIC = b"PK\x03\x04"
_FORMATS_HINT = (
    "rwkv-cli reads BlinkDL's RWKV-4 to RWKV-7 .pth files (or the same as safetensors) "
    "and Hugging Face transformers RWKV-4 weights"
)
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class Checkpoint:
    """The tensors of one checkpoint file and the RWKV generation they belong to."""

    path: Path
    generation: str
    tensors: dict[str, torch.Tensor]


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint file and detect its generation; raise a user-facing error if unusable.

    Hugging Face transformers RWKV-4 weights (``pytorch_model.bin`` or ``model.safetensors``) are
    renamed to BlinkDL's layout, so they run exactly like the ``.pth`` they were converted from.
    """
    path = Path(path)
    tensors = read_tensors(path)
    with naming_the_file(path):
        if is_transformers_layout(tensors):
            tensors = from_transformers_layout(tensors)
            generation = detect_generation(tensors)
            if generation != "4":
                raise UnsupportedModelError(
                    f"{GENERATION_NAMES[generation]} in the Hugging Face transformers layout is "
                    "not supported (only RWKV-4 is)",
                    hint="use BlinkDL's original .pth release of the same model",
                )
        else:
            generation = detect_generation(tensors)
    broken = first_non_finite(tensors)
    if broken is not None:  # every output would be NaN: say so now, naming the tensor
        raise CheckpointError(
            f"{path} holds NaN or infinite values in {broken}",
            hint="the weights themselves are broken (a training run that diverged?): use "
            "another copy or release",
        )
    return Checkpoint(path=path, generation=generation, tensors=tensors)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@contextlib.contextmanager
def naming_the_file(path: Path) -> Iterator[None]:
    """Put ``path`` in front of an error about a checkpoint's contents raised in the block (a
    model given by alias or folder does not say which file it is)."""
    try:
        yield
    except (CheckpointError, UnsupportedModelError) as error:
        if str(path) in error.message:
            raise
        raise type(error)(f"{path}: {error.message}", error.hint) from error


# Hugging Face transformers' RwkvForCausalLM (RWKV-4) names the same tensors differently, and
# stores the same values (its converter only renames keys; time_decay is kept raw and exponentiated
# at run time, as in BlinkDL's files). Applied in order to every key but head.weight.
_TRANSFORMERS_PREFIX = "rwkv."
_TRANSFORMERS_RENAMES = (
    (re.compile(r"^embeddings\."), "emb."),
    (re.compile(r"^blocks\.0\.pre_ln\."), "blocks.0.ln0."),
    (re.compile(r"^(blocks\.\d+)\.attention\."), r"\1.att."),
    (re.compile(r"^(blocks\.\d+)\.feed_forward\."), r"\1.ffn."),
    (re.compile(r"\.time_mix_key$"), ".time_mix_k"),
    (re.compile(r"\.time_mix_value$"), ".time_mix_v"),
    (re.compile(r"\.time_mix_receptance$"), ".time_mix_r"),
)


def is_transformers_layout(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether the tensors are named like transformers' RWKV models (``rwkv.blocks.0....``)."""
    return "rwkv.embeddings.weight" in tensors


def from_transformers_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under BlinkDL's names (``rwkv.blocks.0.attention.key.weight`` ->
    ``blocks.0.att.key.weight``); names it does not know are kept as they are."""
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith(_TRANSFORMERS_PREFIX):
            name = name.removeprefix(_TRANSFORMERS_PREFIX)
            for pattern, replacement in _TRANSFORMERS_RENAMES:
                name = pattern.sub(replacement, name)
        renamed[name] = tensor
    return renamed


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Return the flat name -> tensor dict stored in a ``.pth`` or ``.safetensors`` file."""
    if not path.exists():
        raise ModelNotFoundError(
            f"no such file: {path}", hint="pass the path to an RWKV .pth or .safetensors file"
        )
    if path.is_dir():
        raise ModelNotFoundError(
            f"{path} is a directory, not a checkpoint file",
            hint="pass the path to an RWKV .pth or .safetensors file",
        )
    with path.open("rb") as file:
        head = file.read(9)
    if head.startswith(_ZIP_MAGIC):
        tensors = _read_pth(path)
    elif _looks_like_safetensors(head):
        tensors = _read_safetensors(path)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a PyTorch (.pth) nor a safetensors file",
            hint="RWKV checkpoints are BlinkDL .pth files or .safetensors files",
        )
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file starts with an 8-byte little-endian header size, then a JSON '{'."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors, so it was not loaded",
            hint="only plain tensor checkpoints are read; nothing in a file is ever executed",
        ) from error
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise DamagedFileError(
            f"{path} is truncated or corrupt ({_first_line(error)})", hint=_DAMAGED_HINT
        ) from error
    if not isinstance(loaded, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CheckpointError(f"{path} is a PyTorch file but not a flat dict of named tensors")
    return loaded


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise DamagedFileError(
            f"{path} is truncated or corrupt ({_first_line(error)})", hint=_DAMAGED_HINT
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def detect_generation(tensors: dict[str, torch.Tensor]) -> str:
    """Name the RWKV generation ("4", "5.0", "5.1", "5.2", "6", "7") from the tensor names."""
    names = set(tensors)
    _reject_non_models(names)
    block_names = {match.group(2) for name in names if (match := _BLOCK_KEY.match(name))}
    if "att.r_k" in block_names or "att.x_r" in block_names:
        return "7"
    if "att.time_maa_x" in block_names:
        return "6"
    if "att.ln_x.weight" in block_names:
        if "att.gate.weight" not in block_names:
            return "5.0"
        decay = tensors.get("blocks.0.att.time_decay")
        if decay is not None and decay.squeeze().dim() > 1:
            return "5.2"
        return "5.1"
    if "att.time_decay" in block_names and "att.time_first" in block_names:
        return "4"
    raise UnsupportedModelError(
        "unrecognised checkpoint layout: the tensor names match no RWKV generation",
        hint=_FORMATS_HINT,
    )


def is_model_checkpoint(names: Collection[str]) -> bool:
    """Whether tensors of these names are a model: BlinkDL's layout or transformers'."""
    return "emb.weight" in names or "rwkv.embeddings.weight" in names


def is_state_tuning(names: Collection[str]) -> bool:
    """Whether tensors of these names are a BlinkDL state-tuning file: ``time_state``s only."""
    return bool(names) and all(name.endswith(".att.time_state") for name in names)


def _reject_non_models(names: set[str]) -> None:
    """Explain files that are RWKV-related but are not a BlinkDL-format model."""
    if is_state_tuning(names):
        raise UnsupportedModelError(
            "this is an RWKV state-tuning file (only time_state tensors), not a model",
            hint="pass the base model with -m; state files load as initial states",
        )
    if any(name.endswith(".ffn.shift") for name in names):  # every layer of a saved state has one
        raise UnsupportedModelError(
            "this is an rwkv-cli state file, not a model",
            hint="pass it with --state FILE or to rwkv load-state FILE (-m names its model)",
        )
    if any(name.startswith(("rwkv.", "model.")) for name in names):
        raise UnsupportedModelError(
            "this checkpoint uses a Hugging Face transformers layout rwkv-cli does not read "
            "(it reads transformers' RWKV-4 only)",
            hint="use BlinkDL's original .pth release of the same model",
        )
    missing = [name for name in ("emb.weight", "head.weight") if name not in names]
    if missing:
        raise UnsupportedModelError(
            f"not an RWKV model: no {' or '.join(missing)} tensor",
            hint=_FORMATS_HINT,
        )


FINGERPRINT_SAMPLES = 256  # elements read per tensor: enough to tell fine-tunes apart, fast on 14B


def weights_fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """A short hash identifying these exact weights, cheap even for multi-GB checkpoints.

    SHA-256 over every tensor's name and shape and 256 evenly spaced elements (as float32), in
    name order; the first 16 hex digits. The same weights give the same fingerprint whether they
    come from a bf16 .pth or a safetensors copy; a fine-tune changes nearly every element.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}:{list(tensor.shape)};".encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            steps = torch.arange(FINGERPRINT_SAMPLES, dtype=torch.int64)
            positions = steps * (flat.numel() - 1) // (FINGERPRINT_SAMPLES - 1)
            samples = flat[positions].float()  # a fresh tensor: its storage is exactly these
            digest.update(bytes(samples.untyped_storage()))  # no numpy: not a dependency
    return digest.hexdigest()[:16]


def layer_count(names: Iterable[str]) -> int:
    """Number of blocks: one more than the highest ``blocks.N`` index."""
    indices = [int(match.group(1)) for name in names if (match := _BLOCK_KEY.match(name))]
    if not indices:
        raise CheckpointError("checkpoint has no blocks.N tensors")
    return max(indices) + 1
