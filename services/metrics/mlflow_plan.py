"""What a run's stored events become in MLflow, and how fast the mirror may talk to it.

One MLflow run per oneseek run (named by its run id), the population's models side by side
under per-model metric keys, so one run's charts hold the whole comparison and one call logs a
whole epoch: `val_loss/<model>`, `train_loss/<model>`, `weight/<model>`, `lr/<model>` and
`total_loss`, at step = epoch and the event's own timestamp. Params: the run's config (flattened,
`adaptive_weights.top_model_boost`, ...). Tags: `oneseek.run_id`, `oneseek.source`,
`oneseek.status`, and from the run's ending `oneseek.dna`, `oneseek.run_dir`,
`oneseek.best_model`, `oneseek.error`. The MLflow run's status follows the ending: FINISHED
(completed, auto_stopped), KILLED (stopped, interrupted), FAILED (failed); RUNNING again when a
run resumes.

Every value is a function of the stored events, timestamps included, so planning the same events
again gives the same calls, and MLflow takes a metric sent twice (same key, step, timestamp and
value) once: a call repeated after a crash logs nothing twice.
Pure: no I/O, no clock, no mlflow import.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.api import training_pb2
from services.api.codec import parse_timestamp, run_status_name
from services.metrics.records import RunRecord

# MLflow's limits on one log_batch call (mlflow.utils.validation)
MAX_ENTITIES_PER_CALL = 1000
MAX_PARAMS_TAGS_PER_CALL = 100
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

TAG_RUN_ID = "oneseek.run_id"
TAG_SOURCE = "oneseek.source"
TAG_STATUS = "oneseek.status"
TAG_DNA = "oneseek.dna"
TAG_RUN_DIR = "oneseek.run_dir"
TAG_BEST_MODEL = "oneseek.best_model"
TAG_ERROR = "oneseek.error"

RUNNING = "RUNNING"
MLFLOW_STATUS = {
    "running": RUNNING,
    "completed": "FINISHED",
    "auto_stopped": "FINISHED",
    "stopped": "KILLED",
    "interrupted": "KILLED",
    "failed": "FAILED",
}
"""Our run status -> the MLflow run status that says the same."""


@dataclass(frozen=True)
class Point:
    """One metric value (mlflow.entities.Metric)."""

    key: str
    value: float
    timestamp_ms: int
    step: int


@dataclass(frozen=True)
class Opening:
    """What an MLflow run starts with."""

    run_id: str
    start_time_ms: int | None
    params: Mapping[str, str]
    tags: Mapping[str, str]


@dataclass(frozen=True)
class Step:
    """One log_batch call within MLflow's limits, then the run's status when it changes. Once
    done, the run is mirrored up to and including event `seq`."""

    seq: int
    metrics: tuple[Point, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    status: str | None = None
    """The MLflow status to set after the batch (None: unchanged)."""
    end_time_ms: int | None = None

    @property
    def calls(self) -> bool:
        """Whether the step has anything to send (else it only moves the position)."""
        return bool(self.metrics or self.tags or self.status)


def opening(record: RunRecord) -> Opening:
    """The MLflow run of `record`: params from its config, the tags it starts with."""
    tags = {TAG_RUN_ID: record.run_id, TAG_SOURCE: record.source, TAG_STATUS: record.status}
    if record.dataset_id:
        tags["oneseek.dataset_id"] = record.dataset_id
    start = _milliseconds(record.created_at) if record.created_at else None
    return Opening(record.run_id, start, config_params(record.config), tags)


def config_params(config: Mapping[str, Any] | None) -> dict[str, str]:
    """A config in the documented JSON shape as MLflow params: nested keys joined with '.',
    lists comma-joined, numbers and booleans as JSON writes them, nulls left out."""
    params: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            for key, inner in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, str):
            params[prefix] = value[:MAX_PARAM_VALUE]
        elif isinstance(value, list | tuple):
            params[prefix] = ",".join(str(item) for item in value)[:MAX_PARAM_VALUE]
        else:
            params[prefix] = json.dumps(value)

    add("", config or {})
    return params


def chunked(
    values: Mapping[str, str], size: int = MAX_PARAMS_TAGS_PER_CALL
) -> list[dict[str, str]]:
    """`values` in pieces MLflow takes in one call."""
    items = sorted(values.items())
    return [dict(items[i : i + size]) for i in range(0, len(items), size)]


def plan_steps(events: Sequence[training_pb2.TrainingEvent], status: str) -> list[Step]:
    """The calls that mirror `events` (one run's, in seq order) into its MLflow run, whose
    MLflow status is now `status`. The last step ends at the last event's seq, even when it has
    nothing to send (events MLflow has no use for: progress, heartbeats)."""
    steps: list[Step] = []
    points: list[tuple[int, Point]] = []  # (seq of the event, point)
    tags: dict[str, str] = {}

    def close(seq: int, new_status: str | None = None, end_ms: int | None = None) -> None:
        room = MAX_ENTITIES_PER_CALL - len(tags)
        while len(points) > room:  # the earlier points alone, within the limit
            piece, points[:] = points[:room], points[room:]
            # the event whose points were split is not done until its last piece is
            done = piece[-1][0] - 1 if points[0][0] == piece[-1][0] else piece[-1][0]
            steps.append(Step(max(done, steps[-1].seq if steps else 0), _only(piece)))
        steps.append(Step(seq, _only(points), dict(tags), new_status, end_ms))
        points.clear()
        tags.clear()

    for event in events:
        kind = event.WhichOneof("payload")
        stamp = _event_milliseconds(event)
        if kind == "epoch_end":
            points.extend((event.seq, point) for point in epoch_points(event.epoch_end, stamp))
        elif kind == "epoch_start" and status != RUNNING:  # a finished run resumed
            tags[TAG_STATUS] = "running"
            status = RUNNING
            close(event.seq, RUNNING)
        elif kind in ("training_complete", "training_error"):
            ending = _ending_tags(event)
            tags.update(ending)
            status = MLFLOW_STATUS.get(ending[TAG_STATUS], "FAILED")
            close(event.seq, status, stamp)
    if events and (points or tags or not steps or steps[-1].seq < events[-1].seq):
        close(events[-1].seq)
    return steps


def epoch_points(end: training_pb2.EpochEnd, stamp: int) -> list[Point]:
    """One epoch's metrics, per model under `<metric>/<model>`, at step = epoch."""
    points: list[Point] = []
    for prefix, values in (
        ("val_loss", end.val_losses),
        ("train_loss", end.train_losses),
        ("weight", end.weights),
        ("lr", end.lr_multipliers),
    ):
        points.extend(Point(f"{prefix}/{m}", values[m], stamp, end.epoch) for m in sorted(values))
    points.append(Point("total_loss", end.total_loss, stamp, end.epoch))
    return points


def _ending_tags(event: training_pb2.TrainingEvent) -> dict[str, str]:
    if event.HasField("training_complete"):
        done = event.training_complete
        tags = {TAG_STATUS: run_status_name(done.status) or "completed"}
        if done.dna:
            tags[TAG_DNA] = done.dna
        if done.run_dir:
            tags[TAG_RUN_DIR] = done.run_dir[:MAX_TAG_VALUE]
        if done.HasField("best_model"):
            tags[TAG_BEST_MODEL] = done.best_model
        return tags
    error = event.training_error
    return {
        TAG_STATUS: run_status_name(error.status) or "failed",
        TAG_ERROR: error.message[:MAX_TAG_VALUE],
    }


def _only(points: Iterable[tuple[int, Point]]) -> tuple[Point, ...]:
    return tuple(point for _, point in points)


def _event_milliseconds(event: training_pb2.TrainingEvent) -> int:
    return int(event.timestamp.ToMilliseconds())


def _milliseconds(text: str) -> int:
    return int(parse_timestamp(text).ToMilliseconds())


# ---- pacing ---------------------------------------------------------------------------------


class Pace:
    """A budget of time spent waiting on MLflow, so that a backlog never takes more than
    `share` of the wall clock from the machine (the client thread's CPU, and the MLflow server's
    when it runs beside the suite): it refills at `share` per second, up to `burst` seconds, and
    each call spends its duration. A call that overdraws it is followed by a rest until the
    budget is back to zero; a quiet mirror (a real run's epoch every few minutes) never rests."""

    def __init__(self, share: float, burst: float, now: float) -> None:
        if not 0 < share <= 1 or burst < 0:
            raise ValueError(f"share must be in (0, 1] and burst >= 0, got {share}, {burst}")
        self.share = share
        self.burst = burst
        self.budget = burst
        self._at = now

    def _refill(self, now: float) -> None:
        self.budget = min(self.burst, self.budget + (now - self._at) * self.share)
        self._at = now

    def spend(self, seconds: float, now: float) -> None:
        self._refill(now)
        self.budget -= seconds

    def rest(self, now: float) -> float:
        """How long to wait before the next call."""
        self._refill(now)
        return 0.0 if self.budget >= 0 else -self.budget / self.share
