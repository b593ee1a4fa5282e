"""The report of one epoch that an outside training process sends (ReportMetricsRequest): the
checks both the gateway (a 400 before any call) and the metrics service apply to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from services.api import metrics_pb2, training_pb2
from services.core.checks import finite_number, whole_number
from services.core.errors import InvalidInput
from services.core.training_config import validate_model_name, validate_run_id

MAX_REPORTED_MODELS = 100
MAX_EPOCHS = 1_000_000
_MAPS = ("train_losses", "weights", "lr_multipliers")


def check_report(request: metrics_pb2.ReportMetricsRequest) -> None:
    """Raises InvalidInput naming the first field that is wrong and what it allows."""
    validate_run_id(request.run_id)
    whole_number(request.epoch, "epoch", 1, MAX_EPOCHS)
    if request.HasField("total_epochs"):
        whole_number(request.total_epochs, "total_epochs", max(request.epoch, 1), MAX_EPOCHS)
    if not request.val_losses:
        raise InvalidInput(
            "val_losses is empty: report the validation loss of at least one model, "
            'e.g. {"my-model": 2.31}.',
            field="val_losses",
        )
    if len(request.val_losses) > MAX_REPORTED_MODELS:
        raise InvalidInput(
            f"val_losses names {len(request.val_losses)} models; at most "
            f"{MAX_REPORTED_MODELS} can be reported per run.",
            field="val_losses",
        )
    for name, loss in request.val_losses.items():
        validate_model_name(name, "val_losses")
        _finite(loss, "val_losses", name)
    for map_name in _MAPS:
        values: Mapping[str, float] = getattr(request, map_name)
        for name, value in values.items():
            if name not in request.val_losses:
                raise InvalidInput(
                    f"{map_name} names model {name!r}, which has no entry in val_losses; "
                    "report a model's validation loss with its other values.",
                    field=map_name,
                )
            # a multiplier or a learning rate of 0 or less would stop or reverse training
            _finite(value, map_name, name, positive=map_name != "train_losses")
    if request.HasField("total_loss"):
        finite_number(request.total_loss, "total_loss")
    if request.HasField("progress_percent"):
        finite_number(request.progress_percent, "progress_percent", low=0, high=100)
    if request.HasField("auto_stop_info"):
        _check_auto_stop(request.auto_stop_info)


def _finite(value: float, field: str, model: str, *, positive: bool = False) -> None:
    # the common case checked inline: this runs for every value of every report
    if math.isfinite(value) and (value > 0 or not positive):
        return
    subject = f"{field}[{model!r}]"
    if positive:
        finite_number(value, field, low=0, low_inclusive=False, subject=subject)
    finite_number(value, field, subject=subject)


def _check_auto_stop(info: training_pb2.AutoStopInfo) -> None:
    finite_number(info.threshold, "auto_stop_info", low=0, subject="auto_stop_info.threshold")
    if info.HasField("current_change"):
        finite_number(
            info.current_change, "auto_stop_info", low=0, subject="auto_stop_info.current_change"
        )
    for name in ("patience", "min_epochs", "streak", "remaining"):
        value = getattr(info, name)
        if value < 0:
            raise InvalidInput(
                f"auto_stop_info.{name} must be 0 or more, got {value}.", field="auto_stop_info"
            )
