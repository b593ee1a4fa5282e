"""Request bodies into gRPC requests, checked by the same rules the services apply, so a bad
value is refused with 400 naming its field before any service is called.

The start body passes every check of `services.api.run_config` (the one the CLI and the training
service apply) and then becomes a `StartRunRequest` carrying the options the caller sent: absent
ones take the service's defaults, exactly as the checks assumed. The report body (snake_case,
like an epoch_end payload) is typed here and then checked by the shared `check_report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.api import metrics_pb2, training_pb2
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

REPORT_FIELDS = tuple(
    f.name for f in metrics_pb2.ReportMetricsRequest.DESCRIPTOR.fields if f.name != "run_id"
)
"""A report body's fields: the request's own, but for the run id that the path gives."""
AUTO_STOP_FIELDS = tuple(f.name for f in training_pb2.AutoStopInfo.DESCRIPTOR.fields)


def _losses(value: object, field: str) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise InvalidInput(
            f'{field} must be an object of model name -> number, e.g. {{"my-model": 2.31}}, '
            f"got {value!r}.",
            field=field,
        )
    return {
        str(name): finite_number(item, field, subject=f"{field}[{name!r}]")
        for name, item in value.items()
    }


def _auto_stop(value: object) -> training_pb2.AutoStopInfo:
    field = "auto_stop_info"
    if not isinstance(value, Mapping):
        raise InvalidInput(
            f"{field} must be an object with {', '.join(AUTO_STOP_FIELDS)}, got {value!r}.",
            field=field,
        )
    value = _snake_cased(value, AUTO_STOP_FIELDS)
    unknown = [key for key in value if key not in AUTO_STOP_FIELDS]
    if unknown:
        raise InvalidInput(
            f"Unknown key {unknown[0]!r} in {field}; allowed: {', '.join(AUTO_STOP_FIELDS)}.",
            field=field,
        )
    info = training_pb2.AutoStopInfo()
    for key, item in value.items():
        if item is None:
            continue
        subject = f"{field}.{key}"
        if key in ("threshold", "current_change"):
            setattr(info, key, finite_number(item, field, subject=subject))
        elif key == "triggered":
            info.triggered = flag(item, subject)
        else:
            setattr(info, key, whole_number(item, subject, 0, _INT64_MAX))
    return info


def _snake_case(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name)


def _snake_cased(body: Mapping[Any, Any], allowed: tuple[str, ...]) -> dict[Any, Any]:
    """`body` with its allowed fields under their snake_case names. A report is an epoch_end
    as the events spell it (snake_case), but request bodies are camelCase elsewhere: both
    spellings are taken; a field given in both is refused. Other keys are left as they are."""
    fields: dict[Any, Any] = {}
    for key, value in body.items():
        name = key
        if isinstance(key, str) and _snake_case(key) in allowed:
            name = _snake_case(key)
        if name in fields:
            raise InvalidInput(
                f"{name} is given twice (also in camelCase); give it once.", field=key
            )
        fields[name] = value
    return fields


def report_request(run_id: str, body: Mapping[str, Any]) -> metrics_pb2.ReportMetricsRequest:
    """The ReportMetricsRequest of a report body (snake_case or camelCase fields);
    InvalidInput naming the field if not."""
    body = _snake_cased(body, REPORT_FIELDS)
    for key in body:
        if key not in REPORT_FIELDS:
            raise InvalidInput(
                f"Unknown field {key!r}; allowed fields: {', '.join(REPORT_FIELDS)}.",
                field=str(key),
            )
    if body.get("epoch") is None:
        raise InvalidInput("epoch is required: the number of the epoch reported.", field="epoch")
    if body.get("val_losses") is None:
        raise InvalidInput(
            'val_losses is required: each model\'s validation loss, e.g. {"my-model": 2.31}.',
            field="val_losses",
        )
    request = metrics_pb2.ReportMetricsRequest(
        run_id=run_id, epoch=whole_number(body["epoch"], "epoch", 1, _INT64_MAX)
    )
    for key in ("val_losses", "train_losses", "weights", "lr_multipliers"):
        if body.get(key) is not None:
            getattr(request, key).update(_losses(body[key], key))
    if body.get("total_epochs") is not None:
        request.total_epochs = whole_number(body["total_epochs"], "total_epochs", 1, _INT64_MAX)
    for key in ("total_loss", "progress_percent"):
        if body.get(key) is not None:
            setattr(request, key, finite_number(body[key], key))
    if body.get("auto_stop_info") is not None:
        request.auto_stop_info.CopyFrom(_auto_stop(body["auto_stop_info"]))
    check_report(request)
    return request
