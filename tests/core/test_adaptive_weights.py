"""Adaptive weights: bounds, mean 1, ranking, the worked example (docs/rules.md)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.adaptive_weights import (
    AdaptiveWeightsConfig,
    adjust_weights,
    initial_weights,
    lr_multipliers,
    normalize,
    population_loss,
    rank_models,
)
from services.core.errors import InvalidInput
from services.core.training_config import TRAINING_CONFIG

losses_st = st.floats(min_value=0.0, max_value=50.0, allow_nan=False, allow_infinity=False)


@st.composite
def configs(draw: st.DrawFn, normalize_weights: bool | None = None) -> AdaptiveWeightsConfig:
    return AdaptiveWeightsConfig(
        min_multiplier=draw(st.floats(min_value=0.01, max_value=1.0)),
        max_multiplier=draw(st.floats(min_value=1.0, max_value=10.0)),
        top_model_boost=draw(st.floats(min_value=0.0, max_value=5.0)),
        bottom_model_penalty=draw(st.floats(min_value=0.0, max_value=0.99)),
        normalize_weights=draw(st.booleans()) if normalize_weights is None else normalize_weights,
    )


@st.composite
def epochs_of_losses(draw: st.DrawFn) -> tuple[list[str], list[dict[str, float]]]:
    """Model names and one loss mapping per epoch, so prior weights come from real adjustments."""
    count = draw(st.integers(min_value=2, max_value=10))
    models = [f"model-{i}" for i in range(count)]
    epochs = draw(st.integers(min_value=1, max_value=6))
    # a few distinct values make ties likely, which the tie rule must handle
    value = st.one_of(losses_st, st.sampled_from([1.0, 2.0]))
    history = [{m: draw(value) for m in models} for _ in range(epochs)]
    return models, history


def bisect_scale(raw: list[float], low: float, high: float) -> float:
    """Independent reference: plain bisection on c for sum(clamp(c * raw)) == N."""
    target = len(raw)
    lo, hi = 0.0, high / min(raw)
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(max(mid * r, low), high) for r in raw) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@given(epochs_of_losses(), configs(normalize_weights=True))
def test_normalised_weights_stay_in_bounds_and_sum_to_n(
    case: tuple[list[str], list[dict[str, float]]], config: AdaptiveWeightsConfig
) -> None:
    models, history = case
    weights = initial_weights(models)
    for losses in history:
        weights = adjust_weights(weights, losses, config).weights
        assert list(weights) == models
        assert math.isclose(sum(weights.values()), len(models), abs_tol=1e-9)
        for value in weights.values():
            assert config.min_multiplier <= value <= config.max_multiplier


@given(epochs_of_losses(), configs(normalize_weights=False))
def test_unnormalised_weights_are_clamped_raw(
    case: tuple[list[str], list[dict[str, float]]], config: AdaptiveWeightsConfig
) -> None:
    models, history = case
    weights = initial_weights(models)
    for losses in history:
        result = adjust_weights(weights, losses, config)
        for model in models:
            expected = min(
                max(result.raw_weights[model], config.min_multiplier), config.max_multiplier
            )
            assert result.weights[model] == expected
        weights = result.weights


@given(epochs_of_losses(), configs())
def test_raw_boosts_best_and_penalises_worst_only(
    case: tuple[list[str], list[dict[str, float]]], config: AdaptiveWeightsConfig
) -> None:
    models, history = case
    weights = initial_weights(models)
    for losses in history:
        result = adjust_weights(weights, losses, config)
        best, worst = result.ranking[0], result.ranking[-1]
        assert result.previous_weights == weights
        assert result.raw_weights[best] == pytest.approx(
            weights[best] * (1 + config.top_model_boost)
        )
        assert result.raw_weights[worst] == pytest.approx(
            weights[worst] * (1 - config.bottom_model_penalty)
        )
        for model in result.ranking[1:-1]:
            assert result.raw_weights[model] == weights[model]
        weights = result.weights


@given(
    st.dictionaries(st.text("abcdefg", min_size=1, max_size=4), losses_st, min_size=2, max_size=10),
    configs(),
)
def test_best_never_below_worst_from_equal_weights(
    losses: dict[str, float], config: AdaptiveWeightsConfig
) -> None:
    result = adjust_weights(initial_weights(list(losses)), losses, config)
    assert result.weights[result.ranking[0]] >= result.weights[result.ranking[-1]]


@given(st.dictionaries(st.text(min_size=1, max_size=5), losses_st, min_size=1, max_size=10))
def test_ranking_is_sorted_by_loss_then_name(losses: dict[str, float]) -> None:
    ranking = rank_models(losses)
    assert sorted(ranking) == sorted(losses)
    for first, second in itertools.pairwise(ranking):
        assert (losses[first], first) < (losses[second], second)


def test_ranking_ties_are_broken_by_name() -> None:
    assert rank_models({"zeta": 1.0, "alpha": 1.0, "mid": 0.5}) == ("mid", "alpha", "zeta")


def test_worked_example_two_models_with_defaults() -> None:
    config = AdaptiveWeightsConfig()
    result = adjust_weights({"a": 1.0, "b": 1.0}, {"a": 2.0, "b": 3.0}, config)
    assert result.ranking == ("a", "b")
    assert result.raw_weights == {"a": pytest.approx(1.3), "b": pytest.approx(0.6)}
    scale = bisect_scale([1.3, 0.6], 0.5, 1.5)
    assert result.weights["a"] == pytest.approx(1.3 * scale, abs=1e-12)
    assert result.weights["b"] == pytest.approx(0.6 * scale, abs=1e-12)


@given(
    st.lists(st.floats(min_value=0.01, max_value=20.0), min_size=1, max_size=10),
    st.floats(min_value=0.05, max_value=1.0),
    st.floats(min_value=1.0, max_value=5.0),
)
def test_normalize_matches_bisection(raw: list[float], low: float, high: float) -> None:
    named = {f"m{i}": value for i, value in enumerate(raw)}
    result = normalize(named, low, high)
    scale = bisect_scale(raw, low, high)
    for name, value in named.items():
        assert result[name] == pytest.approx(min(max(scale * value, low), high), abs=1e-9)
    assert math.isclose(sum(result.values()), len(raw), abs_tol=1e-9)


def test_normalize_saturates_at_the_bounds() -> None:
    # one huge raw weight pins at max; the rest share what is left
    result = normalize({"a": 100.0, "b": 1.0, "c": 1.0}, 0.5, 1.5)
    assert result == {"a": 1.5, "b": pytest.approx(0.75), "c": pytest.approx(0.75)}


@given(st.lists(losses_st, min_size=1, max_size=5), configs())
def test_single_model_stays_at_one(history: list[float], config: AdaptiveWeightsConfig) -> None:
    weights = initial_weights(["only"])
    for loss in history:
        result = adjust_weights(weights, {"only": loss}, config)
        assert result.weights == result.raw_weights == result.previous_weights == {"only": 1.0}
        weights = result.weights


def test_disabled_keeps_weights() -> None:
    config = AdaptiveWeightsConfig(enabled=False)
    weights = initial_weights(["a", "b", "c"])
    for losses in ({"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 3.0, "b": 2.0, "c": 1.0}):
        result = adjust_weights(weights, losses, config)
        assert result.weights == result.raw_weights == {"a": 1.0, "b": 1.0, "c": 1.0}
        assert result.ranking == tuple(sorted(losses, key=losses.__getitem__))
        weights = result.weights


def test_output_order_follows_the_weights_mapping() -> None:
    weights = {"z": 1.0, "a": 1.0, "m": 1.0}
    result = adjust_weights(weights, {"a": 2.0, "m": 3.0, "z": 1.0}, AdaptiveWeightsConfig())
    assert list(result.weights) == list(result.raw_weights) == ["z", "a", "m"]
    assert list(result.previous_weights) == ["z", "a", "m"]


def test_population_loss_weights_each_loss_by_w_over_n() -> None:
    losses = {"a": 2.0, "b": 4.0, "c": 9.0}
    weights = {"a": 1.5, "b": 1.0, "c": 0.5}
    assert population_loss(losses, weights) == pytest.approx((1.5 * 2 + 1.0 * 4 + 0.5 * 9) / 3)
    assert population_loss(losses, initial_weights(list(losses))) == pytest.approx(5.0)


def test_lr_multipliers_scale_the_learning_rate() -> None:
    result = lr_multipliers({"a": 1.48, "b": 0.52}, 1e-4)
    assert result == {"a": pytest.approx(0.000148), "b": pytest.approx(0.000052)}
    assert list(result) == ["a", "b"]


def test_initial_weights_are_one_and_refuse_duplicates() -> None:
    assert initial_weights(["a", "b"]) == {"a": 1.0, "b": 1.0}
    with pytest.raises(InvalidInput, match="'a' is listed twice"):
        initial_weights(["a", "b", "a"])


@pytest.mark.parametrize(
    ("weights", "losses"),
    [
        ({"a": 1.0, "b": 1.0}, {"a": 1.0}),
        ({"a": 1.0, "b": 1.0}, {"a": 1.0, "c": 2.0}),
        ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": math.nan}),
        ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": math.inf}),
        ({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": True}),
        ({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 2.0}),
        ({"a": 1.0, "b": math.nan}, {"a": 1.0, "b": 2.0}),
        ({}, {}),
    ],
)
def test_adjust_weights_refuses_bad_input(
    weights: dict[str, float], losses: dict[str, float]
) -> None:
    with pytest.raises(InvalidInput):
        adjust_weights(weights, losses, AdaptiveWeightsConfig())


def test_population_loss_refuses_mismatched_models() -> None:
    with pytest.raises(InvalidInput, match="same models"):
        population_loss({"a": 1.0}, {"b": 1.0})


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_multiplier": 0.0}, "min_multiplier"),
        ({"min_multiplier": 1.2}, "min_multiplier"),
        ({"max_multiplier": 0.9}, "max_multiplier"),
        ({"max_multiplier": math.inf}, "max_multiplier"),
        ({"top_model_boost": -0.1}, "top_model_boost"),
        ({"bottom_model_penalty": 1.0}, "bottom_model_penalty"),
        ({"bottom_model_penalty": -0.1}, "bottom_model_penalty"),
        ({"min_multiplier": True}, "min_multiplier"),
        ({"enabled": 1}, "enabled"),
    ],
)
def test_config_refuses_out_of_range_values(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as error:
        AdaptiveWeightsConfig(**changes)  # type: ignore[arg-type]
    assert error.value.field == field


def test_config_from_mapping_reads_the_nested_shape() -> None:
    assert AdaptiveWeightsConfig.from_mapping(TRAINING_CONFIG["adaptive_weights"]) == (
        AdaptiveWeightsConfig()
    )
    config = AdaptiveWeightsConfig.from_mapping(
        {"enabled": False, "adjust_strategy": {"top_model_boost": 0.1, "bottom_model_penalty": 0.2}}
    )
    assert (config.enabled, config.top_model_boost, config.bottom_model_penalty) == (
        False,
        0.1,
        0.2,
    )
    with pytest.raises(InvalidInput, match="top_model_bost"):
        AdaptiveWeightsConfig.from_mapping({"adjust_strategy": {"top_model_bost": 0.1}})
    with pytest.raises(InvalidInput, match="boost"):
        AdaptiveWeightsConfig.from_mapping({"boost": 0.1})
