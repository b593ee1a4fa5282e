"""Confidence auto-stop: end a run once the population loss has stopped moving.

A pure step function over an immutable state (docs/rules.md); the trainer keeps the state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from services.core.checks import finite_number, flag, known_keys, whole_number
from services.core.training_config import TRAINING_CONFIG

_SECTION = "confidence_auto_stop"
_DEFAULTS = TRAINING_CONFIG[_SECTION]
_KEYS = ("enabled", "threshold", "patience", "min_epochs")


@dataclass(frozen=True)
class AutoStopConfig:
    """When a plateau in the population loss ends the run (defaults: the
    `confidence_auto_stop` section of TRAINING_CONFIG)."""

    enabled: bool = _DEFAULTS["enabled"]
    """False still tracks change and streak (for display) but never stops the run."""
    threshold: float = _DEFAULTS["threshold"]
    """An epoch-to-epoch change below this counts towards the streak; >= 0."""
    patience: int = _DEFAULTS["patience"]
    """Consecutive small changes needed to stop; >= 1."""
    min_epochs: int = _DEFAULTS["min_epochs"]
    """Never stop before this epoch; >= 1."""

    def __post_init__(self) -> None:
        flag(self.enabled, "enabled")
        object.__setattr__(self, "threshold", finite_number(self.threshold, "threshold", low=0))
        whole_number(self.patience, "patience", 1)
        whole_number(self.min_epochs, "min_epochs", 1)

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any]) -> AutoStopConfig:
        """Build from `TRAINING_CONFIG["confidence_auto_stop"]`; absent keys keep the defaults,
        unknown keys are refused so a typo never silently falls back."""
        return cls(**known_keys(section, _KEYS, _SECTION))


@dataclass(frozen=True)
class AutoStopState:
    """Where auto-stop stands after `epoch` epochs."""

    epoch: int = 0
    """Epochs seen so far."""
    previous_total: float | None = None
    """The latest epoch's total loss: the next epoch's change is measured against it."""
    current_change: float | None = None
    """|total_e - total_(e-1)| of the latest epoch; None before there are two epochs."""
    streak: int = 0
    """Consecutive epochs whose change was below the threshold."""
    triggered: bool = False
    """Once true it stays true."""
    totals: tuple[float, ...] = ()
    """Every epoch's total loss so far."""

    def info(self, config: AutoStopConfig) -> dict[str, Any]:
        """The `auto_stop_info` payload of events and metrics."""
        return {
            "threshold": config.threshold,
            "patience": config.patience,
            "min_epochs": config.min_epochs,
            "current_change": self.current_change if self.epoch > 1 else None,
            "streak": self.streak,
            "remaining": max(config.patience - self.streak, 0),
            "triggered": self.triggered,
        }

    def window(self, config: AutoStopConfig) -> list[float]:
        """The totals that decided it: the last patience + 1 (patience changes)."""
        return list(self.totals[-(config.patience + 1) :])


def auto_stop_step(
    state: AutoStopState, total_loss: float, config: AutoStopConfig
) -> AutoStopState:
    """Fold one epoch's population loss into the state."""
    total = finite_number(total_loss, "total_loss")
    epoch = state.epoch + 1
    change: float | None = None
    streak = 0
    if state.previous_total is not None:
        change = abs(total - state.previous_total)
        streak = state.streak + 1 if change < config.threshold else 0
    fired = config.enabled and epoch >= config.min_epochs and streak >= config.patience
    return replace(
        state,
        epoch=epoch,
        previous_total=total,
        current_change=change,
        streak=streak,
        triggered=state.triggered or fired,
        totals=(*state.totals, total),
    )
