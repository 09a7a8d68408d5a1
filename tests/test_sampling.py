"""Tests for rwkv_cli.sampling: determinism, each filter's kept set, penalties, validation."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

from rwkv_cli.errors import InvalidInputError, ModelOutputError
from rwkv_cli.sampling import (
    SamplingParams,
    apply_penalties,
    make_generator,
    new_counts,
    sample_token,
    sampling_distribution,
    token_logprobs,
    update_counts,
)

# A hand-made distribution whose nucleus boundaries are easy to read off:
# cumulative 0.5, 0.8, 0.95, 1.0.
FOUR_PROBS = (0.5, 0.3, 0.15, 0.05)


def logits_of(probs: tuple[float, ...]) -> torch.Tensor:
    """Logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=torch.float64).log().to(torch.float32)


def draw(logits: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> list[int]:
    generator, _ = make_generator(seed)
    return [sample_token(logits, params, generator) for _ in range(n)]


def random_logits(vocab_size: int = 1000, seed: int = 123) -> torch.Tensor:
    return torch.randn(vocab_size, generator=torch.Generator().manual_seed(seed)) * 3


# --- seeds and determinism -----------------------------------------------------------------------


def test_same_seed_gives_same_samples() -> None:
    logits = random_logits()
    params = SamplingParams(temperature=1.0, top_p=0.9)
    assert draw(logits, params, 50, seed=42) == draw(logits, params, 50, seed=42)


def test_different_seeds_give_different_samples() -> None:
    logits = random_logits()
    params = SamplingParams(temperature=1.0, top_p=1.0)
    assert draw(logits, params, 50, seed=1) != draw(logits, params, 50, seed=2)


def test_make_generator_reports_the_seed_it_used() -> None:
    generator, seed = make_generator(1234)
    assert seed == 1234
    assert generator.initial_seed() == 1234
    assert generator.device.type == "cpu"


def test_make_generator_without_seed_picks_a_fresh_reportable_one() -> None:
    (gen_a, seed_a), (_, seed_b) = make_generator(None), make_generator(None)
    assert seed_a != seed_b
    assert 0 <= seed_a < 2**63
    assert gen_a.initial_seed() == seed_a
    # Re-seeding with the reported seed reproduces the generation.
    logits, params = random_logits(), SamplingParams(top_p=1.0)
    replay, _ = make_generator(seed_a)
    first = [sample_token(logits, params, gen_a) for _ in range(20)]
    assert first == [sample_token(logits, params, replay) for _ in range(20)]


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "7"])
def test_make_generator_rejects_bad_seeds(seed: object) -> None:
    with pytest.raises(InvalidInputError, match="seed"):
        make_generator(seed)  # type: ignore[arg-type]


# --- greedy and degenerate filters ---------------------------------------------------------------


def test_temperature_zero_is_argmax_and_draws_nothing() -> None:
    logits = random_logits()
    generator, _ = make_generator(7)
    before = generator.get_state()
    for _ in range(5):
        assert sample_token(logits, SamplingParams(temperature=0.0), generator) == int(
            logits.argmax()
        )
    assert torch.equal(generator.get_state(), before)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_one_is_argmax_at_any_temperature(temperature: float) -> None:
    logits = random_logits()
    params = SamplingParams(temperature=temperature, top_k=1, top_p=1.0)
    assert set(draw(logits, params, 200)) == {int(logits.argmax())}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0])
def test_tiny_top_p_is_argmax(temperature: float) -> None:
    logits = random_logits()
    params = SamplingParams(temperature=temperature, top_p=1e-9)
    assert set(draw(logits, params, 200)) == {int(logits.argmax())}


def test_tiny_temperature_does_not_overflow() -> None:
    logits = random_logits()
    params = SamplingParams(temperature=1e-30, top_p=1.0)
    assert set(draw(logits, params, 50)) == {int(logits.argmax())}


# --- full support: frequencies match the softmax -------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_no_filters_sample_the_tempered_softmax(temperature: float) -> None:
    logits = logits_of(FOUR_PROBS)
    params = SamplingParams(temperature=temperature, top_p=1.0, top_k=0)
    n = 20_000
    counts = Counter(draw(logits, params, n, seed=3))
    expected = torch.softmax(logits.double() / temperature, dim=0)
    for token in range(4):
        # Binomial standard error is at most 0.0036 at n = 20k; 0.015 is about four of them.
        assert counts[token] / n == pytest.approx(float(expected[token]), abs=0.015)
    assert set(counts) == {0, 1, 2, 3}


