"""Continuing a session turn after turn, as ``generate`` and ``load-state`` do: the settings,
the sampler, the text read so far and, after each turn, the state saved to a file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_cli.generation import GenerationChunk, Session, stream_generate
from rwkv_cli.loading.loaded import LoadedModel
from rwkv_cli.loading.open import Start
from rwkv_cli.sampling import make_generator
from rwkv_cli.settings import SamplingParams
from rwkv_cli.statefile import TEXT_TAIL_CHARS, StateFile, save_state_file


def sampler_for(seed: int | None, saved: StateFile | None) -> tuple[torch.Generator, int | None]:
    """The random generator to sample with and its seed: seeded by ``seed`` if given, else
    continuing the one saved in ``saved``, else freshly seeded."""
    if seed is None and saved is not None:
        generator = torch.Generator()
        if saved.restore_generator(generator):
            return generator, saved.seed
    return make_generator(seed)


@dataclass
class Continuation:
    """Generation turns that continue one session; ``session`` and ``text_tail`` always stand
    after the last finished turn, which is also what ``save_path`` (if any) holds."""

    loaded: LoadedModel
    session: Session
    params: SamplingParams
    generator: torch.Generator
    seed: int | None
    max_tokens: int
    stop: list[str]
    save_path: Path | None = None
    text_tail: str = ""  # the end of the text read and written so far, kept in the state file

    @classmethod
    def begin(
        cls,
        start: Start,
        params: SamplingParams,
        seed: int | None,
        max_tokens: int,
        stop: list[str],
        save_path: Path | None = None,
    ) -> Continuation:
        """Continue ``start``: its session, and a saved file's sampler and text (``seed``, when
        given, seeds a new sampler instead)."""
        saved = start.state_file
        generator, seed = sampler_for(seed, saved)
        return cls(
            loaded=start.loaded,
            session=start.session,
            params=params,
            generator=generator,
            seed=seed,
            max_tokens=max_tokens,
            stop=stop,
            save_path=save_path,
            text_tail=saved.text_tail if saved else "",
        )

    def turn(
        self, text: str, on_prefill: Callable[[int, int], None] | None = None
    ) -> Iterator[GenerationChunk]:
        """Read ``text`` and generate after it, chunk by chunk. When the generation ends the
        continuation moves on to after it and saves it to ``save_path``; a turn left unfinished
        (the caller stops, Ctrl-C) leaves everything as it was."""
        completion = []
        last = None
        for last in stream_generate(
            self.loaded.model,
            self.loaded.tokenizer,
            text,
            params=self.params,
            generator=self.generator,
            max_tokens=self.max_tokens,
            stop=self.stop,
            session=self.session,
            on_prefill=on_prefill,
        ):
            completion.append(last.text)
            yield last
        if last is None:
            return
        self.session = last.session
        self.text_tail = (self.text_tail + text + "".join(completion))[-TEXT_TAIL_CHARS:]
        if self.save_path is not None:
            self.save(self.save_path)

    def save(self, path: Path) -> None:
        """Write the session, settings, sampler position and text tail to a state file."""
        save_state_file(
            path,
            self.loaded,
            self.session,
            sampling=self.params,
            seed=self.seed,
            generator=self.generator,
            text_tail=self.text_tail,
        )
