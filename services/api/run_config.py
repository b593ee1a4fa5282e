"""A run's settings: every start option described once, and the RunConfig built from them.

The proto says what travels: `StartRunRequest` (what a client may ask for) and `RunConfig` (what a
run trains with), in protos/oneseek/training/v1/training.proto. `START_OPTIONS` says the rest,
once per option: its limits, where its default lives in TRAINING_CONFIG, its label and help.
Everything else derives from the two: the camelCase names are the proto's `json_name`; a REST
body, a gRPC request and the CLI's flags pass the same checks, whose errors name the camelCase
field; the CLI's flags, the OpenAPI schema and the page's form are built from the descriptions.

Adding an option: a field in `StartRunRequest` and in `RunConfig`, and one `StartOption` here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.api import training_pb2
from services.api.codec import (
    INTEGER_TYPES,
    NUMBER_TYPES,
    dict_to_message,
    enum_from_str,
    enum_to_str,
    message_to_dict,
)
from services.core.adaptive_weights import AdaptiveWeightsConfig
from services.core.auto_stop import AutoStopConfig
from services.core.checks import finite_number, flag, whole_number
from services.core.errors import InvalidInput
from services.core.training_config import (
    MODEL_NAME_RE,
    TRAINING_CONFIG,
    get_config,
    validate_base_models,
    validate_dataset_id,
)

RunConfig = training_pb2.RunConfig
"""One run's effective settings: the request's values over TRAINING_CONFIG's defaults."""

_REQUEST: Any = training_pb2.StartRunRequest.DESCRIPTOR
_LIMITS = TRAINING_CONFIG["limits"]
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class StartOption:
    """One option of the start request: what the proto cannot say about it."""

    name: str
    """Its field in StartRunRequest (snake_case); the camelCase name is that field's json_name."""
    label: str
    """How the page's form names it."""
    help: str
    """One sentence for the form, the CLI's --help and the OpenAPI schema."""
    default: tuple[str, ...] = ()
    """Where its default lives in TRAINING_CONFIG; () makes the option required."""
    low: float | None = None
    """Smallest value (for a list: fewest items)."""
    high: float | None = None
    """Largest value (for a list: most items)."""
    low_inclusive: bool = True
    high_inclusive: bool = True
    target: str = ""
    """The RunConfig field it sets, dotted (`auto_stop.threshold`), when not `name`."""
    group: str = "training"
    """The page form's group: training, auto_stop or advanced; "" for a field the page draws
    itself (the dataset picker, the model list)."""
    choices: Mapping[str, str] = field(default_factory=dict)
    """For an enum: how the form labels each value (the values themselves come from the proto)."""
    when: Mapping[str, str] = field(default_factory=dict)
    """Only meaningful while these other options (camelCase) have these values."""
    check: Callable[[Any], Any] | None = None
    """Checks a value of a name-like option; numbers and enums are checked from the limits."""
    missing: str = ""
    """The error when a required option is absent."""
    flag: str = ""
    """The CLI flag, when not `--kebab-case` of `name`."""

    # ---- what the proto says ----------------------------------------------------------------

    @property
    def descriptor(self) -> Any:
        return _REQUEST.fields_by_name[self.name]

    @property
    def camel(self) -> str:
        return str(self.descriptor.json_name)

    @property
    def kind(self) -> str:
        """integer, number, boolean, enum, string or array."""
        descriptor = self.descriptor
        if descriptor.is_repeated:
            return "array"
        if descriptor.type == FieldDescriptor.TYPE_ENUM:
            return "enum"
        if descriptor.type in INTEGER_TYPES:
            return "integer"
        if descriptor.type in NUMBER_TYPES:
            return "number"
        if descriptor.type == FieldDescriptor.TYPE_BOOL:
            return "boolean"
        return "string"

    @property
    def values(self) -> list[str]:
        """An enum's allowed values, as the JSON spells them."""
        enum = self.descriptor.enum_type
        return [str(enum_to_str(enum, value.number)) for value in enum.values if value.number]

    @property
    def required(self) -> bool:
        return not self.default

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    # ---- what follows from it -------------------------------------------------------------

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
        if kind == "enum" and value in self.values:
            return value
        allowed = ", ".join(self.values)
        raise InvalidInput(f"{name} must be one of {allowed}, got {value!r}.", field=name)

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

    def default_value(self, config: Mapping[str, Any] = TRAINING_CONFIG) -> Any:
        node: Any = config
        for key in self.default:
            node = node[key]
        return node

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
            schema.update(type="string", enum=self.values)
        else:
            schema["type"] = kind
            for bound, inclusive, plain, strict in (
                (self.low, self.low_inclusive, "minimum", "exclusiveMinimum"),
                (self.high, self.high_inclusive, "maximum", "exclusiveMaximum"),
            ):
                if bound is not None:
                    schema[plain if inclusive else strict] = bound
        return {key: value for key, value in schema.items() if value is not None}

    def describe(self, config: Mapping[str, Any] = TRAINING_CONFIG) -> dict[str, Any]:
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
            "choices": [
                {"value": value, "label": self.choices.get(value, value)}
                for value in (self.values if self.kind == "enum" else [])
            ],
            "when": dict(self.when),
        }


