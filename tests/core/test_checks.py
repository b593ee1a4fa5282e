"""Shared value checks: what each accepts, what it refuses, and the sentence it says."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.core.checks import finite_number, flag, known_keys, whole_number
from services.core.errors import InvalidInput

# --- finite_number -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "bounds", "expected"),
    [
        (0.5, {}, 0.5),
        (3, {}, 3.0),
        (-1e300, {}, -1e300),
        (0, {"low": 0}, 0.0),
        (1, {"high": 1}, 1.0),
        (0.25, {"low": 0, "low_inclusive": False, "high": 1, "high_inclusive": False}, 0.25),
        (1e-12, {"low": 0, "low_inclusive": False}, 1e-12),
    ],
)
def test_finite_number_accepts(value: object, bounds: dict[str, Any], expected: float) -> None:
    result = finite_number(value, "rate", **bounds)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize(
    ("value", "bounds", "message"),
    [
        (True, {}, "rate must be a finite number, got True."),
        (False, {"low": 0}, "rate must be a finite number at least 0, got False."),
        ("0.5", {}, "rate must be a finite number, got '0.5'."),
        (None, {}, "rate must be a finite number, got None."),
        (math.nan, {}, "rate must be a finite number, got nan."),
        (math.inf, {"low": 0}, "rate must be a finite number at least 0, got inf."),
        (-math.inf, {"high": 1}, "rate must be a finite number at most 1, got -inf."),
        (10**400, {}, f"rate must be a finite number, got {10**400!r}."),
        (-0.1, {"low": 0}, "rate must be a finite number at least 0, got -0.1."),
        (0, {"low": 0, "low_inclusive": False}, "rate must be a finite number above 0, got 0."),
        (1.5, {"high": 1}, "rate must be a finite number at most 1, got 1.5."),
        (
            1.0,
            {"low": 0, "high": 1, "high_inclusive": False},
            "rate must be a finite number at least 0 and below 1, got 1.0.",
        ),
        (
            0.0,
            {"low": 0, "low_inclusive": False, "high": 1, "high_inclusive": False},
            "rate must be a finite number above 0 and below 1, got 0.0.",
        ),
        (1e-5, {"low": 1e-4}, "rate must be a finite number at least 0.0001, got 1e-05."),
    ],
)
def test_finite_number_refuses(value: object, bounds: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        finite_number(value, "rate", **bounds)
    assert str(error.value) == message
    assert error.value.field == "rate"


def test_finite_number_subject_names_the_value_but_field_stays() -> None:
    with pytest.raises(InvalidInput) as error:
        finite_number(-1, "weights", low=0, low_inclusive=False, subject="Weight of 'a'")
    assert str(error.value) == "Weight of 'a' must be a finite number above 0, got -1."
    assert error.value.field == "weights"


@given(
    value=st.floats(allow_nan=True, allow_infinity=True),
    low=st.floats(-10, 10),
    span=st.floats(0, 10),
    low_inclusive=st.booleans(),
    high_inclusive=st.booleans(),
)
def test_finite_number_accepts_exactly_the_values_inside_the_bounds(
    value: float, low: float, span: float, low_inclusive: bool, high_inclusive: bool
) -> None:
    high = low + span
    inside = (
        math.isfinite(value)
        and (value >= low if low_inclusive else value > low)
        and (value <= high if high_inclusive else value < high)
    )

    def check() -> float:
        return finite_number(
            value,
            "x",
            low=low,
            high=high,
            low_inclusive=low_inclusive,
            high_inclusive=high_inclusive,
        )

    if inside:
        assert check() == value
    else:
        with pytest.raises(InvalidInput):
            check()


# --- whole_number --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [(1, 1, 10), (10, 1, 10), (0, 0, 2**32 - 1), (2**32 - 1, 0, 2**32 - 1), (10**30, 1, None)],
)
def test_whole_number_accepts(value: int, low: int, high: int | None) -> None:
    assert whole_number(value, "epochs", low, high) == value


@pytest.mark.parametrize(
    ("value", "low", "high", "message"),
    [
        (True, 0, 10, "epochs must be a whole number from 0 to 10, got True."),
        (False, 0, None, "epochs must be a whole number at least 0, got False."),
        (3.0, 1, 10, "epochs must be a whole number from 1 to 10, got 3.0."),
        ("3", 1, 10, "epochs must be a whole number from 1 to 10, got '3'."),
        (None, 1, None, "epochs must be a whole number at least 1, got None."),
        (0, 1, 10, "epochs must be from 1 to 10, got 0."),
        (11, 1, 10, "epochs must be from 1 to 10, got 11."),
        (0, 1, None, "epochs must be at least 1, got 0."),
        (-5, 1, None, "epochs must be at least 1, got -5."),
    ],
)
def test_whole_number_refuses(value: object, low: int, high: int | None, message: str) -> None:
    with pytest.raises(InvalidInput) as error:
        whole_number(value, "epochs", low, high)
    assert str(error.value) == message
    assert error.value.field == "epochs"


@given(value=st.integers(-1000, 1000), low=st.integers(-100, 100), span=st.integers(0, 100))
def test_whole_number_accepts_exactly_the_range(value: int, low: int, span: int) -> None:
    high = low + span
    if low <= value <= high:
        assert whole_number(value, "n", low, high) == value
    else:
        with pytest.raises(InvalidInput):
            whole_number(value, "n", low, high)


# --- flag ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [True, False])
def test_flag_accepts_booleans(value: bool) -> None:
    assert flag(value, "enabled") is value


@pytest.mark.parametrize("value", [1, 0, "yes", "true", None, 1.0])
def test_flag_refuses_anything_else(value: object) -> None:
    with pytest.raises(InvalidInput) as error:
        flag(value, "enabled")
    assert str(error.value) == f"enabled must be true or false, got {value!r}."
    assert error.value.field == "enabled"


# --- known_keys ----------------------------------------------------------------------------


def test_known_keys_accepts_a_subset() -> None:
    known_keys({}, ("a", "b"), "section")
    known_keys({"b": 1}, ("a", "b"), "section")


def test_known_keys_names_the_first_unknown_key_and_what_is_allowed() -> None:
    with pytest.raises(InvalidInput) as error:
        known_keys({"a": 1, "c": 2, "d": 3}, iter(["a", "b"]), "section")
    assert str(error.value) == "Unknown key 'c' in section; allowed keys: a, b."
    assert error.value.field == "section"
