"""The documented JSON shape: numbers stay numbers, absent optionals are null, round trips."""

from __future__ import annotations

import json

import pytest

from services.api import training_pb2
from services.api.codec import (
    event_from_dict,
    event_to_dict,
    format_timestamp,
    now_timestamp,
    parse_timestamp,
    run_status_name,
    run_status_value,
)


def _event(kind: str) -> training_pb2.TrainingEvent:
    event = training_pb2.TrainingEvent(
        run_id="run-20260101-120000",
        seq=2**40,
        timestamp=parse_timestamp("2026-01-01T12:00:00.123Z"),
    )
    getattr(event, kind).SetInParent()
    return event


def test_epoch_end_shape() -> None:
    event = _event("epoch_end")
    end = event.epoch_end
    end.epoch, end.current_epoch, end.total_epochs = 3, 3, 5
    end.val_losses.update({"mistral-7b-instruct": 3.17, "llama-2-7b-chat": 4.03})
    end.total_loss = 3.98
    end.auto_stop_info.threshold = 0.001
    end.auto_stop_info.remaining = 2
    end.auto_stop_info.current_change = 0.0023
    end.progress_percent = 60
    data = event_to_dict(event)
    assert data["type"] == "epoch_end"
    assert data["seq"] == 2**40 and isinstance(data["seq"], int)
    assert data["timestamp"] == "2026-01-01T12:00:00.123Z"
    assert data["val_losses"] == {"mistral-7b-instruct": 3.17, "llama-2-7b-chat": 4.03}
    assert data["auto_stop_info"]["current_change"] == 0.0023
    assert data["auto_stop_info"]["remaining"] == 2
    assert event_from_dict(json.loads(json.dumps(data))) == event


def test_absent_optional_is_null() -> None:
    event = _event("epoch_end")
    assert event_to_dict(event)["auto_stop_info"] is None  # an unset message is null too
    event.epoch_end.auto_stop_info.SetInParent()
    data = event_to_dict(event)
    assert data["auto_stop_info"]["current_change"] is None
    done = event_to_dict(_event("training_complete"))
    assert done["best_model"] is None and done["total_loss"] is None


def test_enums_are_lower_case_names() -> None:
    event = _event("training_complete")
    event.training_complete.status = training_pb2.RUN_STATUS_AUTO_STOPPED
    assert event_to_dict(event)["status"] == "auto_stopped"
    assert run_status_name(training_pb2.RUN_STATUS_INTERRUPTED) == "interrupted"
    assert run_status_value("failed") == training_pb2.RUN_STATUS_FAILED
    with pytest.raises(ValueError, match="allowed: running, completed"):
        run_status_value("FAILED")


@pytest.mark.parametrize(
    "kind",
    [
        f.name
        for f in training_pb2.TrainingEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
        if f.name != "initial_state"  # its metrics share the envelope: see below
    ],
)
def test_every_event_type_round_trips(kind: str) -> None:
    event = _event(kind)
    data = event_to_dict(event)
    assert data["type"] == kind
    assert list(data)[:4] == ["type", "run_id", "seq", "timestamp"]
    assert event_from_dict(json.loads(json.dumps(data))) == event


def test_initial_state_is_flat() -> None:
    event = _event("initial_state")
    state = event.initial_state
    state.metrics.run_id = event.run_id
    state.metrics.status = training_pb2.RUN_STATUS_RUNNING
    state.metrics.timestamp.CopyFrom(event.timestamp)
    state.config.dataset_id = "sample"
    state.models.add(name="tiny-llama", parameter_count=123)
    data = event_to_dict(event)
    assert data["status"] == "running"
    assert data["config"]["dataset_id"] == "sample"
    assert data["models"][0]["parameter_count"] == 123
    assert "metrics" not in data
    assert event_from_dict(data) == event


def test_timestamps_are_milliseconds_utc() -> None:
    ts = now_timestamp()
    assert ts.nanos % 1_000_000 == 0
    text = format_timestamp(ts)
    assert text.endswith("Z") and len(text) == len("2026-01-01T12:00:00.000Z")
    assert parse_timestamp(text) == ts
    assert format_timestamp(parse_timestamp("2026-01-01T13:00:00.5+01:00")) == (
        "2026-01-01T12:00:00.500Z"
    )