# --- top-p and top-k keep exactly the expected sets ----------------------------------------------


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.5, {0}), (0.51, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.96, {0, 1, 2, 3})],
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p: float, kept: set[int]) -> None:
    params = SamplingParams(temperature=1.0, top_p=top_p)
    assert set(draw(logits_of(FOUR_PROBS), params, 3000)) == kept


@pytest.mark.parametrize(
    ("probs", "top_p", "kept"),
    [
        ((0.38, 0.32, 0.3), 0.7, [0, 1]),
        ((0.39, 0.33, 0.17, 0.11), 0.72, [0, 1]),
        ((0.44, 0.36, 0.2), 0.8, [0, 1]),
    ],
)
def test_top_p_boundary_reached_on_paper_is_reached_despite_rounding(
    probs: tuple[float, ...], top_p: float, kept: list[int]
) -> None:
    # In float32 these running totals land a few ulps below top_p (0.38 + 0.32 as 0.69999993).
    _, token_ids = sampling_distribution(logits_of(probs), SamplingParams(top_p=top_p))
    assert token_ids.tolist() == kept


def test_top_p_keeps_the_expected_set_when_ids_are_shuffled() -> None:
    # Same distribution with ids out of probability order: 3 -> 0.5, 0 -> 0.3, 2 -> 0.15, 1 -> 0.05.
    logits = logits_of((0.3, 0.05, 0.15, 0.5))
    params = SamplingParams(temperature=1.0, top_p=0.81)
    assert set(draw(logits, params, 3000)) == {3, 0, 2}


def test_top_p_renormalizes_within_the_nucleus() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.8)
    n = 20_000
    counts = Counter(draw(logits_of(FOUR_PROBS), params, n, seed=5))
    assert counts[0] / n == pytest.approx(0.5 / 0.8, abs=0.015)
    assert counts[1] / n == pytest.approx(0.3 / 0.8, abs=0.015)


def test_top_p_acts_on_the_tempered_distribution() -> None:
    # At temperature 1 the top token holds 0.5 < 0.6, so two tokens are kept; at temperature 0.25
    # it holds 0.5**4 / sum(p**4), about 0.87, which alone reaches 0.6.
    logits = logits_of(FOUR_PROBS)
    assert set(draw(logits, SamplingParams(temperature=1.0, top_p=0.6), 2000)) == {0, 1}
    assert set(draw(logits, SamplingParams(temperature=0.25, top_p=0.6), 2000)) == {0}


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_top_k_keeps_exactly_the_k_best(k: int) -> None:
    # Near-flat logits so every kept token is drawn often enough to be seen.
    logits = torch.linspace(0.0, 0.5, 100)[
        torch.randperm(100, generator=torch.Generator().manual_seed(0))
    ]
    params = SamplingParams(temperature=1.0, top_k=k, top_p=1.0)
    best = set(torch.topk(logits, k).indices.tolist())
    assert set(draw(logits, params, 40 * k + 200)) == best


@pytest.mark.parametrize("k", [4, 5, 1000])
def test_top_k_at_or_above_vocab_size_keeps_everything(k: int) -> None:
    params = SamplingParams(temperature=1.0, top_k=k, top_p=1.0)
    assert set(draw(logits_of((0.25, 0.25, 0.25, 0.25)), params, 500)) == {0, 1, 2, 3}


def test_top_k_then_top_p_on_what_is_left() -> None:
    # top-k 2 leaves 0.5 and 0.3, renormalized to 0.625 and 0.375; top-p 0.6 then keeps only the
    # first. Applied to the unfiltered distribution, top-p 0.6 would have kept both.
    params = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    assert set(draw(logits_of(FOUR_PROBS), params, 2000)) == {0}


def reference_distribution(logits: torch.Tensor, params: SamplingParams) -> dict[int, float]:
    """The kept tokens and their probabilities the plain way: one full sort, nothing skipped.

    Same float32 arithmetic as the fast path (and the same 1e-6 allowance for its rounding at the
    top-p boundary), so the two must agree token for token.
    """
    tempered = (logits - logits.max()) / params.temperature
    if params.top_k:
        sorted_logits, order = torch.sort(tempered, descending=True, stable=True)
        probs = torch.softmax(sorted_logits[: params.top_k], dim=0)
        order = order[: params.top_k]
    else:
        probs, order = torch.sort(torch.softmax(tempered, dim=0), descending=True, stable=True)
    size = min(int((torch.cumsum(probs, dim=0) < params.top_p - 1e-6).sum()) + 1, len(probs))
    kept = probs[:size] / probs[:size].sum()
    return dict(zip(order[:size].tolist(), kept.tolist(), strict=True))


