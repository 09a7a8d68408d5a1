"""The errors rwkv-cli reports to users.

Every error the CLI expects carries a one-line message and, where it helps, a hint saying what to
do. The CLI's single error boundary prints them as ``Error: ...`` / ``Hint: ...`` and exits 1.
"""

from __future__ import annotations


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


class UnsupportedModelError(RwkvCliError):
    """A readable checkpoint of a generation or layout this version cannot run."""


class TokenizerError(RwkvCliError):
    """The tokenizer's data is missing or does not fit the model."""


class InvalidInputError(RwkvCliError):
    """User input that cannot be used: bad option values, undecodable stdin, empty prompt."""
