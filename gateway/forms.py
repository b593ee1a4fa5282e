"""Request bodies into gRPC requests, checked by the same rules the services apply, so a bad
value is refused with 400 naming its field before any service is called.

The start body passes every check of `services.api.run_config` (the one the CLI and the training
service apply) and then becomes a `StartRunRequest` carrying the options the caller sent: absent
ones take the service's defaults, exactly as the checks assumed. The report body (snake_case,
like an epoch_end payload) is typed here and then checked by the shared `check_report`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.api import metrics_pb2, training_pb2
from services.api.codec import is_map
from services.api.reports import check_report
from services.api.run_config import build_config, read_body, to_request
from services.core.checks import finite_number, flag, whole_number
from services.core.errors import InvalidInput

_INT64_MAX = 2**63 - 1


def start_request(body: object) -> training_pb2.StartRunRequest:
    """The StartRunRequest of a start body; InvalidInput naming the camelCase field if not."""
    values = read_body(body)
    build_config(values)  # the required options and every default, as the service will see them
    return to_request(values)


# ---- outside training processes reporting an epoch ------------------------------------------

_REQUIRED = {
    "epoch": "epoch is required: the number of the epoch reported.",
    "val_losses": 'val_losses is required: each model\'s validation loss, e.g. {"my-model": 2.31}.',
}


@functools.cache  # per message type, not per report: this is the ingest's hot path
def _fields(descriptor: Any) -> Mapping[str, str]:
    """A message's body fields, json_name (camelCase) -> name; the run id comes from the path."""
    return {f.json_name: f.name for f in descriptor.fields if f.name != "run_id"}


def _snake_cased(body: Mapping[Any, Any], names: Mapping[str, str]) -> dict[Any, Any]:
    """`body` with the fields of `names` (json_name -> name) under their proto names. A report
    is an epoch_end as the events spell it (snake_case), but request bodies are camelCase
    elsewhere: both spellings are taken; a field given in both is refused."""
    fields: dict[Any, Any] = {}
    for key, value in body.items():
        name = names.get(key, key)
        if name in fields:
            raise InvalidInput(
                f"{name} is given twice (also in camelCase); give it once.", field=key
            )
        fields[name] = value
    return fields


def _typed(body: object, message: Message, where: str = "") -> Message:
    """Fills `message` from `body`, an object of its fields (snake_case or camelCase), each
    value checked against its field's proto type; InvalidInput naming the field (a nested
    value by the field it is in). Limits are `check_report`'s."""
    descriptor: Any = message.DESCRIPTOR
    names = _fields(descriptor)
    listed = ", ".join(names.values())
    if not isinstance(body, Mapping):
        raise InvalidInput(f"{where} must be an object with {listed}, got {body!r}.", field=where)
    for key, value in _snake_cased(body, names).items():
        if key not in names.values():
            raise InvalidInput(
                f"Unknown key {key!r} in {where}; allowed: {listed}."
                if where
                else f"Unknown field {key!r}; allowed fields: {listed}.",
                field=where or str(key),
            )
        field, subject = descriptor.fields_by_name[key], f"{where}.{key}" if where else key
        if value is None:
            continue
        if is_map(field):
            if not isinstance(value, Mapping):
                raise InvalidInput(
                    f'{key} must be an object of model name -> number, e.g. {{"my-model": 2.31}}, '
                    f"got {value!r}.",
                    field=key,
                )
            numbers = {
                str(n): finite_number(v, key, subject=f"{key}[{n!r}]") for n, v in value.items()
            }
            getattr(message, key).update(numbers)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _typed(value, getattr(message, key), key)
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, key, flag(value, subject))
        elif field.type == FieldDescriptor.TYPE_DOUBLE:
            setattr(message, key, finite_number(value, where or key, subject=subject))
        else:
            setattr(message, key, whole_number(value, subject, 0 if where else 1, _INT64_MAX))
    return message


def report_request(run_id: str, body: Mapping[str, Any]) -> metrics_pb2.ReportMetricsRequest:
    """The ReportMetricsRequest of a report body (snake_case or camelCase fields);
    InvalidInput naming the field if not."""
    given = _snake_cased(body, _fields(metrics_pb2.ReportMetricsRequest.DESCRIPTOR))
    for key, message in _REQUIRED.items():
        if given.get(key) is None:
            raise InvalidInput(message, field=key)
    request = metrics_pb2.ReportMetricsRequest(run_id=run_id)
    _typed(body, request)
    check_report(request)
    return request