_LORA = {"method": "lora"}
_DEFAULTS, _STOP, _LIVE = "defaults", "confidence_auto_stop", "live_leaderboard"
_Opt = StartOption

# fmt: off
START_OPTIONS: tuple[StartOption, ...] = (
    _Opt("dataset_id", "Dataset", "A dataset in DATASETS_DIR (<id>.jsonl).", group="",
         check=validate_dataset_id, flag="--dataset",
         missing="datasetId is required: name a dataset in DATASETS_DIR."),
    _Opt("base_models", "Base models", "Base models in MODELS_DIR, trained side by side on the "
         "same data; there is no default.", group="", low=1, high=_LIMITS["max_models"],
         check=validate_base_models, flag="--models", missing="No base models selected"),
    _Opt("epochs", "Epochs", "Planned epochs; auto-stop may end the run earlier.",
         (_DEFAULTS, "epochs"), low=1, high=_LIMITS["max_epochs"]),
    _Opt("learning_rate", "Learning rate", "Base learning rate; each model trains at this rate "
         "times its adaptive weight.", (_DEFAULTS, "learning_rate"), low=0, low_inclusive=False),
    _Opt("batch_size", "Batch size", "Examples per optimizer step.",
         (_DEFAULTS, "batch_size"), low=1, high=_LIMITS["max_batch_size"]),
    _Opt("seed", "Seed", "Seeds the validation split, the shuffling and the initialisation.",
         (_DEFAULTS, "seed"), low=0, high=2**32 - 1),
    _Opt("method", "Method", "lora trains adapters on a frozen base model; full trains every "
         "parameter.", (_DEFAULTS, "method"),
         choices={"lora": "LoRA adapters", "full": "Full fine-tune"}),
    _Opt("lora_rank", "LoRA rank", "Rank of each LoRA update.",
         (_DEFAULTS, "lora_rank"), low=1, high=_LIMITS["max_lora_rank"], when=_LORA),
    _Opt("auto_stop_threshold", "Threshold", "An epoch whose population loss moves by less than "
         "this counts towards the streak.", (_STOP, "threshold"), low=0,
         target="auto_stop.threshold", group="auto_stop"),
    _Opt("auto_stop_patience", "Patience", "How many such epochs in a row stop the run.",
         (_STOP, "patience"), low=1, high=_INT32_MAX, target="auto_stop.patience",
         group="auto_stop"),
    _Opt("min_epochs", "Min epochs", "Auto-stop never ends a run before this epoch.",
         (_STOP, "min_epochs"), low=1, high=_INT32_MAX, target="auto_stop.min_epochs",
         group="auto_stop"),
    _Opt("lora_alpha", "LoRA alpha", "Scales each LoRA update by alpha / rank.",
         (_DEFAULTS, "lora_alpha"), low=1, high=_INT32_MAX, group="advanced", when=_LORA),
    _Opt("lora_dropout", "LoRA dropout", "Dropout on the input of each LoRA update.",
         (_DEFAULTS, "lora_dropout"), low=0, high=1, high_inclusive=False, group="advanced",
         when=_LORA),
    _Opt("max_seq_length", "Max tokens", "Tokens per example after truncation.",
         (_DEFAULTS, "max_seq_length"), low=8, high=_LIMITS["max_seq_length"], group="advanced"),
    _Opt("validation_split", "Validation split", "Share of the records held out for "
         "validation, never trained on.", (_DEFAULTS, "validation_split"), low=0, high=1,
         low_inclusive=False, high_inclusive=False, group="advanced"),
    _Opt("refresh_interval", "Progress interval (s)", "Seconds between progress events.",
         (_LIVE, "refresh_interval"), low=0, low_inclusive=False, group="advanced"),
)
# fmt: on
"""Every start option, in the order the form and the CLI show them."""

