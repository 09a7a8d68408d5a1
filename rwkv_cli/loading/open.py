"""Opening a model (and optionally a saved state) the way every command needs it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console

from rwkv_cli.demo import DEMO_SPEC
from rwkv_cli.device import compute_dtype, resolve_device, resolve_dtype, use_own_stream
from rwkv_cli.errors import (
    DamagedFileError,
    HubUnreachableError,
    InvalidInputError,
    ModelNotFoundError,
    NotCachedError,
    TokenizerError,
)
from rwkv_cli.generation import Session
from rwkv_cli.kernels import kernels_to_build, prepare_kernels
from rwkv_cli.kernels.build import set_kernel_choice
from rwkv_cli.loading.converted import load_model_cached
from rwkv_cli.loading.hub import resolve_model
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.provenance import Provenance
from rwkv_cli.models import Model
from rwkv_cli.settings import DEFAULT_MODEL, ModelRequest
from rwkv_cli.statefile import StateFile, is_pytorch_file, read_state_file
from rwkv_cli.statetuning import import_state_tuning, read_state_tuning
from rwkv_cli.tokenizer import tokenizer_by_name, tokenizer_for_vocab
from rwkv_cli.tokenizer.base import Tokenizer
from rwkv_cli.tokenizer.bpe import BPETokenizer, bpe_name, bundled_tokenizer_path
from rwkv_cli.ui import activity


@dataclass(frozen=True)
class Start:
    """A loaded model and the session to continue from (a fresh one without a state file)."""

    loaded: LoadedModel
    session: Session
    state_file: StateFile | None = None


def open_model(
    request: ModelRequest | str,
    console: Console | None = None,
    saved_tokenizer: str | None = None,
) -> LoadedModel:
    """Load the model a request (or just a spec) names: a local checkpoint, a Hub file, an alias
    (downloading it on first use) or the demo model, through the converted-weights cache; without
    a spec, the default model. For the tokenizer see ``choose_tokenizer``.

    The device (default the CPU) and weight type (default fp16 on a GPU, fp32 on the CPU) are
    checked before anything is read. On the CPU the activations are float32 whatever the weights.
    """
    if isinstance(request, str):
        request = ModelRequest(request)
    if request.kernel is not None:
        set_kernel_choice(request.kernel)
    target = resolve_device(request.device)
    dtype = request.dtype
    weights = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, target)
    spec = request.spec or default_model(console)
    resolved = _resolve(spec, request.revision, console)
    use_own_stream(target)
    with activity(console, f"Loading {resolved.path.name}"):
        model = _load(resolved, weights, target)
    # Now rather than in the middle of the first reply; a build (first use) gets a spinner.
    building = console if kernels_to_build(target) else None
    how_long = _BUILD_TIME.get(target.type, "first use only")
    with activity(building, f"Building the compiled kernels ({how_long})"):
        prepare_kernels(target)
    chosen = choose_tokenizer(resolved, model.vocab_size, request.tokenizer, saved_tokenizer)
    return LoadedModel(model, chosen, spec, resolved)


# How long a first build takes, measured (README "Fast CPU path" and "GPUs").
_BUILD_TIME = {"cpu": "first use only; a few seconds", "cuda": "first use only; about a minute"}


def choose_tokenizer(
    resolved: Provenance, vocab_size: int, name: str | None, saved: str | None = None
) -> Tokenizer:
    """The tokenizer of a model with ``vocab_size`` rows.

    A local checkpoint with a ``tokenizer.json`` in its folder (the demo model) uses that file,
    unless ``name`` names another tokenizer. Otherwise ``name`` ("world", "20b", ...) decides, and
    without it the vocabulary size (65536: World; 50277 or 50304: 20B). Without ``name``, the
    tokenizer a state file was ``saved`` with comes first where it fits this model; where it does
    not, the state file's own check says what differs.
    """
    if name is None and saved is not None:
        with contextlib.suppress(TokenizerError):
            return choose_tokenizer(resolved, vocab_size, saved)
    bundled = bundled_tokenizer_path(resolved.path) if resolved.repo_id is None else None
    if bundled is not None and (name is None or name.lower() == bpe_name(bundled)):
        return BPETokenizer.from_file(bundled, vocab_size=vocab_size)
    if name is None:
        return tokenizer_for_vocab(vocab_size)
    return tokenizer_by_name(name, vocab_size=vocab_size)


def _load(resolved: Provenance, weights: torch.dtype, target: torch.device) -> Model:
    """The model, through the converted-weights cache, on ``target``. A damaged download's
    error says how to fetch that very file again."""
    try:
        model = load_model_cached(resolved.path, weights, compute_dtype(weights, target))
    except DamagedFileError as error:
        if resolved.repo_id is None:
            raise
        again = f"{resolved.hub_spec} --revision {resolved.revision} --force"
        raise DamagedFileError(
            error.message, hint=f"fetch it again: rwkv download {again}"
        ) from error
    return model.to(target)


def _resolve(spec: str, revision: str | None, console: Console | None) -> Provenance:
    """``resolve_model``; when the default model can be neither found in the cache nor
    downloaded, the error says so and suggests the demo model, which is always there."""
    try:
        return resolve_model(spec, revision, console=console)
    except (NotCachedError, HubUnreachableError) as error:
        if spec.strip().lower() != DEFAULT_MODEL:
            raise
        message = error.message  # "... is not in the local cache and HF_HUB_OFFLINE is set"
        if isinstance(error, HubUnreachableError):
            not_here = f"{DEFAULT_MODEL} is not in the local cache and cannot be downloaded"
            message = f"{not_here}: {message}"
        raise type(error)(
            message,
            hint=f"try the small demo model that ships with rwkv-cli: -m {DEMO_SPEC} "
            f"(or: {error.hint})",
        ) from error


def open_start(
    request: ModelRequest,
    state_path: Path | None = None,
    force: bool = False,
    console: Console | None = None,
) -> Start:
    """Load the model, and the saved state to continue from if ``state_path`` is given.

    Without a spec the model is the one the state file names, or else the default model;
    without a tokenizer, a state file's tokenizer, or else the one the vocabulary implies.
    A BlinkDL state-tuning file does not record its model, so it needs a spec. A state file
    loads on any device; ``force`` resumes one made by a model with other weights.
    """
    if state_path is None:
        return Start(open_model(request, console), Session())
    if is_pytorch_file(state_path):
        read_state_tuning(state_path)  # first: a model checkpoint given as a state says so
        if request.spec is None:
            raise InvalidInputError(
                f"{state_path} is a state-tuning file, which does not record its model",
                hint="pass the model it was trained for with -m MODEL",
            )
        loaded = open_model(request, console)
        return Start(loaded, import_state_tuning(state_path, loaded.model))
    state_file = read_state_file(state_path)
    saved = state_file.identity.tokenizer
    if request.spec is None:
        loaded = _open_saved_model(
            state_file, console, replace(request, tokenizer=request.tokenizer or saved)
        )
    else:
        loaded = open_model(request, console, saved_tokenizer=saved)
    session = state_file.session_for(loaded.model, loaded.tokenizer.name, force=force)
    return Start(loaded, session, state_file)


def default_model(console: Console | None) -> str:
    """The model used when none is named, announced so the download is no surprise."""
    if console is not None:
        console.print(
            f"[dim]No model given: using the default, {DEFAULT_MODEL} (-m to choose)[/dim]"
        )
    return DEFAULT_MODEL


def _open_saved_model(
    state_file: StateFile, console: Console | None, request: ModelRequest
) -> LoadedModel:
    """The model a state file names: exactly where it was found, else how it was asked for."""
    found = state_file.provenance
    if found.hub_spec is not None:
        request = replace(request, spec=found.hub_spec, revision=found.revision)
    elif found.path is not None and found.path.is_file():
        request = replace(request, spec=str(found.path), revision=None)
    else:
        request = replace(request, spec=state_file.model_spec, revision=None)
    try:
        loaded = open_model(request, console)
    except ModelNotFoundError as error:  # a state from another machine, or a model moved away
        hint = f"pass that model ({state_file.identity.describe()}) with -m MODEL"
        if isinstance(error, NotCachedError):
            hint = f"{hint}, or {error.hint}"
        raise type(error)(
            f"{state_file.path} was made with a model that is not here: {error.message}", hint
        ) from error
    return replace(loaded, spec=state_file.model_spec)
