"""The committed generated code matches protos/, and the contract names stay as designed."""

from __future__ import annotations

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
    assert streaming == {"WatchRun", "StreamEvents"}
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
