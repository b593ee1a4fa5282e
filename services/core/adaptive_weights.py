"""Adaptive weights: after each epoch, boost the best model's learning rate, penalise the worst.

Pure functions on plain mappings (docs/rules.md); the trainer applies the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from services.core.checks import finite_number, flag, known_keys
from services.core.errors import InvalidInput
from services.core.training_config import TRAINING_CONFIG

_SECTION = "adaptive_weights"
_DEFAULTS = TRAINING_CONFIG[_SECTION]
_STRATEGY = _DEFAULTS["adjust_strategy"]


@dataclass(frozen=True)
class AdaptiveWeightsConfig:
    """How far one epoch's ranking may move the learning-rate multipliers (defaults: the
    `adaptive_weights` section of TRAINING_CONFIG)."""

    enabled: bool = _DEFAULTS["enabled"]
    """False keeps every weight at 1.0 for the whole run."""
    min_multiplier: float = _DEFAULTS["min_multiplier"]
    """Lowest weight a model can reach; 0 < min_multiplier <= 1."""
    max_multiplier: float = _DEFAULTS["max_multiplier"]
    """Highest weight a model can reach; max_multiplier >= 1."""
    top_model_boost: float = _STRATEGY["top_model_boost"]
    """The best model's raw weight is w * (1 + boost)."""
    bottom_model_penalty: float = _STRATEGY["bottom_model_penalty"]
    """The worst model's raw weight is w * (1 - penalty); 0 <= penalty < 1 keeps it positive."""
    normalize_weights: bool = _DEFAULTS["normalize_weights"]
    """Rescale so the weights average 1 (sum to N) after clamping."""

    def __post_init__(self) -> None:
        flag(self.enabled, "enabled")
        flag(self.normalize_weights, "normalize_weights")
        # a scale c with sum(clamp(c * raw)) == N exists only when min <= 1 <= max
        numbers = {
            "min_multiplier": finite_number(
                self.min_multiplier, "min_multiplier", low=0, low_inclusive=False, high=1
            ),
            "max_multiplier": finite_number(self.max_multiplier, "max_multiplier", low=1),
            "top_model_boost": finite_number(self.top_model_boost, "top_model_boost", low=0),
            # below 1 keeps the worst model's raw weight positive
            "bottom_model_penalty": finite_number(
                self.bottom_model_penalty,
                "bottom_model_penalty",
                low=0,
                high=1,
                high_inclusive=False,
            ),
        }
        for name, number in numbers.items():
            object.__setattr__(self, name, number)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> AdaptiveWeightsConfig:
        """Build from the nested `TRAINING_CONFIG["adaptive_weights"]` shape; absent keys keep
        the defaults, unknown keys are refused so a typo never silently falls back."""
        nested = tuple(_STRATEGY)  # the rule's own fields, under "adjust_strategy"
        own = [f.name for f in fields(cls) if f.name not in nested]
        values = dict(known_keys(section, [*own, "adjust_strategy"], _SECTION))
        strategy = values.pop("adjust_strategy", {})
        values.update(known_keys(strategy, nested, f"{_SECTION}.adjust_strategy"))
        return cls(**values)


@dataclass(frozen=True)
class WeightAdjustment:
    """One epoch's adjustment, in the shape of the `weight_adjustment` event."""

    ranking: tuple[str, ...]
    """Model names, best (lowest validation loss) first; ties broken by name."""
    previous_weights: dict[str, float]
    """The weights that were in force during the epoch just validated."""
    raw_weights: dict[str, float]
    """Boosted/penalised weights before clamping and normalising."""
    weights: dict[str, float]
    """The new weights, in force for the next epoch."""


def initial_weights(models: Sequence[str]) -> dict[str, float]:
    """Every model starts at 1.0."""
    if isinstance(models, str):
        raise InvalidInput("models must be a list of model names, not one string.", field="models")
    weights = dict.fromkeys(models, 1.0)
    if len(weights) != len(models):
        duplicate = next(m for m in models if list(models).count(m) > 1)
        raise InvalidInput(f"Model {duplicate!r} is listed twice.", field="models")
    return weights


def rank_models(val_losses: Mapping[str, float]) -> tuple[str, ...]:
    """Model names, lowest validation loss first; equal losses in name order."""
    losses = _check_losses(val_losses)
    return tuple(sorted(losses, key=lambda model: (losses[model], model)))


