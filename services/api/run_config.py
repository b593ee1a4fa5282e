"""A run's settings on the wire: the start options of `services.core.training_config` read
from a REST body or a gRPC `StartRunRequest` (one set of checks, errors naming the camelCase
field), and the `RunConfig` message they make, with its JSON form for the run folder.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from services.api import training_pb2
from services.api.codec import (
    dict_to_message,
    enum_to_str,
    message_to_dict,
)
from services.core.adaptive_weights import AdaptiveWeightsConfig
from services.core.auto_stop import AutoStopConfig
from services.core.checks import finite_number
from services.core.errors import InvalidInput
from services.core.training_config import START_OPTIONS, TRAINING_CONFIG

RunConfig = training_pb2.RunConfig
"""One run's effective settings: the request's values over TRAINING_CONFIG's defaults."""

_REQUEST: Any = training_pb2.StartRunRequest.DESCRIPTOR
_BY_CAMEL = {option.camel: option for option in START_OPTIONS}
_STOP = "confidence_auto_stop"


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
        descriptor, value = _REQUEST.fields_by_name[option.name], getattr(request, option.name)
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
    given = {option.name: values[option.name] for option in START_OPTIONS if option.name in values}
    request = dict_to_message(given, training_pb2.StartRunRequest())
    assert isinstance(request, training_pb2.StartRunRequest)
    return request


# ---- the run's config -----------------------------------------------------------------------


def build_config(
    values: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> training_pb2.RunConfig:
    """The RunConfig of checked option `values`; absent options take the defaults of `config`
    (default TRAINING_CONFIG); what no option sets comes from `config` too."""
    source = TRAINING_CONFIG if config is None else config
    # the sections are checked whole: a typo in them never silently falls back to a default
    data: dict[str, Any] = {
        "weight_decay": finite_number(source["defaults"]["weight_decay"], "weightDecay", low=0),
        "adaptive_weights": asdict(AdaptiveWeightsConfig.from_mapping(source["adaptive_weights"])),
        "auto_stop": {"enabled": AutoStopConfig.from_mapping(source[_STOP]).enabled},
    }
    for option in START_OPTIONS:
        if option.name in values:
            value = values[option.name]
        elif option.required:
            raise InvalidInput(option.missing, field=option.camel)
        else:
            value = option.parse(option.default_value(source))
        holder, name = _at(data, option.target or option.name)
        holder[name] = value
    message = dict_to_message(data, training_pb2.RunConfig())
    assert isinstance(message, training_pb2.RunConfig)
    check_config(message)
    return message


def config_from_body(
    body: object, config: Mapping[str, Any] | None = None
) -> training_pb2.RunConfig:
    """The RunConfig of a camelCase start body (REST, CLI)."""
    return build_config(read_body(body), config)


def check_config(config: training_pb2.RunConfig) -> None:
    """Every value of a RunConfig within its limits; InvalidInput naming the camelCase field."""
    data = message_to_dict(config)
    for option in START_OPTIONS:
        holder, name = _at(data, option.target or option.name)
        option.parse(holder[name])
    finite_number(config.weight_decay, "weightDecay", low=0)
    adaptive_weights(config)
    auto_stop(config)
    if config.quantization == training_pb2.QUANTIZATION_4BIT and not is_lora(config):
        raise InvalidInput(
            "quantization 4bit needs method lora: a 4-bit base model is frozen, so full "
            "fine-tuning cannot train it. Use method lora, or quantization none.",
            field="quantization",
        )


def config_to_dict(config: training_pb2.RunConfig) -> dict[str, Any]:
    """snake_case and JSON-ready, as stored in run.json, training_results.json and the DNA."""
    return message_to_dict(config)


ADDED_LATER: Mapping[str, Any] = {
    "precision": "fp32",
    "gradient_checkpointing": False,
    "quantization": "none",
}
"""Settings a stored config may predate, with what the runs stored before them did."""


def config_from_dict(data: object) -> training_pb2.RunConfig:
    """The inverse of `config_to_dict`, checked: every key present (but those of ADDED_LATER,
    which an older run folder lacks), none unknown."""
    if isinstance(data, Mapping):
        data = {**ADDED_LATER, **data}
    try:
        message = dict_to_message(
            _require_fields(data, training_pb2.RunConfig.DESCRIPTOR, "config"), RunConfig()
        )
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


# ---- fields by dotted path ------------------------------------------------------------------


def _at(data: dict[str, Any], path: str) -> tuple[dict[str, Any], str]:
    """The mapping that holds `path`'s last name in nested `data` (made as needed), and the name."""
    *parents, name = path.split(".")
    for parent in parents:
        data = data.setdefault(parent, {})
    return data, name


def _require_fields(data: object, descriptor: Any, what: str) -> Mapping[str, Any]:
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
    return data
