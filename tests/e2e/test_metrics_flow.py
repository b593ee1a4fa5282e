"""Events flow training service -> metrics service over real gRPC, with nothing lost."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.api.codec import event_to_dict, message_to_dict
from tests.processes import ServiceProcess, start_when_idle, workspace_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, str]:
    return workspace_env(tmp_path_factory.mktemp("metrics-flow"), demo_models_dir)


@pytest.fixture(scope="module")
def suite(
    env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    logs = tmp_path_factory.mktemp("logs")
    training = ServiceProcess("training-service", env=env, log=logs / "training.log").start()
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", training.addr, env=env, log=logs / "metrics.log"
    ).start()
    parts = {"training": training, "metrics": metrics, "logs": logs}
    yield parts
    assert parts["metrics"].stop() == 0, parts["metrics"].output()
    assert training.stop() == 0, training.output()


def training_stub(suite: dict[str, Any]) -> training_pb2_grpc.TrainingServiceStub:
    return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(suite["training"].addr))


def metrics_stub(suite: dict[str, Any]) -> metrics_pb2_grpc.MetricsServiceStub:
    return metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(suite["metrics"].addr))


def start_run(stub: training_pb2_grpc.TrainingServiceStub, epochs: int) -> str:
    request = training_pb2.StartRunRequest(
        dataset_id="small",
        base_models=["tiny-llama", "tiny-gpt2"],
        epochs=epochs,
        refresh_interval=0.05,
        auto_stop_threshold=0.0,
    )
    return start_when_idle(stub, request)


def subscribe(
    stub: metrics_pb2_grpc.MetricsServiceStub, run_id: str, last_seq: int, after: int = 0
) -> list[dict[str, Any]]:
    """initial_state, then every event up to `last_seq`."""
    events = []
    stream = stub.Subscribe(
        metrics_pb2.SubscribeRequest(run_id=run_id, after_seq=after), timeout=60
    )
    for event in stream:
        events.append(event_to_dict(event))
        if event.seq >= last_seq and event.WhichOneof("payload") != "initial_state":
            stream.cancel()
            break
        if (
            event.WhichOneof("payload") == "initial_state"
            and event.seq >= last_seq
            and after >= last_seq
        ):
            stream.cancel()
            break
    return events


def wait_metrics_status(stub: metrics_pb2_grpc.MetricsServiceStub, run_id: str, status: int) -> Any:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            metrics = stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=run_id), timeout=5)
            if metrics.status == status:
                return metrics
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise
        time.sleep(0.1)
    raise TimeoutError(f"the metrics service never saw {run_id} reach status {status}")


def test_metrics_agree_with_the_run_folder(suite: dict[str, Any]) -> None:
    training, metrics = training_stub(suite), metrics_stub(suite)
    run_id = start_run(training, epochs=3)
    # available from the moment the run starts
    early = wait_metrics_status(metrics, run_id, training_pb2.RUN_STATUS_RUNNING)
    assert early.total_epochs == 3
    watched = [
        event_to_dict(e)
        for e in training.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=180)
    ]
    final = wait_metrics_status(metrics, run_id, training_pb2.RUN_STATUS_COMPLETED)
    run = training.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    results = json.loads((Path(run.run_dir) / "training_results.json").read_text())

    history = [message_to_dict(epoch) for epoch in final.training_history]
    envelope = ("type", "run_id", "seq", "timestamp")
    assert history == [
        {k: v for k, v in e.items() if k not in envelope} for e in results["history"]
    ]
    last = results["history"][-1]
    assert dict(final.val_losses) == last["val_losses"]
    assert dict(final.weights) == results["final_weights"]
    assert dict(final.lr_multipliers) == results["final_lr_multipliers"]
    assert final.total_loss == last["total_loss"]
    assert final.current_epoch == 3 and final.progress_percent == 100

    board = metrics.GetLeaderboard(metrics_pb2.GetLeaderboardRequest(run_id=run_id), timeout=5)
    entries = [message_to_dict(e) for e in board.leaderboard]
    ranked = sorted(last["val_losses"].items(), key=lambda item: (item[1], item[0]))
    assert [e["model_name"] for e in entries] == [name for name, _ in ranked]
    assert [e["rank"] for e in entries] == [1, 2]
    for entry in entries:
        assert entry["val_loss"] == last["val_losses"][entry["model_name"]]
        assert entry["weight_multiplier"] == results["final_weights"][entry["model_name"]]
        assert entry["lr_multiplier"] == results["final_lr_multipliers"][entry["model_name"]]

    # the stored event list is the training service's, initial_state first
    streamed = subscribe(metrics, run_id, last_seq=len(watched))
    assert streamed[0]["type"] == "initial_state"
    assert streamed[1:] == watched
    runs = metrics.ListRuns(metrics_pb2.ListRunsRequest(), timeout=5).runs
    assert runs[0].run_id == run_id and runs[0].status == training_pb2.RUN_STATUS_COMPLETED


def test_metrics_restart_mid_run_loses_and_duplicates_nothing(
    suite: dict[str, Any], env: dict[str, str]
) -> None:
    training = training_stub(suite)
    run_id = start_run(training, epochs=6)
    watch = training.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=300)
    watched: list[dict[str, Any]] = []
    for event in watch:
        watched.append(event_to_dict(event))
        if watched[-1]["type"] == "epoch_end" and watched[-1]["epoch"] == 1:
            break
    assert suite["metrics"].stop() == 0  # SIGTERM mid-run
    for event in watch:  # the run goes on without the metrics service
        watched.append(event_to_dict(event))
        if watched[-1]["type"] == "epoch_end" and watched[-1]["epoch"] == 3:
            break
    suite["metrics"] = ServiceProcess(
        "metrics-service",
        "--training-addr",
        suite["training"].addr,
        env=env,
        log=suite["logs"] / "metrics-2.log",
    ).start()
    watched.extend(event_to_dict(e) for e in watch)
    assert watched[-1]["type"] == "training_complete"
    metrics = metrics_stub(suite)
    wait_metrics_status(metrics, run_id, training_pb2.RUN_STATUS_COMPLETED)
    streamed = subscribe(metrics, run_id, last_seq=len(watched))
    assert [e["seq"] for e in streamed[1:]] == list(range(1, len(watched) + 1))
    assert streamed[1:] == watched
    # a subscriber that resumes from the middle gets exactly the rest
    middle = len(watched) // 2
    rest = subscribe(metrics, run_id, last_seq=len(watched), after=middle)
    assert rest[0]["type"] == "initial_state"
    assert rest[1:] == watched[middle:]
