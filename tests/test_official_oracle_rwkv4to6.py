"""Parity with BlinkDL's official ``rwkv`` package (a test-only oracle) for RWKV-4, 5.x and 6.

The package runs in a process of its own (tests/support/official_worker.py): its RWKV-4/5/6 class is
hidden for the whole process once the RWKV-7 oracle tests have imported it with RWKV_V7_ON=1.

The package folds ln0 into the embedding in the file's dtype, so on a bf16 file its embedding is
rounded to bf16 after the LayerNorm, while rwkv-cli computes it in float32. The exact comparisons
therefore give the package a float32 copy of the same weights (bf16 -> float32 is exact); one test
on the bf16 file itself bounds the difference that rounding makes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_cli.models import load_model
from rwkv_cli.statetuning import import_state_tuning
from rwkv_cli.tokenizer import tokenizer_for_vocab
from rwkv_cli.tokenizer.bpe import NEOX_FILE
from tests.support.fixtures import LEGACY_GENERATIONS, legacy_tensors, write_pth
from tests.support.generation import ORACLE_CONTINUATION, ORACLE_PROMPT, assert_greedy_continuation
from tests.support.numerics import relative_error
from tests.support.official_worker import official_environment

FIXTURE_SEED = 1  # a seed whose models do not end the text within the greedy continuation
TUNED = ("5.2", "6")  # generations the official package loads state-tuning states for
TOKENIZER_TEXTS = [
    ORACLE_PROMPT,
    "Hello world!\n\n    indented     runs of spaces\t and a tab",
    "Emoji 😀🎉, accents café naïve, CJK 日本語のテキスト, Cyrillic Привет",
    " leading space and trailing newline\n",
]
WORKER = Path(__file__).parent / "support" / "official_worker.py"
NEOX_JSON = Path(__file__).parents[1] / "rwkv_cli" / "data" / NEOX_FILE


def _tuning_states(generation: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        f"blocks.{layer}.att.time_state": (
            torch.randn(2, 64, 64, generator=generator) * 0.3
        ).bfloat16()
        for layer in range(2)
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A bf16 .pth per generation: RWKV-4 with the Pile vocabulary, the others World."""
    directory = tmp_path_factory.mktemp("official")
    return {
        generation: write_pth(
            directory / f"rwkv-{generation}.pth", legacy_tensors(generation, seed=FIXTURE_SEED)
        )
        for generation in LEGACY_GENERATIONS
    }


def _prompt_tokens(path: Path) -> list[int]:
    model = load_model(path)
    return tokenizer_for_vocab(model.vocab_size).encode(ORACLE_PROMPT)


@pytest.fixture(scope="module")
def official(models, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """The official package's results, by (generation, "fp32" | "bf16" | "tuned")."""
    directory = tmp_path_factory.mktemp("official-jobs")
    jobs, keys = [], []
    for generation, path in models.items():
        tensors = torch.load(path, weights_only=True)
        fp32 = {name: tensor.float() for name, tensor in tensors.items()}
        copy = write_pth(directory / f"rwkv-{generation}-fp32.pth", fp32)
        tokens = _prompt_tokens(path)
        job = {
            "model": str(copy.with_suffix("")),
            "tokens": tokens,
            "continuation": ORACLE_CONTINUATION,
        }
        if generation == "4":
            job |= {"tokenizer": str(NEOX_JSON), "texts": TOKENIZER_TEXTS}
        jobs.append(job)
        keys.append((generation, "fp32"))
        jobs.append({"model": str(path.with_suffix("")), "tokens": tokens})
        keys.append((generation, "bf16"))
        if generation in TUNED:
            merged = write_pth(
                directory / f"rwkv-{generation}-tuned.pth", fp32 | _tuning_states(generation)
            )
            jobs.append({"model": str(merged.with_suffix("")), "tokens": tokens})
            keys.append((generation, "tuned"))
    torch.save(jobs, directory / "jobs.pt")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(directory / "jobs.pt"), str(directory / "out.pt")],
        env=official_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(directory / "out.pt", weights_only=True)
    return dict(zip(keys, results, strict=True))


@pytest.fixture(scope="module", params=LEGACY_GENERATIONS)
def generation(request) -> str:
    return request.param


def test_official_package_detects_the_same_generation(official, generation) -> None:
    assert official[(generation, "fp32")]["version"] == float(generation)


def test_prompt_logits_and_state_match(official, models, generation) -> None:
    expected = official[(generation, "fp32")]
    model = load_model(models[generation])
    logits, state = model.forward(_prompt_tokens(models[generation]))
    assert relative_error(logits, expected["logits"]) < 1e-5
    per_layer = len(expected["state"]) // len(state.layers)
    for index, layer in enumerate(state.layers):
        theirs = expected["state"][per_layer * index : per_layer * (index + 1)]
        assert relative_error(layer.att_shift, theirs[0]) < 1e-5
        assert relative_error(layer.ffn_shift, theirs[-1]) < 1e-5
        if generation == "4":  # [att_xx, aa, bb, pp, ffn_xx]
            assert relative_error(layer.att_aa, theirs[1]) < 1e-5
            assert relative_error(layer.att_bb, theirs[2]) < 1e-5
            assert (layer.att_pp - theirs[3]).abs().max() < 1e-4
        else:  # [att_xx, att_kv, ffn_xx]; the package's att_kv is [head, key, value]
            assert relative_error(layer.att_wkv, theirs[1].transpose(1, 2)) < 1e-5


def test_bf16_file_differs_only_by_the_packages_bf16_embedding(official, models, generation):
    logits, _ = load_model(models[generation]).forward(_prompt_tokens(models[generation]))
    assert relative_error(logits, official[(generation, "bf16")]["logits"]) < 1e-2


def test_greedy_continuation_matches(official, models, generation) -> None:
    expected = official[(generation, "fp32")]["greedy"]
    model = load_model(models[generation])
    tokenizer = tokenizer_for_vocab(model.vocab_size)
    assert_greedy_continuation(model, tokenizer, ORACLE_PROMPT, ORACLE_CONTINUATION, expected)


@pytest.mark.parametrize("tuned_generation", TUNED)
def test_state_tuning_file_matches(official, models, tmp_path, tuned_generation) -> None:
    """The official package transposes time_state into its [key, value] state; we take it as
    stored, [value, key]. Both must read the same initial state from the same file."""
    model = load_model(models[tuned_generation])
    tuning = write_pth(tmp_path / "tuned-state.pth", _tuning_states(tuned_generation))
    session = import_state_tuning(tuning, model)
    logits, _ = model.forward(_prompt_tokens(models[tuned_generation]), session.state)
    assert relative_error(logits, official[(tuned_generation, "tuned")]["logits"]) < 1e-5


def test_20b_tokenizer_matches_the_official_pipeline(official, models) -> None:
    expected = official[("4", "fp32")]
    tokenizer = tokenizer_for_vocab(load_model(models["4"]).vocab_size)
    assert tokenizer.name == "20B_tokenizer"
    assert [tokenizer.encode(text) for text in TOKENIZER_TEXTS] == expected["encoded"]
    assert [tokenizer.decode(ids) for ids in expected["encoded"]] == expected["decoded"]
    assert expected["decoded"] == TOKENIZER_TEXTS
