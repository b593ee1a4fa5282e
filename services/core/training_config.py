"""The one source of every training default, and the checks on what a run request may ask for.

Defaults live in `TRAINING_CONFIG` (DESIGN.md section 9); `RunConfig` is one run's validated
settings, built from the camelCase start request and stored snake_case in the run folder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from services.core.adaptive_weights import AdaptiveWeightsConfig
from services.core.auto_stop import AutoStopConfig
from services.core.checks import finite_number, whole_number
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

_NAME_RULE = (
    "use 1 to 128 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "with no '..' (a folder name, not a path)"
)


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and MODEL_NAME_RE.fullmatch(name) is not None and ".." not in name


def validate_model_name(name: object, field: str = "baseModels") -> str:
    """Return `name` if it can only ever name a folder directly under MODELS_DIR."""
    if not _valid_name(name):
        raise InvalidInput(f"Model name {name!r} is not valid: {_NAME_RULE}.", field=field)
    assert isinstance(name, str)
    return name


def validate_dataset_id(dataset_id: object, field: str = "datasetId") -> str:
    """Return `dataset_id` if it can only ever name `<id>.jsonl` directly under DATASETS_DIR."""
    if not _valid_name(dataset_id):
        raise InvalidInput(f"Dataset id {dataset_id!r} is not valid: {_NAME_RULE}.", field=field)
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


# --- one run's settings --------------------------------------------------------------------

_METHODS = ("lora", "full")
_INT32_MAX = 2**31 - 1  # the gRPC messages carry these counts as int32


@dataclass(frozen=True)
class RunConfig:
    """One run's settings, validated on construction; errors name the camelCase request field."""

    dataset_id: str
    """`$DATASETS_DIR/<dataset_id>.jsonl`."""
    base_models: tuple[str, ...]
    """Folders under MODELS_DIR, 1 to `limits.max_models`, distinct."""
    epochs: int
    """Planned epochs, 1 to `limits.max_epochs`; auto-stop may end the run earlier."""
    learning_rate: float
    """Base learning rate; each model trains at `learning_rate * weight`."""
    batch_size: int
    seed: int
    """Seeds the split, the shuffling and the initialisation; 0 to 2**32 - 1."""
    method: str
    """"lora" (adapters only) or "full" (every parameter)."""
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    max_seq_length: int
    """Tokens per example after truncation, 8 to `limits.max_seq_length`."""
    validation_split: float
    """Share of records held out for validation, strictly between 0 and 1."""
    weight_decay: float
    refresh_interval: float
    """Seconds between progress events."""
    adaptive_weights: AdaptiveWeightsConfig
    auto_stop: AutoStopConfig

    def __post_init__(self) -> None:
        validate_dataset_id(self.dataset_id)
        if isinstance(self.base_models, (list, tuple)):
            object.__setattr__(self, "base_models", tuple(validate_base_models(self.base_models)))
        else:
            validate_base_models(self.base_models)
        whole_number(self.epochs, "epochs", 1, _LIMITS["max_epochs"])
        numbers = {
            "learning_rate": finite_number(
                self.learning_rate, "learningRate", low=0, low_inclusive=False
            ),
            "lora_dropout": finite_number(
                self.lora_dropout, "loraDropout", low=0, high=1, high_inclusive=False
            ),
            "validation_split": finite_number(
                self.validation_split,
                "validationSplit",
                low=0,
                low_inclusive=False,
                high=1,
                high_inclusive=False,
            ),
            "weight_decay": finite_number(self.weight_decay, "weightDecay", low=0),
            "refresh_interval": finite_number(
                self.refresh_interval, "refreshInterval", low=0, low_inclusive=False
            ),
        }
        for name, number in numbers.items():
            object.__setattr__(self, name, number)
        whole_number(self.batch_size, "batchSize", 1, _LIMITS["max_batch_size"])
        whole_number(self.seed, "seed", 0, 2**32 - 1)
        if self.method not in _METHODS:
            raise InvalidInput(
                f"method must be one of {', '.join(_METHODS)}, got {self.method!r}.",
                field="method",
            )
        whole_number(self.lora_rank, "loraRank", 1, _LIMITS["max_lora_rank"])
        whole_number(self.lora_alpha, "loraAlpha", 1, _INT32_MAX)
        whole_number(self.max_seq_length, "maxSeqLength", 8, _LIMITS["max_seq_length"])
        if not isinstance(self.adaptive_weights, AdaptiveWeightsConfig):
            raise InvalidInput(
                "adaptive_weights must be an AdaptiveWeightsConfig.", field="adaptiveWeights"
            )
        if not isinstance(self.auto_stop, AutoStopConfig):
            raise InvalidInput("auto_stop must be an AutoStopConfig.", field="autoStop")

    @classmethod
    def from_request(
        cls, body: Mapping[str, Any], config: Mapping[str, Any] | None = None
    ) -> RunConfig:
        """Build from the camelCase start body; absent (or null) optional fields take the
        defaults in `config` (default `TRAINING_CONFIG`). Limits always come from
        `TRAINING_CONFIG`."""
        if not isinstance(body, Mapping):
            raise InvalidInput(
                f"The request body must be a JSON object with {', '.join(_REQUEST_FIELDS)}.",
                field="body",
            )
        for key in body:
            if key not in _REQUEST_FIELDS:
                raise InvalidInput(
                    f"Unknown field {key!r}; allowed fields: {', '.join(_REQUEST_FIELDS)}.",
                    field=str(key),
                )
        source = TRAINING_CONFIG if config is None else config
        defaults = source["defaults"]
        stop = source["confidence_auto_stop"]

        def pick(request_name: str, default: Any) -> Any:
            value = body.get(request_name)
            return default if value is None else value

        if body.get("datasetId") is None:
            raise InvalidInput(
                "datasetId is required: name a dataset in DATASETS_DIR.", field="datasetId"
            )
        # checked here so the error names the request field, not AutoStopConfig's own
        threshold = finite_number(
            pick("autoStopThreshold", stop["threshold"]), "autoStopThreshold", low=0
        )
        patience = whole_number(
            pick("autoStopPatience", stop["patience"]), "autoStopPatience", 1, _INT32_MAX
        )
        min_epochs = whole_number(pick("minEpochs", stop["min_epochs"]), "minEpochs", 1, _INT32_MAX)
        base_models = body.get("baseModels")
        return cls(
            dataset_id=body["datasetId"],
            base_models=tuple(validate_base_models(base_models)),
            epochs=pick("epochs", defaults["epochs"]),
            learning_rate=pick("learningRate", defaults["learning_rate"]),
            batch_size=pick("batchSize", defaults["batch_size"]),
            seed=pick("seed", defaults["seed"]),
            method=pick("method", defaults["method"]),
            lora_rank=pick("loraRank", defaults["lora_rank"]),
            lora_alpha=pick("loraAlpha", defaults["lora_alpha"]),
            lora_dropout=pick("loraDropout", defaults["lora_dropout"]),
            max_seq_length=pick("maxSeqLength", defaults["max_seq_length"]),
            validation_split=pick("validationSplit", defaults["validation_split"]),
            weight_decay=defaults["weight_decay"],
            refresh_interval=pick(
                "refreshInterval", source["live_leaderboard"]["refresh_interval"]
            ),
            adaptive_weights=AdaptiveWeightsConfig.from_mapping(source["adaptive_weights"]),
            auto_stop=AutoStopConfig(
                enabled=stop["enabled"],
                threshold=threshold,
                patience=patience,
                min_epochs=min_epochs,
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """snake_case and JSON-ready, as stored in training_results.json and the DNA."""
        data = asdict(self)
        data["base_models"] = list(self.base_models)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        """The inverse of `to_dict` (for resume and the worker process)."""
        _require_keys(data, _DICT_FIELDS, "run config")
        values = dict(data)
        adaptive = values.pop("adaptive_weights")
        stop = values.pop("auto_stop")
        _require_keys(adaptive, _ADAPTIVE_FIELDS, "adaptive_weights")
        _require_keys(stop, _AUTO_STOP_FIELDS, "auto_stop")
        base_models = values.pop("base_models")
        if not isinstance(base_models, (list, tuple)):
            raise InvalidInput(
                f"base_models must be a list of model names, got {base_models!r}.",
                field="base_models",
            )
        return cls(
            base_models=tuple(base_models),
            adaptive_weights=AdaptiveWeightsConfig(**adaptive),
            auto_stop=AutoStopConfig(**stop),
            **values,
        )


_REQUEST_FIELDS = (
    "datasetId",
    "baseModels",
    "epochs",
    "learningRate",
    "batchSize",
    "seed",
    "method",
    "loraRank",
    "loraAlpha",
    "loraDropout",
    "maxSeqLength",
    "validationSplit",
    "refreshInterval",
    "autoStopThreshold",
    "autoStopPatience",
    "minEpochs",
)
_DICT_FIELDS = tuple(RunConfig.__dataclass_fields__)
_ADAPTIVE_FIELDS = tuple(AdaptiveWeightsConfig.__dataclass_fields__)
_AUTO_STOP_FIELDS = tuple(AutoStopConfig.__dataclass_fields__)


def _require_keys(data: object, keys: Sequence[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{what} must be a mapping, got {data!r}.", field=what)
    missing = [key for key in keys if key not in data]
    unknown = [key for key in data if key not in keys]
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown {unknown}"
        raise InvalidInput(
            f"{what} has {problem} keys; expected exactly: {', '.join(keys)}.",
            field=(missing or unknown)[0],
        )