# Nucleus sizes on these logits range from 28 tokens (top-p 0.1) to 23,416 (top-p 0.95), so the
# cases cover each width the top-p search tries before it falls back to a full sort.
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_p=0.1),
        SamplingParams(top_p=0.3),
        SamplingParams(top_p=0.5),
        SamplingParams(top_p=0.7),
        SamplingParams(top_p=0.95),
        SamplingParams(temperature=0.5, top_p=0.9),
        SamplingParams(temperature=1.5, top_p=0.6, top_k=3000),
        SamplingParams(top_p=1.0, top_k=100),
    ],
)
def test_distribution_matches_the_definition_on_a_full_vocabulary(params: SamplingParams) -> None:
    logits = torch.randn(65536, generator=torch.Generator().manual_seed(0)) * 2
    probs, token_ids = sampling_distribution(logits, params)
    expected = reference_distribution(logits, params)

    assert token_ids.tolist() == list(expected)  # same tokens, most probable first
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(probs, torch.tensor(list(expected.values())))


def test_distribution_without_filters_is_the_tempered_softmax() -> None:
    logits = random_logits()
    probs, token_ids = sampling_distribution(logits, SamplingParams(temperature=0.8, top_p=1.0))
    expected = torch.softmax(logits.double() / 0.8, dim=0)
    torch.testing.assert_close(probs.double()[token_ids.argsort()], expected, rtol=1e-5, atol=1e-7)


# --- banned tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, top_p=1.0),
        SamplingParams(temperature=1.0, top_p=0.99),
        SamplingParams(temperature=3.0, top_p=1.0, top_k=60),
        SamplingParams(temperature=0.3, top_p=0.5, top_k=5),
    ],
)
def test_minus_inf_logits_are_never_sampled(params: SamplingParams) -> None:
    logits = random_logits(100)
    # Every even id, plus the five tokens that would have been the most likely.
    banned = torch.cat([torch.arange(0, 100, 2), torch.topk(logits, 5).indices])
    logits[banned] = -math.inf
    samples = set(draw(logits, params, 2000))
    assert samples
    assert samples.isdisjoint(banned.tolist())


def test_all_but_one_banned_always_gives_that_one() -> None:
    logits = torch.full((1000,), -math.inf)
    logits[617] = -3.0
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_p=1.0, top_k=10)):
        assert set(draw(logits, params, 100)) == {617}


@pytest.mark.parametrize(
    "logits",
    [
        torch.full((10,), -math.inf),  # every token banned
        torch.tensor([0.0, math.inf, 0.0]),
        torch.tensor([0.0, math.nan, 0.0]),
    ],
)
def test_unsamplable_logits_raise(logits: torch.Tensor) -> None:
    generator, _ = make_generator(0)
    for params in (SamplingParams(temperature=0.0), SamplingParams()):
        with pytest.raises(ModelOutputError, match="largest score"):
            sample_token(logits, params, generator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_accepted(dtype: torch.dtype) -> None:
    logits = logits_of(FOUR_PROBS).to(dtype)
    logits[0] = -math.inf
    params = SamplingParams(temperature=1.0, top_p=0.9)
    assert set(draw(logits, params, 500)) <= {1, 2, 3}
    assert sample_token(logits, SamplingParams(temperature=0.0), make_generator(0)[0]) == 1


def test_inputs_to_sample_token_are_unchanged() -> None:
    logits = random_logits()
    original = logits.clone()
    draw(logits, SamplingParams(temperature=0.5, top_k=20, top_p=0.7), 10)
    assert torch.equal(logits, original)


def test_non_vector_logits_raise() -> None:
    with pytest.raises(ValueError, match="1-D"):
        sample_token(torch.zeros(2, 5), SamplingParams(), make_generator(0)[0])


# --- penalties and counts ------------------------------------------------------------------------


def test_apply_penalties_matches_hand_computation() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, -math.inf])
    counts = torch.tensor([0.0, 1.0, 2.5, 4.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    logits_before, counts_before = logits.clone(), counts.clone()

    result = apply_penalties(logits, counts, params)

    # 1 - 0 - 0; 2 - 0.5 - 0.25; 3 - 0.5 - 0.625; -inf stays -inf.
    assert torch.equal(result, torch.tensor([1.0, 1.25, 1.875, -math.inf]))
    assert torch.equal(logits, logits_before)
    assert torch.equal(counts, counts_before)


def test_negative_penalties_favour_seen_tokens() -> None:
    result = apply_penalties(
        torch.zeros(3),
        torch.tensor([0.0, 2.0, 0.0]),
        SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5),
    )
    assert torch.equal(result, torch.tensor([0.0, 2.0, 0.0]))


def test_zero_penalties_leave_logits_as_they_are() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0])
    result = apply_penalties(logits, torch.tensor([0.0, 5.0, 1.0]), SamplingParams())
    assert torch.equal(result, torch.tensor([1.0, 2.0, 3.0]))


