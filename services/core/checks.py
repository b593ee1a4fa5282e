"""Value checks shared by the config and rule modules: each returns the checked value or raises
`InvalidInput` naming the field, what was wrong and what is allowed."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from services.core.errors import InvalidInput


def finite_number(
    value: object,
    field: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    subject: str | None = None,
) -> float:
    """Return `value` as a float if it is a finite int or float within the given bounds.

    `low`/`high` are optional; `*_inclusive=False` makes a bound strict. bool is refused
    although it is an int subclass: True as a rate or a loss is always a caller's mistake.
    `subject` is how the sentence names the value (default: `field`), e.g. "Weight of 'a'"
    when the field is a whole mapping.
    """
    bounds: list[str] = []
    if low is not None:
        bounds.append(f"{'at least' if low_inclusive else 'above'} {low:g}")
    if high is not None:
        bounds.append(f"{'at most' if high_inclusive else 'below'} {high:g}")
    allowed = " ".join(["a finite number", " and ".join(bounds)]).rstrip()
    problem = InvalidInput(f"{subject or field} must be {allowed}, got {value!r}.", field=field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise problem
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float, e.g. a 400-digit JSON literal
        raise problem from None
    if (
        not math.isfinite(number)
        or (low is not None and not (number >= low if low_inclusive else number > low))
        or (high is not None and not (number <= high if high_inclusive else number < high))
    ):
        raise problem
    return number


def whole_number(value: object, field: str, low: int, high: int | None = None) -> int:
    """Return `value` if it is an int from `low` to `high` (both inclusive; no upper bound when
    `high` is None). bool is refused, and so is a float such as 3.0: for a count it usually
    means a unit mix-up."""
    allowed = f"at least {low}" if high is None else f"from {low} to {high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be a whole number {allowed}, got {value!r}.", field=field)
    if value < low or (high is not None and value > high):
        raise InvalidInput(f"{field} must be {allowed}, got {value}.", field=field)
    return value


def flag(value: object, field: str) -> bool:
    """Return `value` if it is exactly True or False; 0, 1 and "yes" are refused."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false, got {value!r}.", field=field)
    return value


def known_keys(section: object, allowed: Iterable[str], field: str) -> Mapping[str, Any]:
    """`section` if it is a mapping with no key outside `allowed`: a typo never silently falls
    back to a default."""
    if not isinstance(section, Mapping):
        raise InvalidInput(f"{field} must be a mapping, got {section!r}.", field=field)
    names = tuple(allowed)
    unknown = [key for key in section if key not in names]
    if unknown:
        raise InvalidInput(
            f"Unknown key {unknown[0]!r} in {field}; allowed keys: {', '.join(names)}.",
            field=field,
        )
    return section
