"""The converted-weights cache: each checkpoint is prepared once, then memory-mapped.

The first load of a checkpoint reads it (``.pth`` only with ``weights_only=True``), validates it,
puts it into the layout the model runs on (``Model.prepare``: ln0 folded, vectors squeezed, the
compute dtype) and writes that as safetensors under ``$RWKV_CLI_HOME/converted``. Later loads
memory-map that file: no pickle, no copy, and pages are only read as the model touches them.

Converted files are keyed by the SHA-256 of the source file. A file in the Hugging Face cache is
stored under its SHA-256 already; any other file is hashed once and the hash remembered against
its size and modification time, so a changed file is converted again.
A conversion deletes the converted copies of the file's earlier contents, so a checkpoint that a
training run rewrites keeps one copy, not one per version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rwkv_cli.errors import RwkvCliError, WriteError
from rwkv_cli.fileio import (
    atomic_write,
    atomic_write_bytes,
    check_free_space,
    exclusive,
    remove_leftovers,
)
from rwkv_cli.loading.checkpoint import load_checkpoint, naming_the_file, weights_fingerprint
from rwkv_cli.loading.filerows import FileRows
from rwkv_cli.models import Model, model_class
from rwkv_cli.paths import converted_dir

LAYOUT = "rwkv-cli-prepared"
LAYOUT_VERSION = 3  # bump when prepare() changes what it stores (3: (out, in) again, int8 scales)
_HF_BLOB = re.compile(r"^[0-9a-f]{64}$")
_LAYOUT_SUFFIX = re.compile(r"-v(\d+)\.safetensors$")
_INDEX = "hashes.json"
_HASH_BLOCK = 16 * 1024 * 1024
EMBEDDING = "emb.weight"
_SPACE_HINT = "free some space, or set RWKV_CLI_HOME to a disk with more room"


def load_model_cached(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
) -> Model:
    """The model in ``path``, from the converted cache (converting it on first use), prepared
    in ``dtype`` and running with ``compute_dtype`` activations (see ``from_prepared``)."""
    path = Path(path)
    name = f"{source_hash(path)}-{_dtype_name(dtype)}-v{LAYOUT_VERSION}.safetensors"
    cached = converted_dir() / name
    model = _load_converted(cached, compute_dtype)
    if model is not None:
        return model
    with _one_conversion_at_a_time(cached):  # another process may have converted it meanwhile
        return _load_converted(cached, compute_dtype) or _convert(
            path, cached, dtype, compute_dtype
        )


@contextlib.contextmanager
def _one_conversion_at_a_time(cached: Path) -> Iterator[None]:
    """Convert each checkpoint in one process at a time (a second command waits, then loads the
    result), and first clear what a killed conversion left (a file as large as the model, which
    the free-space check would count). Where the cache cannot be written the conversion runs
    unguarded, and its write says why it failed."""
    with contextlib.ExitStack() as held:
        with contextlib.suppress(OSError):
            held.enter_context(exclusive(cached.with_name(f".{cached.name}.lock")))
        remove_leftovers(cached)
        yield


def _convert(
    path: Path, cached: Path, dtype: torch.dtype, compute_dtype: torch.dtype | None
) -> Model:
    """Read and prepare the checkpoint, write the converted file, and load the model from it."""
    checkpoint = load_checkpoint(path)
    generation = checkpoint.generation
    with naming_the_file(path):
        prepared = model_class(generation).prepare(checkpoint.tensors, dtype)
    fingerprint = weights_fingerprint(checkpoint.tensors)
    metadata = {
        "format": LAYOUT,
        "format_version": str(LAYOUT_VERSION),
        "generation": generation,
        "fingerprint": fingerprint,
        "source": str(path.resolve()),
    }
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(tensor.nbytes for tensor in prepared.values())
        check_free_space(cached.parent, needed, _SPACE_HINT)
        atomic_write(cached, lambda temp: save_file(prepared, temp, metadata=metadata))
    except (RwkvCliError, OSError, SafetensorError) as error:
        warnings.warn(_not_cached_reason(error), stacklevel=2)
        return _build(generation, prepared, fingerprint, compute_dtype)
    _remove_superseded(cached, metadata["source"])
    # Reload from the file so the weights are memory-mapped rather than held in this process.
    return _load_converted(cached, compute_dtype) or _build(
        generation, prepared, fingerprint, compute_dtype
    )


def _remove_superseded(cached: Path, source: str) -> None:
    """Delete the converted files nothing will load again: those of ``source``'s earlier
    contents (a checkpoint rewritten in place, as a training run does), and those in an older
    layout (a newer one may belong to a newer rwkv-cli sharing the folder). Each is as large as
    a model; one that cannot be deleted (in use on Windows, a read-only cache) stays."""
    content_hash = cached.name.split("-", 1)[0]
    for other in cached.parent.glob("*.safetensors"):
        if other.name.startswith(content_hash + "-"):
            continue  # the same contents in another dtype
        layout = _LAYOUT_SUFFIX.search(other.name)
        older_layout = layout is not None and int(layout.group(1)) < LAYOUT_VERSION
        if older_layout or _converted_from(other) == source:
            with contextlib.suppress(OSError):
                other.unlink()


def _converted_from(converted: Path) -> str | None:
    try:
        with safe_open(converted, framework="pt") as file:
            return (file.metadata() or {}).get("source")
    except (SafetensorError, OSError):
        return None


def _not_cached_reason(error: Exception) -> str:
    """The warning for a converted model that could not be cached (it still runs)."""
    if isinstance(error, RwkvCliError):
        hint = f" ({error.hint})" if error.hint else ""
        return f"could not cache the converted model: {error.message}{hint}"
    reason = error.strerror if isinstance(error, OSError) and error.strerror else error
    return f"could not cache the converted model in {converted_dir()}: {reason}"


def _load_converted(cached: Path, compute_dtype: torch.dtype | None) -> Model | None:
    """The model from a converted file, or None if it is missing or unusable (then rebuilt)."""
    if not cached.is_file():
        return None
    try:
        with safe_open(cached, framework="pt") as file:
            metadata = file.metadata() or {}
        layout = (metadata.get("format"), metadata.get("format_version"))
        if layout != (LAYOUT, str(LAYOUT_VERSION)):
            return None
        prepared = load_file(cached)  # memory-mapped
        prepared[EMBEDDING] = FileRows.of(cached, EMBEDDING, prepared[EMBEDDING])
        return _build(metadata["generation"], prepared, metadata["fingerprint"], compute_dtype)
    except (SafetensorError, OSError, KeyError, ValueError):
        cached.unlink(missing_ok=True)
        return None


def _build(
    generation: str,
    prepared: dict[str, torch.Tensor],
    fingerprint: str,
    compute_dtype: torch.dtype | None,
) -> Model:
    model = model_class(generation).from_prepared(prepared, compute_dtype)
    model.fingerprint = fingerprint
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def source_hash(path: Path) -> str:
    """The SHA-256 of a checkpoint file, computed at most once per version of the file."""
    resolved = path.resolve()
    if _HF_BLOB.match(resolved.name) and resolved.parent.name == "blobs":
        return resolved.name  # huggingface_hub stores LFS files under their SHA-256
    stat = resolved.stat()
    signature = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index_path = converted_dir() / _INDEX
    index = _read_index(index_path)
    known = index.get(str(resolved))
    if known is not None and {key: known.get(key) for key in signature} == signature:
        return known["sha256"]
    digest = hashlib.sha256()
    with resolved.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    index[str(resolved)] = {**signature, "sha256": digest.hexdigest()}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(index_path, json.dumps(index, indent=1).encode())
    except (WriteError, OSError):
        pass  # only a speed-up: the file is hashed again next time
    return digest.hexdigest()


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}
