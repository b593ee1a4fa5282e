"""The one source of every training default: the start options a run may be given, each
described once with its default, limits and help; `TRAINING_CONFIG`, which holds those
defaults beside the rest of the suite's settings; and the rules for run ids and names.

A start option is a field of `StartRunRequest` and `RunConfig` in
protos/oneseek/training/v1/training.proto plus one `StartOption` below (the tests hold the two
to each other); everything else derives from them: the checks of every entry point, the CLI's
flags, the OpenAPI schema, the page's form (GET /api/config lists the options).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

from services.core.checks import finite_number, flag, whole_number
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


_LIMITS: Mapping[str, int] = {
    "max_models": 10,
    "max_epochs": 100,
    "max_batch_size": 1024,
    "max_lora_rank": 1024,
    "max_seq_length": 32768,
}
_METADATA: Mapping[str, Any] = {
    "naming_pattern": "run-{timestamp}",
    "timestamp_format": "%Y%m%d-%H%M%S",
    "use_atomic_writes": True,
    "temp_suffix": ".tmp",
    "run_id_pattern": r"^run-\d{8}-\d{6}(-\d+)?$",
    "certified_dir": "oneseek-certified",
}


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


# --- the start options ---------------------------------------------------------------------

_INT32_MAX = 2**31 - 1
_KINDS: tuple[tuple[type, str], ...] = ((bool, "boolean"), (int, "integer"), (float, "number"))


@dataclass(frozen=True)
class StartOption:
    """One option of the start request: its default, limits and words. Its type is its
    default's (or `kind`, for a required one); its camelCase name is the proto field's json_name."""

    name: str
    """Its field in StartRunRequest (snake_case)."""
    label: str
    """How the page's form names it."""
    help: str
    """One sentence for the form, the CLI's --help and the OpenAPI schema."""
    default: Any = None
    """Its default, kept in TRAINING_CONFIG[section][key]; None makes the option required."""
    section: str = "defaults"
    key: str = ""
    """Its key in `section`, when not `name`."""
    kind: str = ""
    """integer, number, boolean, enum, string or array: when there is no default to tell it."""
    low: float | None = None
    """Smallest value (for a list: fewest items)."""
    high: float | None = None
    """Largest value (for a list: most items)."""
    low_inclusive: bool = True
    high_inclusive: bool = True
    target: str = ""
    """The RunConfig field it sets, dotted (`auto_stop.threshold`), when not `name`."""
    group: str = "training"
    """The page form's group: training, auto_stop or advanced (generation: the Try it panel's
    options); "" for a field the page draws itself (the dataset picker, the model list)."""
    choices: Mapping[str, str] = field(default_factory=dict)
    """An enum's values (the proto enum's, lower-case) and how the form labels each."""
    when: Mapping[str, str] = field(default_factory=dict)
    """Only meaningful while these other options (camelCase) have these values."""
    check: Callable[[Any], Any] | None = None
    """Checks a value of a name-like option; numbers and enums are checked from the limits."""
    missing: str = ""
    """The error when a required option is absent."""
    flag: str = ""
    """The CLI flag, when not `--kebab-case` of `name`."""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name)
        if not self.kind:
            kind = "enum" if self.choices else next(k for t, k in _KINDS if type(self.default) is t)
            object.__setattr__(self, "kind", kind)

    @property
    def camel(self) -> str:
        """The proto's json_name of `name`: its underscores dropped, the next letter raised."""
        return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), self.name)

    @property
    def required(self) -> bool:
        return self.default is None

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def hint(self) -> str:
        """What the limits allow, in a few characters: "1–100", "> 0", "≥ 0, < 1". A bound
        beyond a million guards against absurd input; it is not shown."""
        low, high = self.low, self.high if (self.high or 0) <= 1e6 else None
        if self.kind not in ("integer", "number"):
            return ""
        if low is not None and high is not None and self.low_inclusive and self.high_inclusive:
            return f"{low:g}–{high:g}"
        parts = [] if low is None else [f"{'≥' if self.low_inclusive else '>'} {low:g}"]
        if high is not None:
            parts.append(f"{'≤' if self.high_inclusive else '<'} {high:g}")
        return ", ".join(parts)

    def default_value(self, config: Mapping[str, Any] | None = None) -> Any:
        """The default `config` holds (TRAINING_CONFIG unless another is given)."""
        return (TRAINING_CONFIG if config is None else config)[self.section][self.key]

    def parse(self, value: object) -> Any:
        """`value` as the option holds it (int, float, bool, str or list of str); InvalidInput
        naming the camelCase field and what it allows, if it is not one."""
        name, kind = self.camel, self.kind
        if self.check is not None:
            return self.check(value)
        if kind == "integer":
            high = None if self.high is None else int(self.high)
            return whole_number(value, name, int(self.low or 0), high)
        if kind == "number":
            return finite_number(
                value,
                name,
                low=self.low,
                high=self.high,
                low_inclusive=self.low_inclusive,
                high_inclusive=self.high_inclusive,
            )
        if kind == "boolean":
            return flag(value, name)
        if kind == "enum" and value in self.choices:
            return value
        raise InvalidInput(
            f"{name} must be one of {', '.join(self.choices)}, got {value!r}.", field=name
        )

    def schema(self) -> dict[str, Any]:
        """The JSON Schema of the option's value (not nullable)."""
        kind = self.kind
        schema: dict[str, Any] = {"description": self.help}
        if kind == "array":
            item = {"type": "string", "pattern": MODEL_NAME_RE.pattern}
            schema.update(type="array", items=item, uniqueItems=True)
            schema.update(minItems=self.low, maxItems=self.high)
        elif kind == "string":
            schema.update(type="string", pattern=MODEL_NAME_RE.pattern)
        elif kind == "enum":
            schema.update(type="string", enum=list(self.choices))
        else:
            schema["type"] = kind
            for bound, inclusive, plain, strict in (
                (self.low, self.low_inclusive, "minimum", "exclusiveMinimum"),
                (self.high, self.high_inclusive, "maximum", "exclusiveMaximum"),
            ):
                if bound is not None:
                    schema[plain if inclusive else strict] = bound
        return {key: value for key, value in schema.items() if value is not None}

    def describe(self, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """What the page's form needs: GET /api/config lists one of these per option."""
        return {
            "name": self.camel,
            "label": self.label,
            "help": self.help,
            "group": self.group,
            "required": self.required,
            "hint": self.hint,
            "default": None if self.required else self.default_value(config),
            "schema": self.schema(),
            "choices": [{"value": v, "label": label} for v, label in self.choices.items()],
            "when": dict(self.when),
        }


_LORA = {"method": "lora"}
_STOP, _LIVE = "confidence_auto_stop", "live_leaderboard"
_Opt = StartOption

# fmt: off
START_OPTIONS: tuple[StartOption, ...] = (
    _Opt("dataset_id", "Dataset", "A dataset in DATASETS_DIR (<id>.jsonl).", kind="string",
         group="", check=validate_dataset_id, flag="--dataset",
         missing="datasetId is required: name a dataset in DATASETS_DIR."),
    _Opt("base_models", "Base models", "Base models in MODELS_DIR, trained side by side on the "
         "same data; there is no default.", kind="array", group="", low=1,
         high=_LIMITS["max_models"], check=validate_base_models, flag="--models",
         missing="No base models selected"),
    _Opt("epochs", "Epochs", "Planned epochs; auto-stop may end the run earlier.", 3,
         low=1, high=_LIMITS["max_epochs"]),
    _Opt("learning_rate", "Learning rate", "Base learning rate; each model trains at this rate "
         "times its adaptive weight.", 1e-4, low=0, low_inclusive=False),
    _Opt("batch_size", "Batch size", "Examples per optimizer step.", 8,
         low=1, high=_LIMITS["max_batch_size"]),
    _Opt("seed", "Seed", "Seeds the validation split, the shuffling and the initialisation.", 42,
         low=0, high=2**32 - 1),
    _Opt("method", "Method", "lora trains adapters on a frozen base model; full trains every "
         "parameter.", "lora", choices={"lora": "LoRA adapters", "full": "Full fine-tune"}),
    _Opt("lora_rank", "LoRA rank", "Rank of each LoRA update.", 8,
         low=1, high=_LIMITS["max_lora_rank"], when=_LORA),
    _Opt("precision", "Precision", "What the models compute in: auto is bf16 on a GPU that "
         "supports it, fp16 on one that does not, fp32 on a CPU.", "auto",
         choices={"auto": "Auto", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16 (GPU only)"}),
    _Opt("auto_stop_threshold", "Threshold", "An epoch whose population loss moves by less than "
         "this counts towards the streak.", 0.001, _STOP, "threshold", low=0,
         target="auto_stop.threshold", group="auto_stop"),
    _Opt("auto_stop_patience", "Patience", "How many such epochs in a row stop the run.", 3,
         _STOP, "patience", low=1, high=_INT32_MAX, target="auto_stop.patience",
         group="auto_stop"),
    _Opt("min_epochs", "Min epochs", "Auto-stop never ends a run before this epoch.", 2, _STOP,
         low=1, high=_INT32_MAX, target="auto_stop.min_epochs", group="auto_stop"),
    _Opt("lora_alpha", "LoRA alpha", "Scales each LoRA update by alpha / rank.", 16,
         low=1, high=_INT32_MAX, group="advanced", when=_LORA),
    _Opt("lora_dropout", "LoRA dropout", "Dropout on the input of each LoRA update.", 0.05,
         low=0, high=1, high_inclusive=False, group="advanced", when=_LORA),
    _Opt("gradient_checkpointing", "Gradient checkpointing", "Keep only each layer's input "
         "and recompute the rest in the backward pass: far less activation memory, about a "
         "third more compute.", False, group="advanced"),
    _Opt("quantization", "Quantization", "4bit keeps the frozen base in NF4 (QLoRA): about a "
         "quarter of bf16's weight memory; needs a CUDA GPU and bitsandbytes.", "none",
         choices={"none": "None", "4bit": "4-bit NF4 (QLoRA)"}, group="advanced", when=_LORA),
    _Opt("max_seq_length", "Max tokens", "Tokens per example after truncation.", 256,
         low=8, high=_LIMITS["max_seq_length"], group="advanced"),
    _Opt("validation_split", "Validation split", "Share of the records held out for "
         "validation, never trained on.", 0.1, low=0, high=1, low_inclusive=False,
         high_inclusive=False, group="advanced"),
    _Opt("refresh_interval", "Progress interval (s)", "Seconds between progress events.", 5,
         _LIVE, kind="number", low=0, low_inclusive=False, group="advanced"),
)
# fmt: on
"""Every start option, in the order the form and the CLI show them."""


# --- the generation options ----------------------------------------------------------------

_GEN = "generation"
# fmt: off
GENERATE_OPTIONS: tuple[StartOption, ...] = (
    _Opt("max_new_tokens", "Max new tokens", "The most tokens each model adds to the prompt.",
         128, _GEN, low=1, high=4096, group=_GEN),
    _Opt("temperature", "Temperature", "0 decodes greedily (the same answer every time); "
         "higher values sample more freely.", 0.0, _GEN, low=0, high=2, group=_GEN),
    _Opt("top_p", "Top-p", "Sampling keeps the fewest tokens whose probabilities add up to "
         "this.", 1.0, _GEN, low=0, high=1, low_inclusive=False, group=_GEN),
    _Opt("seed", "Seed", "Seeds sampling: the same seed, prompt and options give the same "
         "answer.", 0, _GEN, low=0, high=2**32 - 1, group=_GEN),
)
# fmt: on
"""The numeric options of GenerateRequest (its prompt, messages, models and stop texts are
checked by services.api.generate_request, within the `generation` limits below)."""

_GENERATION_LIMITS: Mapping[str, int] = {
    "max_prompt_chars": 100_000,
    "max_messages": 64,
    "max_stop": 4,
    "max_stop_chars": 64,
    "max_concurrent": 4,
    "max_per_client": 2,
}


def public_config() -> dict[str, Any]:
    """GET /api/config: TRAINING_CONFIG, and every start and generation option as the page's
    forms need it."""
    return {
        **get_config(),
        "start_options": [option.describe() for option in START_OPTIONS],
        "generate_options": [option.describe() for option in GENERATE_OPTIONS],
    }


# --- the config ----------------------------------------------------------------------------


def _option_defaults(section: str) -> dict[str, Any]:
    return {o.key: o.default for o in START_OPTIONS if o.section == section and not o.required}


TRAINING_CONFIG: Mapping[str, Any] = _freeze(
    {
        "defaults": {**_option_defaults("defaults"), "weight_decay": 0.0, "max_active_runs": 1},
        "limits": _LIMITS,
        "adaptive_weights": {
            "enabled": True,
            "min_multiplier": 0.5,
            "max_multiplier": 1.5,
            "adjust_strategy": {"top_model_boost": 0.3, "bottom_model_penalty": 0.4},
            "normalize_weights": True,
        },
        "confidence_auto_stop": {"enabled": True, **_option_defaults("confidence_auto_stop")},
        "live_leaderboard": _option_defaults("live_leaderboard"),
        "metadata": _METADATA,
        # trying a finished run's models; cache_bytes 0: half of this machine's memory
        "generation": {
            **{o.key: o.default for o in GENERATE_OPTIONS},
            **_GENERATION_LIMITS,
            "cache_bytes": 0,
        },
    }
)
"""Read-only. Change a default in its StartOption (or here) and every service, the CLI and the
page follow."""


def get_config() -> dict[str, Any]:
    """A deep, mutable, JSON-serialisable copy of `TRAINING_CONFIG`."""
    config: dict[str, Any] = _thaw(TRAINING_CONFIG)
    return config
