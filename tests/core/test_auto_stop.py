"""Confidence auto-stop: streaks, min_epochs, the info payload (docs/rules.md)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.auto_stop import AutoStopConfig, AutoStopState, auto_stop_step
from services.core.errors import InvalidInput
from services.core.training_config import TRAINING_CONFIG

SEED_DEFAULTS = AutoStopConfig(threshold=0.001, patience=3, min_epochs=2)


def run(totals: list[float], config: AutoStopConfig) -> list[AutoStopState]:
    states = []
    state = AutoStopState()
    for total in totals:
        state = auto_stop_step(state, total, config)
        states.append(state)
    return states


def first_trigger(states: list[AutoStopState]) -> int | None:
    return next((s.epoch for s in states if s.triggered), None)


@pytest.mark.parametrize(
    ("totals", "fires_at"),
    [
        ([3.0, 2.5, 2.4995, 2.4990, 2.4985], 5),
        ([3.0, 2.5, 2.4995, 2.4990, 2.4985, 2.498], 5),
        ([3.0, 2.9995, 2.9990, 2.9985], 4),
        # the change at epoch 4 (0.002) resets the streak
        ([3.0, 2.9995, 2.9990, 2.9970, 2.9965, 2.9960], None),
        ([3.0, 2.9995, 2.9990, 2.9970, 2.9965, 2.9960, 2.9955], 7),
        ([4.0, 3.0, 2.0, 1.0], None),
        # a plateau at the very start counts from epoch 2
        ([1.0, 1.0, 1.0, 1.0], 4),
    ],
)
def test_streak_with_seed_defaults(totals: list[float], fires_at: int | None) -> None:
    states = run(totals, SEED_DEFAULTS)
    assert first_trigger(states) == fires_at
    if fires_at is not None:
        assert all(s.triggered for s in states[fires_at - 1 :])


def test_streak_counts_and_resets() -> None:
    states = run([3.0, 2.5, 2.4995, 2.4990, 2.4, 2.3995], SEED_DEFAULTS)
    assert [s.streak for s in states] == [0, 0, 1, 2, 0, 1]
    assert states[0].current_change is None
    assert states[1].current_change == pytest.approx(0.5)
    assert states[4].current_change == pytest.approx(0.099)


def test_a_change_equal_to_the_threshold_resets_the_streak() -> None:
    # binary-exact values, so the change is exactly the threshold
    config = AutoStopConfig(threshold=0.25, patience=1, min_epochs=1)
    states = run([1.0, 0.75, 0.5, 0.375], config)
    assert [s.streak for s in states] == [0, 0, 0, 1]
    assert first_trigger(states) == 4


def test_large_threshold_patience_one_fires_at_epoch_two() -> None:
    config = AutoStopConfig(threshold=10.0, patience=1, min_epochs=2)
    states = run([5.0, 4.0, 3.0], config)
    assert [s.triggered for s in states] == [False, True, True]


def test_triggered_stays_triggered_after_a_big_change() -> None:
    config = AutoStopConfig(threshold=0.5, patience=1, min_epochs=1)
    states = run([1.0, 1.1, 9.0], config)
    assert [s.triggered for s in states] == [False, True, True]
    assert states[-1].streak == 0


def test_disabled_tracks_but_never_fires() -> None:
    config = AutoStopConfig(enabled=False, threshold=10.0, patience=1, min_epochs=1)
    states = run([1.0, 1.0, 1.0], config)
    assert [s.streak for s in states] == [0, 1, 2]
    assert not any(s.triggered for s in states)


@given(
    st.lists(st.floats(min_value=-100, max_value=100, allow_nan=False), min_size=1, max_size=15),
    st.floats(min_value=0.0, max_value=10.0),
    st.integers(min_value=1, max_value=5),
    st.integers(min_value=1, max_value=10),
)
def test_never_fires_before_min_epochs(
    totals: list[float], threshold: float, patience: int, min_epochs: int
) -> None:
    config = AutoStopConfig(threshold=threshold, patience=patience, min_epochs=min_epochs)
    states = run(totals, config)
    for state in states:
        if state.epoch < min_epochs:
            assert not state.triggered
        # streak counts the trailing changes below the threshold, by definition
        changes = [abs(b - a) for a, b in itertools.pairwise(state.totals)]
        trailing = 0
        for change in reversed(changes):
            if change >= threshold:
                break
            trailing += 1
        assert state.streak == trailing
        fires_now = state.epoch >= min_epochs and state.streak >= patience
        earlier = any(s.triggered for s in states[: state.epoch - 1])
        assert state.triggered == (fires_now or earlier)


def test_info_at_epoch_one() -> None:
    state = auto_stop_step(AutoStopState(), 2.0, SEED_DEFAULTS)
    info = state.info(SEED_DEFAULTS)
    assert list(info) == [
        "threshold",
        "patience",
        "min_epochs",
        "current_change",
        "streak",
        "remaining",
        "triggered",
    ]
    assert info["current_change"] is None
    assert info["remaining"] == SEED_DEFAULTS.patience
    assert info["triggered"] is False


def test_info_and_window_when_fired() -> None:
    totals = [3.0, 2.5, 2.4995, 2.4990, 2.4985]
    state = run(totals, SEED_DEFAULTS)[-1]
    info = state.info(SEED_DEFAULTS)
    assert info["remaining"] == 0
    assert info["streak"] == 3
    assert info["current_change"] == pytest.approx(0.0005)
    assert info["triggered"] is True
    assert state.window(SEED_DEFAULTS) == totals[-4:]
    assert state.totals == tuple(totals)


def test_remaining_never_goes_negative() -> None:
    config = AutoStopConfig(enabled=False, patience=2)
    state = run([1.0] * 6, config)[-1]
    assert state.streak == 5
    assert state.info(config)["remaining"] == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, True, "1.0"])
def test_step_refuses_non_finite_totals(bad: object) -> None:
    with pytest.raises(InvalidInput):
        auto_stop_step(AutoStopState(), bad, SEED_DEFAULTS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": math.nan}, "threshold"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.0}, "patience"),
        ({"patience": True}, "patience"),
        ({"min_epochs": 0}, "min_epochs"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_config_refuses_bad_values(changes: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as error:
        AutoStopConfig(**changes)  # type: ignore[arg-type]
    assert error.value.field == field


def test_config_from_mapping() -> None:
    assert AutoStopConfig.from_mapping(TRAINING_CONFIG["confidence_auto_stop"]) == SEED_DEFAULTS
    assert AutoStopConfig.from_mapping({"patience": 5}).patience == 5
    with pytest.raises(InvalidInput, match="patiense"):
        AutoStopConfig.from_mapping({"patiense": 5})
