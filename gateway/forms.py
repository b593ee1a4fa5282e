"""Request bodies into gRPC requests, checked by the same rules the services apply, so a bad
value is refused with 400 naming its field before any service is called.

The start body goes through `RunConfig.from_request` (the one validator the CLI and the training
service use) and only then into a `StartRunRequest` carrying the fields the caller sent: absent
ones take the service's defaults, exactly as the validator assumed. The report body (snake_case,
like an epoch_end payload) is typed here and then checked by the metrics service's own
`check_report`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.api import metrics_pb2, training_pb2
from services.core.checks import finite_number, flag, whole_number
from services.core.errors import InvalidInput
from services.core.training_config import RunConfig
from services.metrics.reports import check_report

_INT64_MAX = 2**63 - 1

START_FIELDS: dict[str, str] = {
    "datasetId": "dataset_id",
    "baseModels": "base_models",
    "epochs": "epochs",
    "learningRate": "learning_rate",
    "autoStopThreshold": "auto_stop_threshold",
    "autoStopPatience": "auto_stop_patience",
    "minEpochs": "min_epochs",
    "batchSize": "batch_size",
    "seed": "seed",
    "method": "method",
    "loraRank": "lora_rank",
    "maxSeqLength": "max_seq_length",
    "loraAlpha": "lora_alpha",
    "loraDropout": "lora_dropout",
    "validationSplit": "validation_split",
    "refreshInterval": "refresh_interval",
}
"""camelCase start-body field -> StartRunRequest field."""

_METHODS = {"lora": training_pb2.TRAINING_METHOD_LORA, "full": training_pb2.TRAINING_METHOD_FULL}
# the JSON may carry 1 where the message wants 1.0
_FLOATS = frozenset(
    {"learning_rate", "auto_stop_threshold", "lora_dropout", "validation_split", "refresh_interval"}
)


def start_request(body: Mapping[str, Any]) -> training_pb2.StartRunRequest:
    """The StartRunRequest of a start body; InvalidInput naming the camelCase field if not."""
    RunConfig.from_request(body)  # every check, with the messages the CLI and service give
    request = training_pb2.StartRunRequest()
    for camel, value in body.items():
        name = START_FIELDS[camel]  # from_request refused every other name
        if value is None:
            continue
        if name == "base_models":
            request.base_models.extend(value)
        elif name == "method":
            request.method = _METHODS[value]
        elif name in _FLOATS:
            setattr(request, name, float(value))
        else:
            setattr(request, name, value)
    return request


# ---- outside training processes reporting an epoch ------------------------------------------

REPORT_FIELDS = (
    "epoch",
    "total_epochs",
    "val_losses",
    "train_losses",
    "weights",
    "lr_multipliers",
    "total_loss",
    "auto_stop_info",
    "progress_percent",
)
AUTO_STOP_FIELDS = (
    "threshold",
    "patience",
    "min_epochs",
    "current_change",
    "streak",
    "remaining",
    "triggered",
)


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
