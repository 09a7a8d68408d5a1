"""What a user can set, with its defaults and bounds: sampling parameters, weight types, kernel
choices, tokenizers, thread counts, the default model and the chat's defaults.

Nothing here imports torch, so the command line can declare its options (and answer
``rwkv --help`` or ``--version``) in a fraction of a second; the modules that use these settings
import them from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from rwkv_cli.errors import InvalidInputError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL = "rwkv7-g1-0.1b"
"""The model ``chat`` and ``generate`` use without ``-m``: the smallest RWKV-7 G1 (about 380 MB)."""

DtypeName = Literal["fp32", "fp16", "bf16", "int8", "int4"]  # --dtype's choices
DTYPE_NAMES: tuple[DtypeName, ...] = get_args(DtypeName)

KernelChoice = Literal["auto", "torch", "compiled"]
KERNEL_CHOICES: tuple[KernelChoice, ...] = get_args(KernelChoice)

TOKENIZER_CHOICES = ("world", "20b")  # the short names to offer users


@dataclass(frozen=True)
class ModelRequest:
    """Which model to open and how: what a command's model options say.

    ``spec`` is a local checkpoint, a Hub file (``repo:file``), an alias or ``demo``; None means
    the model a state file names, else :data:`DEFAULT_MODEL`. ``revision`` pins a Hub commit,
    branch or tag. ``device`` is "cpu", "cuda", "cuda:N" or "auto"; ``dtype`` one of
    :data:`DTYPE_NAMES` (None: fp16 on a GPU, fp32 on the CPU). ``tokenizer`` names one of
    :data:`TOKENIZER_CHOICES` (None: the one the model or state file implies). ``kernel``, if
    given, sets the kernel choice, which holds for the whole process (``--kernel``).
    """

    spec: str | None = None
    revision: str | None = None
    device: str | torch.device = "cpu"
    dtype: DtypeName | torch.dtype | None = None
    tokenizer: str | None = None
    kernel: KernelChoice | None = None


# More threads than this only slow a model down; far more (thousands) exhaust the thread
# stacks OpenMP reserves and crash the process.
MAX_THREADS = 4 * (os.cpu_count() or 1)

# torch.Generator.manual_seed accepts any value that fits in an unsigned 64-bit integer.
MAX_SEED = 2**64 - 1
DEFAULT_MAX_BATCH = 16  # sequences decoding together; issue #19's targets are measured at 16

# Below this a temperature is greedy in all but name, and far below it (1e-38) dividing float32
# logits by it overflows to inf and NaN: such values are refused rather than quietly broken.
MIN_TEMPERATURE = 1e-6
# Logits are of order 10, so a penalty of 1e6 already rules a token out; much larger ones
# overflow float32 (1e39 is inf) and would turn every score into NaN.
MAX_PENALTY = 1e6


@dataclass(frozen=True)
class SamplingParams:
    """How to turn logits into a token.

    ``temperature`` 0 means greedy (argmax); ``top_p`` 1 and ``top_k`` 0 disable those filters.
    The penalties subtract ``presence_penalty`` from every token seen so far and
    ``frequency_penalty`` times its decayed count; counts decay by ``penalty_decay`` per token.
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996

    def validated(self) -> SamplingParams:
        """Return ``self`` if every value is usable, else raise :class:`InvalidInputError`."""
        if not _is_number(self.temperature) or not (0 <= self.temperature < math.inf):
            raise InvalidInputError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}",
                hint="use 0 for greedy decoding; 1 leaves the model's distribution unchanged",
            )
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise InvalidInputError(
                f"temperature must be 0 or at least {MIN_TEMPERATURE:g}, got {self.temperature!r}",
                hint="use 0 for greedy decoding",
            )
        if not _is_number(self.top_p) or not (0 < self.top_p <= 1):
            raise InvalidInputError(
                f"top-p must be in (0, 1], got {self.top_p!r}",
                hint="use 1 to turn nucleus sampling off",
            )
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise InvalidInputError(
                f"top-k must be an integer >= 0, got {self.top_k!r}",
                hint="use 0 to turn top-k filtering off",
            )
        for name, value in (
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ):
            if not _is_number(value) or not abs(value) <= MAX_PENALTY:
                raise InvalidInputError(
                    f"{name} must be a number from -{MAX_PENALTY:g} to {MAX_PENALTY:g}, "
                    f"got {value!r}",
                    hint=f"{MAX_PENALTY:g} already rules a repeated token out",
                )
        if not _is_number(self.penalty_decay) or not (0 < self.penalty_decay <= 1):
            raise InvalidInputError(
                f"penalty decay must be in (0, 1], got {self.penalty_decay!r}",
                hint="use 1 to count every earlier token fully, however long ago it appeared",
            )
        return self

    def to_dict(self) -> dict[str, float | int]:
        """A plain, JSON-serializable dict of the parameters."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Rebuild validated parameters from :meth:`to_dict` output.

        Missing keys take their defaults (so older files stay readable); unknown keys are an error.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**data).validated()


def choose_sampling(
    given: Mapping[str, Any], saved: SamplingParams | None, default: SamplingParams
) -> SamplingParams:
    """The sampling parameters to use, each by precedence: ``given`` (the values the user gave on
    the command line, by field name) > ``saved`` (a state file's) > ``default``. Validated."""
    return dataclasses.replace(saved or default, **given).validated()


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


CHAT_SAMPLING = SamplingParams(  # BlinkDL's chat demo for World/G1 models (API_DEMO_CHAT.py)
    temperature=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5, penalty_decay=0.996
)
MAX_REPLY_TOKENS = 500
