"""What a run's events add up to: `RunState` folds them one by one into its status and summary,
its metrics, its leaderboard and the initial_state of a subscription. The one fold of the event
stream: the training service, the metrics service and the gateway all keep a run's state with it
(the page's gateway/static/run_state.js is its JavaScript twin, tested against it). Pure: no I/O,
no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from services.api import metrics_pb2, training_pb2
from services.api.codec import (
    event_from_dict,
    parse_timestamp,
    run_status_name,
    run_status_value,
)

RUNNING = "running"
TERMINAL_STATUSES = frozenset({"completed", "auto_stopped", "stopped", "failed", "interrupted"})
_NOT_FOLDED = frozenset({"initial_state", "heartbeat"})


def summary_changes(event: training_pb2.TrainingEvent) -> dict[str, Any]:
    """The summary an event moves (status, epochs, best model, DNA), and nothing else: what the
    metrics store keeps in its runs table, and the first step of `RunState.apply`.

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


class RunState:
    """One run as its events so far describe it; `apply` each event once, in seq order.

    Weights and learning rates are merged, not replaced, so a partial report of an outside
    process keeps the other models' values; val_losses are the latest epoch's.
    """

    def __init__(
        self,
        run_id: str,
        *,
        config: training_pb2.RunConfig | None = None,
        models: Iterable[training_pb2.ModelInfo] = (),
        created_at: str = "",
        status: str = RUNNING,
        total_epochs: int = 0,
    ) -> None:
        self.run_id = run_id
        self.config = config
        self.models = list(models)
        self.status = status
        self.last_seq = 0
        self.current_epoch = 0
        self.total_epochs = config.epochs if config is not None else total_epochs
        self.created_at: Timestamp | None = parse_timestamp(created_at) if created_at else None
        self.timestamp = self.created_at
        self.names: list[str] = list(config.base_models) if config is not None else []
        self.val_losses: dict[str, float] = {}
        self.weights: dict[str, float] = dict.fromkeys(self.names, 1.0)
        self.learning_rate = config.learning_rate if config is not None else 0.0
        self.lr_multipliers: dict[str, float] = (
            dict.fromkeys(self.names, self.learning_rate) if self.learning_rate else {}
        )
        self.total_loss: float | None = None
        self.auto_stop_info = _initial_auto_stop(config)
        self.progress_percent = 0.0
        self.best_model: str | None = None
        self.dna: str | None = None
        self.error: str | None = None
        self.finished_at: Timestamp | None = None
        """When the run's terminal event came; None while it runs."""
        self._history: dict[int, training_pb2.EpochEnd] = {}
        self._epoch_seq: dict[int, int] = {}

    @property
    def status_value(self) -> training_pb2.RunStatus.ValueType:
        return run_status_value(self.status)  # type: ignore[return-value]

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    # ---- the fold -----------------------------------------------------------------------------

    def apply(self, event: training_pb2.TrainingEvent) -> bool:
        """Folds `event` in; False (and nothing changes) when its seq was already applied."""
        if event.seq <= self.last_seq or event.run_id != self.run_id:
            return False
        kind = event.WhichOneof("payload")
        self.last_seq = event.seq
        if kind is None or kind in _NOT_FOLDED:
            return True
        self.timestamp = event.timestamp
        if kind == "epoch_start" and self.finished:
            self.resume(event.epoch_start.epoch, event.epoch_start.total_epochs)
        for name, value in summary_changes(event).items():
            setattr(self, name, value)
        getattr(self, f"_on_{kind}")(getattr(event, kind), event.seq)
        return True

    def resume(self, epoch: int, total_epochs: int = 0) -> None:
        """The run trains again from `epoch` (an epoch_start after its terminal event, or the
        training service resuming it): what its ending said no longer holds."""
        self.status = RUNNING
        self.error = self.best_model = self.dna = None
        self.finished_at = None
        total = total_epochs or self.total_epochs
        if total:
            self.progress_percent = 100.0 * (epoch - 1) / total

    def _on_epoch_start(self, start: training_pb2.EpochStart, seq: int) -> None:
        self._merge(start.weights, start.lr_multipliers)
        self.error = None
        placed = {placement.model: placement for placement in start.placement}
        for model in self.models:  # the ray executor says on which node each member runs
            if model.name in placed:
                model.placement.CopyFrom(placed[model.name])

    def _on_progress(self, progress: training_pb2.Progress, seq: int) -> None:
        self.progress_percent = progress.progress_percent

    def _on_epoch_end(self, end: training_pb2.EpochEnd, seq: int) -> None:
        self._add_names(end.val_losses)
        self.val_losses = dict(end.val_losses)
        self._merge(end.weights, end.lr_multipliers)
        self.total_loss = end.total_loss
        if end.HasField("auto_stop_info"):
            self.auto_stop_info = training_pb2.AutoStopInfo()
            self.auto_stop_info.CopyFrom(end.auto_stop_info)
        self.progress_percent = end.progress_percent
        # one entry per epoch: a resumed or re-run epoch replaces what it redid
        self._history[end.epoch] = end
        self._epoch_seq[end.epoch] = seq

    def _on_weight_adjustment(self, change: training_pb2.WeightAdjustment, seq: int) -> None:
        self._merge(change.weights, change.lr_multipliers)

    def _on_auto_stop_triggered(self, fired: training_pb2.AutoStopTriggered, seq: int) -> None:
        if fired.HasField("auto_stop_info"):
            self.auto_stop_info = training_pb2.AutoStopInfo()
            self.auto_stop_info.CopyFrom(fired.auto_stop_info)

    def _on_training_complete(self, done: training_pb2.TrainingComplete, seq: int) -> None:
        if done.val_losses:
            self._add_names(done.val_losses)
            self.val_losses = dict(done.val_losses)
        self._merge(done.weights, {})
        self.error = None  # a resumed run that ended well is no longer failed
        if done.HasField("total_loss"):
            self.total_loss = done.total_loss
        self.progress_percent = 100.0
        self.finished_at = self.timestamp

    def _on_training_error(self, error: training_pb2.TrainingError, seq: int) -> None:
        self.error = error.message
        self.progress_percent = 100.0
        self.finished_at = self.timestamp

    def _merge(self, weights: Mapping[str, float], lrs: Mapping[str, float]) -> None:
        self._add_names(weights)
        self.weights.update(weights)
        self.lr_multipliers.update(lrs)

    def _add_names(self, names: Iterable[str]) -> None:
        for name in sorted(set(names) - set(self.names)):
            self.names.append(name)
            self.weights.setdefault(name, 1.0)
            if self.learning_rate:
                self.lr_multipliers.setdefault(name, self.learning_rate)

    # ---- what it adds up to -------------------------------------------------------------------

    @property
    def history(self) -> list[training_pb2.EpochEnd]:
        return [self._history[epoch] for epoch in sorted(self._history)]

    def reported_epoch(self, epoch: int) -> tuple[int, training_pb2.EpochEnd] | None:
        """(seq, payload) of the epoch_end stored for `epoch`, if any."""
        if epoch not in self._history:
            return None
        return self._epoch_seq[epoch], self._history[epoch]

    def metrics(self) -> training_pb2.RunMetrics:
        """GET /api/training/{runId}/metrics."""
        metrics = training_pb2.RunMetrics(
            run_id=self.run_id,
            status=self.status_value,
            current_epoch=self.current_epoch,
            total_epochs=self.total_epochs,
            progress_percent=self.progress_percent,
            training_history=self.history,
        )
        metrics.val_losses.update(self.val_losses)
        metrics.weights.update(self.weights)
        metrics.lr_multipliers.update(self.lr_multipliers)
        if self.total_loss is not None:
            metrics.total_loss = self.total_loss
        if self.auto_stop_info is not None:
            metrics.auto_stop_info.CopyFrom(self.auto_stop_info)
        if self.timestamp is not None:
            metrics.timestamp.CopyFrom(self.timestamp)
        metrics.placement.extend(m.placement for m in self.models if m.HasField("placement"))
        return metrics

    def leaderboard(self) -> metrics_pb2.Leaderboard:
        """GET /api/training/{runId}/leaderboard: by val_loss ascending (a model not yet
        validated last), ties by name, rank 1 first."""
        order = sorted(
            self.names,
            key=lambda name: (name not in self.val_losses, self.val_losses.get(name, 0.0), name),
        )
        board = metrics_pb2.Leaderboard(
            run_id=self.run_id,
            current_epoch=self.current_epoch,
            total_epochs=self.total_epochs,
            progress_percent=self.progress_percent,
        )
        for rank, name in enumerate(order, start=1):
            entry = board.leaderboard.add(
                model_name=name,
                rank=rank,
                weight_multiplier=self.weights.get(name, 1.0),
                lr_multiplier=self._lr_of(name),
            )
            if name in self.val_losses:
                entry.val_loss = self.val_losses[name]
        if self.auto_stop_info is not None:
            board.auto_stop_info.CopyFrom(self.auto_stop_info)
        if self.timestamp is not None:
            board.timestamp.CopyFrom(self.timestamp)
        return board

    def _lr_of(self, name: str) -> float:
        if name in self.lr_multipliers:
            return self.lr_multipliers[name]
        # an outside run that never reported learning rates has none to show
        return self.learning_rate * self.weights.get(name, 1.0) if self.learning_rate else 0.0

    def initial_state(self, now: Timestamp) -> training_pb2.TrainingEvent:
        """The first message of a subscription: everything up to and including `last_seq`.
        `now` stamps it when the run has no event yet."""
        event = training_pb2.TrainingEvent(run_id=self.run_id, seq=self.last_seq)
        event.timestamp.CopyFrom(self.timestamp if self.timestamp is not None else now)
        state = event.initial_state
        state.metrics.CopyFrom(self.metrics())
        state.metrics.timestamp.CopyFrom(event.timestamp)
        if self.config is not None:
            state.config.CopyFrom(self.config)
        state.models.extend(self.models)
        return event


def _initial_auto_stop(config: training_pb2.RunConfig | None) -> training_pb2.AutoStopInfo | None:
    if config is None or not config.HasField("auto_stop"):
        return None
    stop = config.auto_stop
    return training_pb2.AutoStopInfo(
        threshold=stop.threshold,
        patience=stop.patience,
        min_epochs=stop.min_epochs,
        streak=0,
        remaining=stop.patience,
        triggered=False,
    )


def fold(
    state: RunState, events: Iterable[training_pb2.TrainingEvent | Mapping[str, Any]]
) -> RunState:
    """Applies `events` (messages, or dicts in the documented JSON shape) to `state` in order."""
    for event in events:
        state.apply(
            event if isinstance(event, training_pb2.TrainingEvent) else event_from_dict(event)
        )
    return state