def adjust_weights(
    weights: Mapping[str, float],
    val_losses: Mapping[str, float],
    config: AdaptiveWeightsConfig,
) -> WeightAdjustment:
    """Rank by validation loss, boost the best, penalise the worst, clamp and normalise."""
    previous = _check_weights(weights, "weights")
    _require_same_models(previous, val_losses)
    ranking = rank_models(val_losses)
    if len(previous) < 2 or not config.enabled:
        return WeightAdjustment(ranking, dict(previous), dict(previous), dict(previous))

    best, worst = ranking[0], ranking[-1]
    raw = dict(previous)
    raw[best] = previous[best] * (1 + config.top_model_boost)
    raw[worst] = previous[worst] * (1 - config.bottom_model_penalty)
    low, high = config.min_multiplier, config.max_multiplier
    if config.normalize_weights:
        new = normalize(raw, low, high)
    else:
        new = {model: _clamp(value, low, high) for model, value in raw.items()}
    return WeightAdjustment(ranking, dict(previous), raw, new)


def normalize(
    raw: Mapping[str, float], min_multiplier: float, max_multiplier: float
) -> dict[str, float]:
    """Scale so that `clamp(c * raw_i, min, max)` sums to N; returns those clamped values.

    f(c) = sum(clamp(c * raw_i)) is continuous, non-decreasing and linear between the
    breakpoints min/raw_i and max/raw_i, so the exact c lies on one segment: find it, then
    solve the linear equation there.
    """
    values = _check_weights(raw, "raw_weights")
    low = finite_number(min_multiplier, "min_multiplier")
    high = finite_number(max_multiplier, "max_multiplier")
    if not 0 < low <= 1 <= high:
        raise InvalidInput(
            f"Need 0 < min_multiplier <= 1 <= max_multiplier, got {low} and {high}.",
            field="min_multiplier",
        )
    if not values:
        return {}
    scale = _scale(list(values.values()), low, high, float(len(values)))
    return {model: _clamp(scale * value, low, high) for model, value in values.items()}


def _scale(raw: list[float], low: float, high: float, target: float) -> float:
    def total(c: float) -> float:
        return sum(_clamp(c * r, low, high) for r in raw)

    points = sorted({low / r for r in raw} | {high / r for r in raw})
    # at points[0] every value sits at `low`, at points[-1] every value sits at `high`
    if total(points[0]) >= target:
        return points[0]
    for start, end in itertools.pairwise(points):
        if total(end) < target:
            continue
        # inside (start, end) each value is pinned low, pinned high, or free (linear in c)
        pinned = 0.0
        free = 0.0
        for r in raw:
            if high / r <= start:
                pinned += high
            elif low / r >= end:
                pinned += low
            else:
                free += r
        if free == 0.0:
            return end
        return min(max((target - pinned) / free, start), end)
    return points[-1]


def lr_multipliers(weights: Mapping[str, float], learning_rate: float) -> dict[str, float]:
    """The effective learning rate per model: `learning_rate * w`."""
    rate = finite_number(learning_rate, "learning_rate")
    return {model: rate * weight for model, weight in _check_weights(weights, "weights").items()}


def population_loss(val_losses: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """`sum((w_i / N) * loss_i)` with the weights that were in force during the epoch."""
    losses = _check_losses(val_losses)
    checked = _check_weights(weights, "weights")
    _require_same_models(checked, losses)
    count = len(losses)
    return sum((checked[model] / count) * loss for model, loss in losses.items())


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _check_losses(val_losses: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(val_losses, Mapping) or not val_losses:
        raise InvalidInput(
            f"val_losses must map each model to its validation loss, got {val_losses!r}.",
            field="val_losses",
        )
    return {
        model: finite_number(loss, "val_losses", subject=f"Validation loss of {model!r}")
        for model, loss in val_losses.items()
    }


def _check_weights(weights: Mapping[str, float], field: str) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        raise InvalidInput(f"{field} must map each model to its weight.", field=field)
    return {
        model: finite_number(
            weight, field, low=0, low_inclusive=False, subject=f"Weight of {model!r}"
        )
        for model, weight in weights.items()
    }


def _require_same_models(weights: Mapping[str, float], val_losses: Mapping[str, float]) -> None:
    if set(weights) != set(val_losses):
        raise InvalidInput(
            "weights and val_losses must name the same models; got "
            f"{sorted(weights)} and {sorted(val_losses)}.",
            field="val_losses",
        )