_BY_CAMEL = {option.camel: option for option in START_OPTIONS}


# ---- the values of a request --------------------------------------------------------------


def read_body(body: object) -> dict[str, Any]:
    """The options a camelCase JSON body sets, by option name, each checked; a null value is
    the same as an absent one."""
    if not isinstance(body, Mapping):
        raise InvalidInput(
            f"The request body must be a JSON object with {', '.join(_BY_CAMEL)}.", field="body"
        )
    for key in body:
        if key not in _BY_CAMEL:
            raise InvalidInput(
                f"Unknown field {key!r}; allowed fields: {', '.join(_BY_CAMEL)}.", field=str(key)
            )
    return {
        option.name: option.parse(body[option.camel])
        for option in START_OPTIONS
        if body.get(option.camel) is not None
    }


def read_request(request: training_pb2.StartRunRequest) -> dict[str, Any]:
    """The options a StartRunRequest sets, each checked. A field without presence that holds its
    zero value (an empty string or list, an enum's UNSPECIFIED) is not set."""
    values: dict[str, Any] = {}
    for option in START_OPTIONS:
        descriptor, value = option.descriptor, getattr(request, option.name)
        if descriptor.has_presence and not descriptor.is_repeated:
            if not request.HasField(option.name):  # type: ignore[arg-type]
                continue
        elif not value:
            continue
        if option.kind == "enum":
            value = enum_to_str(descriptor.enum_type, value)
            if value is None:
                enum = descriptor.enum_type
                known = [f"{v.name} ({v.number})" for v in enum.values if v.number]
                kind = re.sub(r"(?<!^)(?=[A-Z])", " ", enum.name).lower()  # "training method"
                raise InvalidInput(
                    f"{option.camel} {getattr(request, option.name)} is not a {kind}; use "
                    f"{' or '.join(known)}, or leave it unset for the configured default.",
                    field=option.camel,
                )
        values[option.name] = option.parse(list(value) if option.kind == "array" else value)
    return values


def to_request(values: Mapping[str, Any]) -> training_pb2.StartRunRequest:
    """A StartRunRequest carrying exactly `values` (checked already): the service fills in the
    rest from its defaults, as the checks assumed."""
    request = training_pb2.StartRunRequest()
    for option in START_OPTIONS:
        if option.name in values:
            _assign(request, option.name, values[option.name])
    return request


# ---- the run's config -----------------------------------------------------------------------


