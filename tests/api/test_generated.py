"""The committed generated code matches protos/, and the contract names stay as designed."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from services.api import metrics_pb2, training_pb2

REPO = Path(__file__).resolve().parents[2]


def test_generated_code_is_not_stale() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "protos" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_services_expose_the_designed_rpcs() -> None:
    training = training_pb2.DESCRIPTOR.services_by_name["TrainingService"]
    metrics = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"]
    assert {m.name for m in training.methods} >= {
        "StartRun",
        "GetRun",
        "ListRuns",
        "StopRun",
        "WatchRun",
        "StreamEvents",
    }
    assert {m.name for m in metrics.methods} == {
        "ReportMetrics",
        "ReportMetricsBatch",
        "GetMetrics",
        "GetLeaderboard",
        "ListRuns",
        "Subscribe",
    }
    streaming = {m.name for m in training.methods if m.server_streaming}
    assert streaming == {"WatchRun", "StreamEvents", "Generate", "ExportModel"}
    assert [m.name for m in metrics.methods if m.server_streaming] == ["Subscribe"]


def test_event_carries_every_documented_type() -> None:
    payload = training_pb2.TrainingEvent.DESCRIPTOR.oneofs_by_name["payload"]
    assert {f.name for f in payload.fields} == {
        "initial_state",
        "epoch_start",
        "progress",
        "epoch_end",
        "weight_adjustment",
        "auto_stop_triggered",
        "training_complete",
        "training_error",
        "heartbeat",
    }


def test_messages_pickle_under_their_real_module() -> None:
    # a worker's spec or another process's arguments may carry them
    config = training_pb2.RunConfig(dataset_id="sample", base_models=["a", "b"], epochs=3)
    event = training_pb2.TrainingEvent(run_id="run-20260101-000000", seq=1)
    event.epoch_end.val_losses["a"] = 2.5
    report = metrics_pb2.ReportMetricsRequest(run_id="run-20260101-000000", epoch=1)
    for message in (config, event, report):
        assert type(message).__module__.startswith("services.api.oneseek.")
        assert pickle.loads(pickle.dumps(message)) == message
