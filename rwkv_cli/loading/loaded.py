"""What opening a model gives: the model, its tokenizer, and the spec and file it came from.

Apart from :mod:`rwkv_cli.loading.open`, so that state files can name it without importing the
loading that reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rwkv_cli.loading.provenance import Provenance

if TYPE_CHECKING:
    from rwkv_cli.models import Model
    from rwkv_cli.tokenizer.base import Tokenizer


@dataclass(frozen=True)
class LoadedModel:
    """A model with its tokenizer, the spec it was asked for by and where it was found."""

    model: Model
    tokenizer: Tokenizer
    spec: str  # as the user gave it
    provenance: Provenance

    @property
    def resolved(self) -> str:
        """Where it was found, to show: an absolute path, or repo:file@commit."""
        return self.provenance.resolved
