"""One run's row in the metrics store: who owns the run, its settings, and the summary ListRuns
shows (moved by each event as `services.api.run_state.summary_changes` says).
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
    run_status_value,
)
from services.api.run_state import RUNNING, RunState

SOURCE_TRAINING = "training"
"""The run belongs to the training service; its events arrive through StreamEvents."""
SOURCE_EXTERNAL = "external"
"""An outside training process reports the run's epochs through ReportMetrics."""


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

    def state(self) -> RunState:
        """The run with none of its events applied yet (apply them from seq 1)."""
        return RunState(
            self.run_id,
            config=self.run_config(),
            models=self.model_infos(),
            created_at=self.created_at,
            status=self.status,
            total_epochs=self.total_epochs,
        )

    def summary(self) -> metrics_pb2.RunSummary:
        summary = metrics_pb2.RunSummary(
            run_id=self.run_id,
            status=run_status_value(self.status),  # type: ignore[arg-type]
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


@dataclass(frozen=True)
class MirrorPosition:
    """How far one run has been mirrored into an outside tracker (a row of `mirror_positions`)."""

    run_id: str
    external_id: str
    """The run's id in the tracker (an MLflow run id)."""
    seq: int = 0
    """The last of the run's events the tracker has taken."""
    status: str = "RUNNING"
    """The run's status as last set in the tracker, in its words (MLflow: RUNNING, FINISHED,
    FAILED, KILLED)."""


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
