"""The one source of every training default, and the rules for run ids and model names.

Defaults live in `TRAINING_CONFIG` (README: configuration). What a start request may ask for is
described once in `services.api.run_config`, which takes its defaults and limits from here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from services.core.errors import ArtifactError, InvalidInput, NotFound


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(item) for key, item in value.items()}
    if isinstance(value, tuple):
        return [_thaw(item) for item in value]
    return value


TRAINING_CONFIG: Mapping[str, Any] = _freeze(
    {
        "defaults": {
            "epochs": 3,
            "learning_rate": 1e-4,
            "batch_size": 8,
            "method": "lora",
            "lora_rank": 8,
            "lora_alpha": 16,
            "lora_dropout": 0.05,
            "max_seq_length": 256,
            "seed": 42,
            "validation_split": 0.1,
            "weight_decay": 0.0,
            "max_active_runs": 1,
        },
        "limits": {
            "max_models": 10,
            "max_epochs": 100,
            "max_batch_size": 1024,
            "max_lora_rank": 1024,
            "max_seq_length": 32768,
        },
        "adaptive_weights": {
            "enabled": True,
            "min_multiplier": 0.5,
            "max_multiplier": 1.5,
            "adjust_strategy": {"top_model_boost": 0.3, "bottom_model_penalty": 0.4},
            "normalize_weights": True,
        },
        "confidence_auto_stop": {
            "enabled": True,
            "threshold": 0.001,
            "patience": 3,
            "min_epochs": 2,
        },
        "live_leaderboard": {"refresh_interval": 5},
        "metadata": {
            "naming_pattern": "run-{timestamp}",
            "timestamp_format": "%Y%m%d-%H%M%S",
            "use_atomic_writes": True,
            "temp_suffix": ".tmp",
            "run_id_pattern": r"^run-\d{8}-\d{6}(-\d+)?$",
            "certified_dir": "oneseek-certified",
        },
    }
)
"""Read-only. Change a default here and every service, the CLI and the page follow."""

_LIMITS = TRAINING_CONFIG["limits"]
_METADATA = TRAINING_CONFIG["metadata"]


def get_config() -> dict[str, Any]:
    """A deep, mutable, JSON-serialisable copy of `TRAINING_CONFIG` (what `/api/config` serves)."""
    config: dict[str, Any] = _thaw(TRAINING_CONFIG)
    return config


# --- run ids -------------------------------------------------------------------------------

# re.ASCII: a bare \d also matches "２" or "٢", which must never reach a folder name
RUN_ID_RE: re.Pattern[str] = re.compile(_METADATA["run_id_pattern"], re.ASCII)


def validate_run_id(run_id: object) -> str:
    """Return `run_id` if it is `run-YYYYMMDD-HHMMSS[-N]`; else InvalidInput(field="runId")."""
    # fullmatch: with match(), "$" would also accept a trailing newline
    if not isinstance(run_id, str) or RUN_ID_RE.fullmatch(run_id) is None:
        raise InvalidInput(
            f"Run id {run_id!r} is not valid: expected run-YYYYMMDD-HHMMSS, optionally followed "
            "by -N (ASCII digits only), e.g. run-20260131-142500.",
            field="runId",
        )
    return run_id


def generate_run_id(
    now: datetime | None = None,
    exists: Callable[[str], bool] = lambda _: False,
) -> str:
    """`run-YYYYMMDD-HHMMSS` in UTC; when `exists` says it is taken, `-2`, `-3`, ... follow.

    A naive `now` is taken to be UTC already.
    """
    if now is None:
        now = datetime.now(timezone.utc)
    elif now.tzinfo is None:
        now = now.replace(tzinfo=timezone.utc)
    else:
        now = now.astimezone(timezone.utc)
    stamp = now.strftime(_METADATA["timestamp_format"])
    base: str = _METADATA["naming_pattern"].format(timestamp=stamp)
    if not exists(base):
        return base
    # more runs than this in one second means `exists` is broken, not that the runs are real
    for suffix in range(2, 100_000):
        candidate = f"{base}-{suffix}"
        if not exists(candidate):
            return candidate
    raise ArtifactError(
        f"Could not find a free run id for {base}: every suffix up to -99999 exists."
    )


# --- model and dataset names ---------------------------------------------------------------

MODEL_NAME_RE: re.Pattern[str] = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""A folder name under MODELS_DIR or DATASETS_DIR, never a path. Use with fullmatch."""

NAME_RULE = (
    "use 1 to 128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "with no '..' (a folder name, not a path)"
)


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None and ".." not in name


def validate_model_name(name: object, field: str = "baseModels") -> str:
    """Return `name` if it can only ever name a folder directly under MODELS_DIR."""
    if not _valid_name(name):
        raise InvalidInput(f"Model name {name!r} is not valid: {NAME_RULE}.", field=field)
    assert isinstance(name, str)
    return name


def validate_dataset_id(dataset_id: object, field: str = "datasetId") -> str:
    """Return `dataset_id` if it can only ever name `<id>.jsonl` directly under DATASETS_DIR."""
    if not _valid_name(dataset_id):
        raise InvalidInput(f"Dataset id {dataset_id!r} is not valid: {NAME_RULE}.", field=field)
    assert isinstance(dataset_id, str)
    return dataset_id


def validate_base_models(
    names: Sequence[object] | None,
    available: Sequence[str] | None = None,
) -> list[str]:
    """Check a selection of base models: 1 to `limits.max_models` distinct, valid names, and,
    when `available` is given, each one present there. There is no default model."""
    field = "baseModels"
    if names is None:
        raise InvalidInput("No base models selected", field=field)
    if not isinstance(names, (list, tuple)):
        raise InvalidInput(f"baseModels must be a list of model names, got {names!r}.", field=field)
    if not names:
        raise InvalidInput("No base models selected", field=field)
    limit: int = _LIMITS["max_models"]
    if len(names) > limit:
        raise InvalidInput(
            f"Too many base models: {len(names)} selected, at most {limit} are allowed.",
            field=field,
        )
    checked: list[str] = []
    for name in names:
        valid = validate_model_name(name, field)
        if valid in checked:
            raise InvalidInput(
                f"Base model {valid!r} is selected twice; select each model once.", field=field
            )
        checked.append(valid)
    if available is not None:
        for name in checked:
            if name not in available:
                listed = ", ".join(sorted(available)) or "none (run `oneseek demo-assets`)"
                raise NotFound(
                    f"Base model {name!r} was not found in MODELS_DIR; available: {listed}.",
                    field=field,
                )
    return checked
