"""The request of each client call, built from Python values and checked by the rules the
services apply (services.api), so a bad value is refused as `InvalidInput` naming its field
before anything is sent: start options by `run_config`, reports by `check_report`, generation
requests by `check_generate`.

Start options are given by their snake_case names (`epochs=2`, `learning_rate=1e-4`,
`method="full"`), the names of `StartRunRequest`'s fields and of `oneseek train`'s flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.api import metrics_pb2, training_pb2
from services.api.generate_request import check_generate, to_generate_request
from services.api.reports import check_report
from services.api.run_config import build_config, read_body, to_request
from services.core.errors import InvalidInput
from services.core.training_config import START_OPTIONS, validate_run_id

_OPTIONS = {option.name: option for option in START_OPTIONS if not option.required}


def start_request(
    dataset_id: str, models: Sequence[str] | str, options: Mapping[str, Any]
) -> training_pb2.StartRunRequest:
    """The StartRunRequest of a run on `dataset_id` training `models` with `options`."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise InvalidInput(
            f"Unknown start option {unknown[0]!r}; the options are: {', '.join(_OPTIONS)}.",
            field=unknown[0],
        )
    names = [models] if isinstance(models, str) else list(models)
    body: dict[str, Any] = {"datasetId": dataset_id, "baseModels": names}
    body.update({_OPTIONS[name].camel: value for name, value in options.items()})
    values = read_body(body)
    build_config(values)  # the required options and the cross-field rules, as the service checks
    return to_request(values)


def run_id(value: object) -> str:
    """A valid run id (`run-YYYYMMDD-HHMMSS[-N]`), else InvalidInput naming runId."""
    return validate_run_id(value)


def after_seq(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"after_seq must be 0 (from the start) or the last seq received, got {value!r}.",
            field="after_seq",
        )
    return value


def report_request(
    run: str,
    epoch: int,
    val_losses: Mapping[str, float],
    *,
    total_epochs: int | None = None,
    train_losses: Mapping[str, float] | None = None,
    weights: Mapping[str, float] | None = None,
    lr_multipliers: Mapping[str, float] | None = None,
    total_loss: float | None = None,
    progress_percent: float | None = None,
    auto_stop_info: training_pb2.AutoStopInfo | None = None,
) -> metrics_pb2.ReportMetricsRequest:
    """The ReportMetricsRequest of one epoch of an outside run, checked as the service checks
    it (an epoch from 1, a finite validation loss per model, ...)."""
    request = metrics_pb2.ReportMetricsRequest()
    fields: list[tuple[str, Any]] = [
        ("run_id", run),
        ("epoch", epoch),
        ("total_epochs", total_epochs),
        ("total_loss", total_loss),
        ("progress_percent", progress_percent),
    ]
    maps = [
        ("val_losses", val_losses),
        ("train_losses", train_losses),
        ("weights", weights),
        ("lr_multipliers", lr_multipliers),
    ]
    try:
        for name, value in fields:
            if value is not None:
                if isinstance(value, bool):
                    raise TypeError(f"a bool is not a number: {value!r}")
                setattr(request, name, value)
        for name, mapping in maps:
            if mapping is not None:
                if not isinstance(mapping, Mapping):
                    raise TypeError(f"expected a mapping of model name to number, got {mapping!r}")
                for key, number in mapping.items():
                    if isinstance(number, bool) or not isinstance(number, (int, float)):
                        raise TypeError(f"{key!r} maps to {number!r}, not a number")
                    getattr(request, name)[str(key)] = float(number)
    except (TypeError, ValueError) as error:
        raise InvalidInput(
            f"{name} has the wrong type ({error}); see report_epoch's signature.", field=name
        ) from None
    if auto_stop_info is not None:
        request.auto_stop_info.CopyFrom(auto_stop_info)
    check_report(request)
    return request


def generate_request(
    run: str, prompt: str, options: Mapping[str, Any]
) -> training_pb2.GenerateRequest:
    """The GenerateRequest asking `run`'s models (options["models"], default its best) to go on
    from `prompt` (or options["messages"]), with the generation options."""
    spec = check_generate({"prompt": prompt, **options})
    return to_generate_request(validate_run_id(run), spec)
