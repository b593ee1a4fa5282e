"""An outside training process's report of one epoch, once checked (`services.api.reports`):
planned as the epoch_end event of its run (then training_complete when it is the run's last).

Rules (what a client can rely on):
- epochs are reported in increasing order, each once; a report is keyed by (run, epoch):
  sending the same report again (a retry, e.g. after its acknowledgement was lost to a restart)
  is answered with the seq it was stored under and stores nothing, while a different report of
  a stored epoch is refused (ALREADY_EXISTS, HTTP 409) and names the seq it conflicts with;
- absent weights and learning rates keep the run's previous values; an absent total_loss is
  the population loss with the weights in force during the epoch (the previous report's);
  an absent progress_percent is 100 * epoch / total_epochs (0 while total_epochs is unknown);
- the report of epoch == total_epochs, or one whose auto_stop_info.triggered is true, is the
  run's last: the run becomes `completed` (or `auto_stopped`) and takes no further reports.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from services.api import metrics_pb2, training_pb2
from services.api.run_state import RunState
from services.core.errors import AlreadyExists, Conflict, InvalidInput


class ReportRefused(Conflict):
    """The run cannot take this report now."""


class EpochAlreadyReported(AlreadyExists):
    """The epoch was already reported with other values."""


@dataclass(frozen=True)
class ReportPlan:
    seq: int
    """The seq of the report's epoch_end (the stored one when the report is a retry)."""
    events: list[training_pb2.TrainingEvent] = field(default_factory=list)
    """What to store and publish, in order; empty for a retry."""


def same_report(request: metrics_pb2.ReportMetricsRequest, stored: training_pb2.EpochEnd) -> bool:
    """Whether `stored` is what `request` already produced (every value the request carries)."""
    if (
        dict(request.val_losses) != dict(stored.val_losses)
        or dict(request.train_losses) != dict(stored.train_losses)
        or dict(request.weights) != dict(stored.weights)
        or dict(request.lr_multipliers) != dict(stored.lr_multipliers)
    ):
        return False
    if request.HasField("total_epochs") and request.total_epochs != stored.total_epochs:
        return False
    if request.HasField("total_loss") and request.total_loss != stored.total_loss:
        return False
    if request.HasField("progress_percent") and request.progress_percent != stored.progress_percent:
        return False
    return not request.HasField("auto_stop_info") or request.auto_stop_info == stored.auto_stop_info


def plan_report(
    state: RunState, request: metrics_pb2.ReportMetricsRequest, now: Timestamp
) -> ReportPlan:
    """The events a checked report adds to `state`'s run, or a refusal that says what to do."""
    run_id, epoch = request.run_id, request.epoch
    stored = state.reported_epoch(epoch)
    if stored is not None and same_report(request, stored[1]):
        return ReportPlan(seq=stored[0])
    if state.finished:
        raise ReportRefused(
            f"Run {run_id} is {state.status}: it takes no more reports. Report a new run under "
            "a new run id."
        )
    if stored is not None:
        raise EpochAlreadyReported(
            f"Epoch {epoch} of run {run_id} was already reported (seq {stored[0]}) with other "
            f"values; report epoch {state.current_epoch + 1} next, or start over under a new "
            "run id."
        )
    if epoch <= state.current_epoch:
        raise ReportRefused(
            f"Epoch {epoch} of run {run_id} comes too late: epoch {state.current_epoch} was "
            f"already reported, and epochs are reported in increasing order. Report epoch "
            f"{state.current_epoch + 1} next."
        )
    total = request.total_epochs if request.HasField("total_epochs") else state.total_epochs
    if total and epoch > total:
        raise InvalidInput(
            f"epoch {epoch} is beyond the {total} epochs of run {run_id}; send total_epochs "
            "with the report to raise it.",
            field="epoch",
        )
    end = _epoch_end(state, request, total)
    first = training_pb2.TrainingEvent(run_id=run_id, seq=state.last_seq + 1, epoch_end=end)
    first.timestamp.CopyFrom(now)
    events = [first]
    triggered = request.HasField("auto_stop_info") and request.auto_stop_info.triggered
    if (total and epoch == total) or triggered:
        done = _completion(state, end, now, triggered=triggered)
        last = training_pb2.TrainingEvent(run_id=run_id, seq=first.seq + 1, training_complete=done)
        last.timestamp.CopyFrom(now)
        events.append(last)
    return ReportPlan(seq=first.seq, events=events)


def _epoch_end(
    state: RunState, request: metrics_pb2.ReportMetricsRequest, total: int
) -> training_pb2.EpochEnd:
    end = training_pb2.EpochEnd(
        epoch=request.epoch, current_epoch=request.epoch, total_epochs=total
    )
    end.val_losses.update(request.val_losses)
    end.train_losses.update(request.train_losses)
    end.weights.update(request.weights)
    end.lr_multipliers.update(request.lr_multipliers)
    if request.HasField("total_loss"):
        end.total_loss = request.total_loss
    else:  # docs/rules.md: the weights that were in force during the epoch
        losses = request.val_losses
        end.total_loss = sum(state.weights.get(m, 1.0) * v for m, v in losses.items()) / len(losses)
    if request.HasField("progress_percent"):
        end.progress_percent = request.progress_percent
    elif total:
        end.progress_percent = 100.0 * request.epoch / total
    if request.HasField("auto_stop_info"):
        end.auto_stop_info.CopyFrom(request.auto_stop_info)
    return end


def _completion(
    state: RunState, end: training_pb2.EpochEnd, now: Timestamp, *, triggered: bool
) -> training_pb2.TrainingComplete:
    status = (
        training_pb2.RUN_STATUS_AUTO_STOPPED if triggered else training_pb2.RUN_STATUS_COMPLETED
    )
    weights = {name: state.weights.get(name, 1.0) for name in end.val_losses}
    weights.update(end.weights)
    done = training_pb2.TrainingComplete(
        status=status,
        epochs_run=end.epoch,
        best_model=min(end.val_losses.items(), key=lambda item: (item[1], item[0]))[0],
        total_loss=end.total_loss,
    )
    done.val_losses.update(end.val_losses)
    done.weights.update(weights)
    if state.created_at is not None:
        elapsed = now.ToNanoseconds() - state.created_at.ToNanoseconds()
        done.duration_seconds = max(0.0, elapsed / 1e9)
    return done