def build_config(
    values: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> training_pb2.RunConfig:
    """The RunConfig of checked option `values`; absent options take the defaults of `config`
    (default TRAINING_CONFIG); what no option sets comes from `config` too."""
    source = TRAINING_CONFIG if config is None else config
    message = training_pb2.RunConfig()
    for option in START_OPTIONS:
        if option.name in values:
            value = values[option.name]
        elif option.required:
            raise InvalidInput(option.missing, field=option.camel)
        else:
            value = option.parse(option.default_value(source))
        _assign(message, option.target or option.name, value)
    message.weight_decay = finite_number(source["defaults"]["weight_decay"], "weightDecay", low=0)
    adaptive = AdaptiveWeightsConfig.from_mapping(source["adaptive_weights"])
    message.adaptive_weights.CopyFrom(training_pb2.AdaptiveWeightsConfig(**asdict(adaptive)))
    # the sections are checked whole: a typo in them never silently falls back to a default
    message.auto_stop.enabled = AutoStopConfig.from_mapping(source["confidence_auto_stop"]).enabled
    check_config(message)
    return message


def config_from_body(
    body: object, config: Mapping[str, Any] | None = None
) -> training_pb2.RunConfig:
    """The RunConfig of a camelCase start body (REST, CLI)."""
    return build_config(read_body(body), config)


def check_config(config: training_pb2.RunConfig) -> None:
    """Every value of a RunConfig within its limits; InvalidInput naming the camelCase field."""
    for option in START_OPTIONS:
        option.parse(_read(config, option.target or option.name))
    finite_number(config.weight_decay, "weightDecay", low=0)
    adaptive_weights(config)
    auto_stop(config)


def config_to_dict(config: training_pb2.RunConfig) -> dict[str, Any]:
    """snake_case and JSON-ready, as stored in run.json, training_results.json and the DNA."""
    return message_to_dict(config)


def config_from_dict(data: object) -> training_pb2.RunConfig:
    """The inverse of `config_to_dict`, checked: every key present, none unknown."""
    _require_fields(data, training_pb2.RunConfig.DESCRIPTOR, "config")
    assert isinstance(data, Mapping)
    try:
        message = dict_to_message(data, training_pb2.RunConfig())
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"The run config is not valid: {error}.", field="config") from None
    assert isinstance(message, training_pb2.RunConfig)
    check_config(message)
    return message


def adaptive_weights(config: training_pb2.RunConfig) -> AdaptiveWeightsConfig:
    """The adaptive weights rule's settings for the run."""
    return AdaptiveWeightsConfig(**message_to_dict(config.adaptive_weights))


def auto_stop(config: training_pb2.RunConfig) -> AutoStopConfig:
    """Confidence auto-stop's settings for the run."""
    return AutoStopConfig(**message_to_dict(config.auto_stop))


def is_lora(config: training_pb2.RunConfig) -> bool:
    return config.method == training_pb2.TRAINING_METHOD_LORA


def public_config() -> dict[str, Any]:
    """GET /api/config: TRAINING_CONFIG, and every start option as the page's form needs it."""
    return {**get_config(), "start_options": [option.describe() for option in START_OPTIONS]}


# ---- fields by dotted path ------------------------------------------------------------------


def _assign(message: Message, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    descriptor: Any = message.DESCRIPTOR.fields_by_name[name]
    if descriptor.is_repeated:
        getattr(message, name).extend(value)
    elif descriptor.type == FieldDescriptor.TYPE_ENUM:
        setattr(message, name, enum_from_str(descriptor.enum_type, value))
    elif descriptor.type in NUMBER_TYPES:
        setattr(message, name, float(value))
    else:
        setattr(message, name, value)


def _read(message: Message, path: str) -> Any:
    *parents, name = path.split(".")
    for parent in parents:
        message = getattr(message, parent)
    descriptor: Any = message.DESCRIPTOR.fields_by_name[name]
    value = getattr(message, name)
    if descriptor.is_repeated:
        return list(value)
    if descriptor.type == FieldDescriptor.TYPE_ENUM:
        return enum_to_str(descriptor.enum_type, value)
    return value


def _require_fields(data: object, descriptor: Any, what: str) -> None:
    """`data` holds exactly the fields of `descriptor`, and so does each sub-message."""
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{what} must be a mapping, got {data!r}.", field=what)
    names = [f.name for f in descriptor.fields]
    missing = [name for name in names if name not in data]
    unknown = [key for key in data if key not in names]
    if missing or unknown:
        problem = f"missing {missing}" if missing else f"unknown {unknown}"
        raise InvalidInput(
            f"{what} has {problem} keys; expected exactly: {', '.join(names)}.",
            field=str((missing or unknown)[0]),
        )
    for sub in descriptor.fields:
        if sub.type == FieldDescriptor.TYPE_MESSAGE and not sub.is_repeated:
            _require_fields(data[sub.name], sub.message_type, sub.name)
