"""One run's row in the metrics store: who owns the run, its settings, and the summary ListRuns
shows; plus the rule by which each event moves that summary (shared by the store and RunState).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.api import metrics_pb2, training_pb2
from services.api.codec import (
    dict_to_message,
    format_timestamp,
    message_to_dict,
    parse_timestamp,
    run_status_name,
)

SOURCE_TRAINING = "training"
"""The run belongs to the training service; its events arrive through StreamEvents."""
SOURCE_EXTERNAL = "external"
"""An outside training process reports the run's epochs through ReportMetrics."""

RUNNING = "running"
TERMINAL_STATUSES = frozenset({"completed", "auto_stopped", "stopped", "failed", "interrupted"})


@dataclass(frozen=True)
class RunRecord:
    """A row of the `runs` table. Timestamps are ISO 8601 UTC strings (they sort as text)."""

    run_id: str
    source: str
    status: str = RUNNING
    dataset_id: str = ""
    base_models: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = None
    """The run's RunConfig in the documented JSON shape; None when it is not known."""
    models: tuple[Mapping[str, Any], ...] = ()
    """ModelInfo of each base model in the documented JSON shape."""
    created_at: str = ""
    updated_at: str = ""
    current_epoch: int = 0
    total_epochs: int = 0
    best_model: str | None = None
    dna: str | None = None
    last_seq: int = 0

    def run_config(self) -> training_pb2.RunConfig | None:
        if self.config is None:
            return None
        config = training_pb2.RunConfig()
        dict_to_message(self.config, config)
        return config

    def model_infos(self) -> list[training_pb2.ModelInfo]:
        infos = []
        for model in self.models:
            info = training_pb2.ModelInfo()
            dict_to_message(model, info)
            infos.append(info)
        return infos

    def summary(self) -> metrics_pb2.RunSummary:
        summary = metrics_pb2.RunSummary(
            run_id=self.run_id,
            status=_status_value(self.status),
            current_epoch=self.current_epoch,
            total_epochs=self.total_epochs,
            base_models=list(self.base_models),
            dataset_id=self.dataset_id,
            last_seq=self.last_seq,
        )
        if self.best_model is not None:
            summary.best_model = self.best_model
        if self.dna is not None:
            summary.dna = self.dna
        if self.created_at:
            summary.started_at.CopyFrom(parse_timestamp(self.created_at))
        if self.updated_at:
            summary.updated_at.CopyFrom(parse_timestamp(self.updated_at))
        return summary


def _status_value(name: str) -> training_pb2.RunStatus.ValueType:
    value = training_pb2.RunStatus.DESCRIPTOR.values_by_name.get(f"RUN_STATUS_{name.upper()}")
    return training_pb2.RUN_STATUS_UNSPECIFIED if value is None else value.number  # type: ignore[return-value]


def record_from_run(run: training_pb2.Run) -> RunRecord:
    """The row of a training-service run, from its GetRun answer (config and models only:
    the summary columns are then moved by its events)."""
    config = run.config if run.HasField("config") else None
    created = format_timestamp(run.created_at) if run.HasField("created_at") else ""
    return RunRecord(
        run_id=run.run_id,
        source=SOURCE_TRAINING,
        status=run_status_name(run.status) or RUNNING,
        dataset_id=config.dataset_id if config is not None else "",
        base_models=tuple(config.base_models) if config is not None else (),
        config=message_to_dict(config) if config is not None else None,
        models=tuple(message_to_dict(m) for m in run.models),
        created_at=created,
        updated_at=created,
        total_epochs=config.epochs if config is not None else run.total_epochs,
    )


def summary_changes(event: training_pb2.TrainingEvent) -> dict[str, Any]:
    """The summary columns an event moves (status, epochs, best model, DNA), and nothing else.

    An epoch_start sets the status back to running: after a terminal event that only happens
    when a failed or interrupted run is resumed under the same id.
    """
    kind = event.WhichOneof("payload")
    if kind == "epoch_start":
        start = event.epoch_start
        changes: dict[str, Any] = {"status": RUNNING}
        if start.total_epochs:
            changes["total_epochs"] = start.total_epochs
        return changes
    if kind == "epoch_end":
        end = event.epoch_end
        changes = {"current_epoch": end.current_epoch or end.epoch}
        if end.total_epochs:
            changes["total_epochs"] = end.total_epochs
        return changes
    if kind == "training_complete":
        done = event.training_complete
        changes = {"status": run_status_name(done.status) or "completed"}
        if done.HasField("best_model"):
            changes["best_model"] = done.best_model
        if done.dna:
            changes["dna"] = done.dna
        return changes
    if kind == "training_error":
        return {"status": run_status_name(event.training_error.status) or "failed"}
    return {}