def test_new_counts_are_float32_zeros() -> None:
    counts = new_counts(7)
    assert counts.dtype == torch.float32
    assert counts.shape == (7,)
    assert not counts.any()


def test_update_counts_decays_then_adds_one() -> None:
    counts = new_counts(4)
    counts = update_counts(counts, 1, 0.5)
    counts = update_counts(counts, 1, 0.5)
    before = counts.clone()
    counts = update_counts(counts, 3, 0.5)

    # Token 1: (1 * 0.5 + 1) * 0.5 = 0.75; token 3: 1; the others never appeared.
    assert torch.equal(counts, torch.tensor([0.0, 0.75, 0.0, 1.0]))
    assert torch.equal(before, torch.tensor([0.0, 1.5, 0.0, 0.0]))  # input left unchanged


@pytest.mark.parametrize("token", [-1, 4])
def test_update_counts_rejects_tokens_outside_the_vocabulary(token: int) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        update_counts(new_counts(4), token, 0.996)


def test_penalties_steer_sampling_away_from_repeats() -> None:
    logits = torch.tensor([2.0, 1.9, -5.0])
    params = SamplingParams(temperature=0.0, presence_penalty=1.0, frequency_penalty=0.0)
    generator, _ = make_generator(0)
    counts = new_counts(3)
    tokens = []
    for _ in range(2):
        token = sample_token(apply_penalties(logits, counts, params), params, generator)
        counts = update_counts(counts, token, params.penalty_decay)
        tokens.append(token)
    assert tokens == [0, 1]


# --- validation and serialization ----------------------------------------------------------------


def test_defaults_are_valid() -> None:
    params = SamplingParams()
    assert params.validated() is params


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": 1e-38}, r"temperature must be 0 or at least 1e-06"),  # 1/T is inf
        ({"top_p": 0.0}, "top-p"),
        ({"top_p": 1.5}, r"top-p must be in \(0, 1\], got 1.5"),
        ({"top_p": math.nan}, "top-p"),
        ({"top_k": -1}, "top-k"),
        ({"top_k": 2.5}, "top-k"),
        ({"presence_penalty": math.inf}, "presence penalty"),
        ({"presence_penalty": math.nan}, "presence penalty"),
        ({"frequency_penalty": -math.inf}, "frequency penalty"),
        ({"frequency_penalty": 1e39}, "frequency penalty must be a number from -1e"),  # inf
        ({"penalty_decay": 0.0}, "penalty decay"),
        ({"penalty_decay": 1.01}, "penalty decay"),
        ({"penalty_decay": "0.9"}, "penalty decay"),
    ],
)
def test_validation_rejects_bad_values_naming_the_parameter(changes: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as caught:
        SamplingParams(**changes).validated()
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    "changes",
    [
        {"temperature": 0},
        {"temperature": 1e-6},
        {"presence_penalty": 1e6, "frequency_penalty": -1e6},
        {"top_p": 1.0},
        {"top_k": 0},
        {"presence_penalty": -2.0, "frequency_penalty": -0.5},
        {"penalty_decay": 1.0},
    ],
)
def test_validation_accepts_boundary_values(changes: dict) -> None:
    SamplingParams(**changes).validated()


def test_dict_round_trip_through_json() -> None:
    params = SamplingParams(
        temperature=0.7, top_p=0.5, top_k=40, presence_penalty=0.2, frequency_penalty=-0.1
    )
    data = json.loads(json.dumps(params.to_dict()))
    assert data["top_k"] == 40
    assert SamplingParams.from_dict(data) == params


def test_from_dict_fills_missing_keys_with_defaults() -> None:
    assert SamplingParams.from_dict({"temperature": 0.5}) == SamplingParams(temperature=0.5)


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown sampling parameter.*top_z"):
        SamplingParams.from_dict({"top_z": 3})
    with pytest.raises(InvalidInputError, match="top-p"):
        SamplingParams.from_dict({"top_p": 2})


def test_token_logprobs_are_the_log_softmax_with_the_most_probable_first() -> None:
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 4
    logits[7] = -torch.inf  # a banned token: never among the best, its own logprob -inf
    chosen, best = token_logprobs(logits, 11, 3)
    exact = torch.log_softmax(logits.double(), dim=0)
    assert chosen == pytest.approx(float(exact[11]), rel=1e-5)
    order = torch.argsort(exact, descending=True)[:3]
    assert [token for token, _ in best] == order.tolist()
    assert [logprob for _, logprob in best] == pytest.approx(exact[order].tolist(), rel=1e-5)
    assert token_logprobs(logits, 11, 0) == (chosen, [])
