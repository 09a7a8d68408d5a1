"""The errors rwkv-cli reports to users.

Every error the CLI expects carries a one-line message and, where it helps, a hint saying what to
do. The CLI's single error boundary prints them as ``Error: ...`` / ``Hint: ...`` and exits 1.
"""

from __future__ import annotations

EXIT_ERROR = 1  # a known error, reported on one line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell convention for Ctrl-C


class RwkvCliError(Exception):
    """Base class: a failure the user can understand and act on."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelNotFoundError(RwkvCliError):
    """The model spec names nothing that exists."""


class CheckpointError(RwkvCliError):
    """The file exists but is not a readable RWKV checkpoint (corrupt, truncated, wrong kind)."""


class DamagedFileError(CheckpointError):
    """A checkpoint file that is truncated or corrupt: the same file, fetched or copied again,
    would work. For a Hub file the hint names ``rwkv download --force``."""


class UnsupportedModelError(RwkvCliError):
    """A readable checkpoint of a generation or layout this version cannot run."""


class ModelOutputError(RwkvCliError):
    """The model's scores for the next token are not numbers (nan, inf): nothing can be sampled.
    16-bit overflow or damaged weights; the hint suggests fp32."""


class TokenizerError(RwkvCliError):
    """The tokenizer's data is missing or does not fit the model."""


class InvalidInputError(RwkvCliError):
    """User input that cannot be used: bad option values, undecodable stdin, empty prompt."""


class StateFileError(RwkvCliError):
    """A state file that cannot be read or does not fit the model it is used with."""


class MissingExtraError(RwkvCliError):
    """An optional dependency a feature needs is not installed; the hint names the extra."""


class WriteError(RwkvCliError):
    """A file could not be written (disk full, permissions); the previous file is untouched."""


class HubUnreachableError(RwkvCliError):
    """The Hub (or ``HF_ENDPOINT``) could not be reached, or a download broke off, and no cached
    copy can stand in. The hint suggests ``HF_HUB_OFFLINE=1`` (cached models only) or a local
    path; for an interrupted download it says that running again resumes."""


class RepoNotFoundError(ModelNotFoundError):
    """The Hub has no repository of that name (HTTP 404). The hint points at ``rwkv models``."""


class RemoteFileNotFoundError(ModelNotFoundError):
    """The repository exists but not the file (or no file matches the alias); the hint lists the
    checkpoint files the repository does have."""


class HubAccessError(RwkvCliError):
    """The Hub refused access: a private or gated repo without a (valid) token. The hint suggests
    setting ``HF_TOKEN``."""


class NotCachedError(ModelNotFoundError):
    """``HF_HUB_OFFLINE=1`` is set and the model is not in the local cache. The hint says to unset
    it or pass a local path."""


class DiskFullError(RwkvCliError):
    """No space left for a download or a cache file; nothing half-written is left behind. The hint
    says where more room can come from (``HF_HOME``/``HF_HUB_CACHE``, ``RWKV_CLI_HOME``)."""


class ChecksumMismatchError(RwkvCliError):
    """A downloaded file does not match the Hub's checksum and was deleted. The hint suggests
    running again and checking ``HF_ENDPOINT``/proxies if it persists."""
