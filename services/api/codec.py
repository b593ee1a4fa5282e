"""The documented JSON shape of every message, and back.

protobuf's own JSON mapping turns 64-bit integers into strings, drops unset values and
camel-cases names; the suite's documented shape (its OpenAPI document) is another: snake_case
names as in the .proto, numbers stay numbers, an absent optional value is null, enums are
lower-case strings without their prefix, timestamps are ISO 8601 UTC with milliseconds and
`Z`. Events are flat: `{"type", "run_id", "seq", "timestamp", **payload}`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from services.api import training_pb2

_TIMESTAMP = Timestamp.DESCRIPTOR.full_name
_ENVELOPE = ("run_id", "seq", "timestamp")


def _enum_prefix(enum: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_to_str(enum: Any, number: int) -> str | None:
    """RUN_STATUS_AUTO_STOPPED -> "auto_stopped"; the zero value -> None."""
    if number == 0:
        return None
    value = enum.values_by_number.get(number)
    if value is None:
        return None
    return str(value.name).removeprefix(_enum_prefix(enum)).lower()


def enum_from_str(enum: Any, text: str) -> int:
    value = enum.values_by_name.get(_enum_prefix(enum) + text.upper())
    if value is None or value.number == 0 or text != text.lower():
        allowed = ", ".join(
            v.name.removeprefix(_enum_prefix(enum)).lower() for v in enum.values if v.number
        )
        raise ValueError(f"{text!r} is not a valid {enum.name}; allowed: {allowed}")
    return int(value.number)


def run_status_name(status: int) -> str | None:
    return enum_to_str(training_pb2.RunStatus.DESCRIPTOR, status)


def run_status_value(name: str) -> int:
    return enum_from_str(training_pb2.RunStatus.DESCRIPTOR, name)


def format_timestamp(ts: Timestamp) -> str:
    moment = datetime.fromtimestamp(ts.seconds, tz=timezone.utc).replace(
        microsecond=ts.nanos // 1000
    )
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.nanos // 1_000_000:03d}Z"


def parse_timestamp(text: str) -> Timestamp:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    ts = Timestamp()
    ts.FromDatetime(moment.astimezone(timezone.utc))
    return ts


def now_timestamp() -> Timestamp:
    """Now, to the millisecond: the precision of the JSON shape, so round trips are exact."""
    ts = Timestamp()
    ts.GetCurrentTime()
    ts.nanos -= ts.nanos % 1_000_000
    return ts


# Descriptors are typed loosely: the upb runtime hands out its own descriptor classes, which
# the stubs do not unify with google.protobuf.descriptor's.
def _value_to_json(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.full_name == _TIMESTAMP:
            return format_timestamp(value)
        return message_to_dict(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_to_str(field.enum_type, value)
    return value


INTEGER_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_FIXED32,
    }
)
"""The JSON numbers without a fraction."""
NUMBER_TYPES = frozenset({FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT})


def is_map(field: Any) -> bool:
    return bool(
        field.type == FieldDescriptor.TYPE_MESSAGE
        and field.is_repeated
        and field.message_type.GetOptions().map_entry
    )


def message_to_dict(message: Message) -> dict[str, Any]:
    """Every field, in declaration order, in the documented JSON shape."""
    out: dict[str, Any] = {}
    fields: Any = message.DESCRIPTOR.fields
    for field in fields:
        if field.containing_oneof is not None and not field.containing_oneof.name.startswith("_"):
            continue  # a real oneof (the event payload) is flattened by the caller
        value = getattr(message, field.name)
        if is_map(field):
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _value_to_json(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value_to_json(field, v) for v in value]
        elif field.has_presence and not message.HasField(field.name):
            out[field.name] = None
        else:
            out[field.name] = _value_to_json(field, value)
    return out


def _value_from_json(field: Any, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        return enum_from_str(field.enum_type, value)
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return float(value)
    return value


def dict_to_message(data: Mapping[str, Any], message: Message) -> Message:
    """Fills `message` from the documented JSON shape (the inverse of `message_to_dict`)."""
    descriptor: Any = message.DESCRIPTOR
    for name, value in data.items():
        field = descriptor.fields_by_name.get(name)
        if field is None:
            raise ValueError(f"unknown field {name!r} for {descriptor.name}")
        if value is None:
            continue
        if is_map(field):
            container = getattr(message, name)
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                    dict_to_message(item, container[key])
                else:
                    container[key] = _value_from_json(value_field, item)
        elif field.is_repeated:
            container = getattr(message, name)
            for item in value:
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    dict_to_message(item, container.add())
                else:
                    container.append(_value_from_json(field, item))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.full_name == _TIMESTAMP:
                getattr(message, name).CopyFrom(parse_timestamp(value))
            else:
                dict_to_message(value, getattr(message, name))
        else:
            setattr(message, name, _value_from_json(field, value))
    return message


def event_type(event: training_pb2.TrainingEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind is None:
        raise ValueError(f"event {event.run_id}#{event.seq} has no payload")
    return kind


def event_to_dict(event: training_pb2.TrainingEvent) -> dict[str, Any]:
    """`{"type", "run_id", "seq", "timestamp", **payload}`; initial_state flattens its metrics."""
    kind = event_type(event)
    out: dict[str, Any] = {
        "type": kind,
        "run_id": event.run_id,
        "seq": event.seq,
        "timestamp": format_timestamp(event.timestamp),
    }
    payload = getattr(event, kind)
    if kind == "initial_state":
        metrics = message_to_dict(payload.metrics)
        metrics.pop("run_id", None)
        metrics.pop("timestamp", None)
        out.update(metrics)
        out["config"] = message_to_dict(payload.config) if payload.HasField("config") else None
        out["models"] = [message_to_dict(m) for m in payload.models]
    else:
        out.update(message_to_dict(payload))
    return out


def event_from_dict(data: Mapping[str, Any]) -> training_pb2.TrainingEvent:
    """The inverse of `event_to_dict` (used to replay an event log written as JSON lines)."""
    kind = data["type"]
    event = training_pb2.TrainingEvent(run_id=data["run_id"], seq=int(data["seq"]))
    event.timestamp.CopyFrom(parse_timestamp(data["timestamp"]))
    payload_fields = {k: v for k, v in data.items() if k not in (*_ENVELOPE, "type")}
    if kind not in training_pb2.TrainingEvent.DESCRIPTOR.fields_by_name:
        raise ValueError(f"unknown event type {kind!r}")
    payload = getattr(event, kind)
    if kind == "initial_state":
        config = payload_fields.pop("config", None)
        models = payload_fields.pop("models", [])
        dict_to_message({"run_id": data["run_id"], **payload_fields}, payload.metrics)
        payload.metrics.timestamp.CopyFrom(event.timestamp)
        if config is not None:
            dict_to_message(config, payload.config)
        for model in models:
            dict_to_message(model, payload.models.add())
    else:
        dict_to_message(payload_fields, payload)
        payload.SetInParent()
    return event
