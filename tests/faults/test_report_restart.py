"""A metrics service killed (SIGKILL) and restarted under a stream of `POST …/metrics` from an
outside trainer, through the real gateway: every acknowledged report is stored exactly once.

The trainer does what a careful client does: it sends epochs in order and, when a report gets
no answer or a 502/503, sends the same report again until it is acknowledged. A retry of a
report that was stored before its acknowledgement was lost is answered with the seq it was
stored under and stores nothing; a different report for a stored epoch is refused with 409.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.api import metrics_pb2, metrics_pb2_grpc
from services.api.codec import event_to_dict
from tests.processes import GatewayProcess, ServiceProcess, free_port, workspace_env

pytestmark = pytest.mark.slow

REPORTER = "fault-report-token-5e0c"
RUN_ID = "run-20250505-101500"
KILL_AFTER = 40
"""Acknowledged reports before the kill."""
TOTAL = 110
"""Epochs the trainer reports in all."""


def start_gateway(env: dict[str, str], log: Path, timeout: float = 60) -> GatewayProcess:
    """A gateway process that counts as up once it answers /api/config: the training service is
    not needed here (its /healthz stays 503 without it)."""
    return GatewayProcess(env, log).start(timeout, ready="/api/config")


def restart(metrics: ServiceProcess, log: Path) -> ServiceProcess:
    """The same metrics service (address, database) started again."""
    again = ServiceProcess(metrics.command, *metrics.args, env=metrics.env, log=log)
    again.port, again.addr = metrics.port, metrics.addr
    return again.start()


def report_body(epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "val_losses": {"reporter-a": 2.0 + 1 / epoch, "reporter-b": 2.5 + 1 / (epoch + 1)},
        "train_losses": {"reporter-a": 2.1 + 1 / epoch, "reporter-b": 2.6},
        "weights": {"reporter-a": 1.1, "reporter-b": 0.9},
    }


def post(url: str, body: dict[str, Any], timeout: float = 15) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {REPORTER}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@dataclass
class Trainer:
    """An outside training process reporting epochs 1..TOTAL in order, retrying each report
    until it is acknowledged."""

    url: str
    acked: dict[int, int] = field(default_factory=dict)
    """epoch -> the seq its acknowledgement gave."""
    failures: list[str] = field(default_factory=list)
    """Answers that called for a retry (the service was down)."""
    refusals: list[str] = field(default_factory=list)
    """Answers that are not allowed for an in-order, retried stream: a bug."""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        for epoch in range(1, TOTAL + 1):
            body = report_body(epoch)
            while not self.stop.is_set():
                try:
                    status, answer = post(self.url, body)
                except (urllib.error.URLError, OSError) as error:  # no answer at all
                    self.failures.append(f"epoch {epoch}: {error}")
                    time.sleep(0.05)
                    continue
                if status == 200 and answer.get("success") is True:
                    self.acked[epoch] = int(answer["seq"])
                    break
                if status in (502, 503):
                    self.failures.append(f"epoch {epoch}: {status} {answer.get('message')}")
                    time.sleep(0.05)
                    continue
                self.refusals.append(f"epoch {epoch}: {status} {answer}")
                return


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, ServiceProcess], GatewayProcess]]:
    """A metrics service and a gateway, shared by the tests (each restarts what it kills)."""
    tmp_path = tmp_path_factory.mktemp("report-restart")
    no_models = tmp_path / "no-models"  # outside runs only: no base model is loaded here
    no_models.mkdir()
    env = workspace_env(tmp_path / "work", no_models, ONESEEK_REPORT_TOKEN=REPORTER)
    nowhere = f"127.0.0.1:{free_port()}"  # no training service: outside runs only
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", nowhere, env=env, log=tmp_path / "metrics.log"
    ).start()
    parts = {"metrics": metrics}
    gateway_env = {**env, "ONESEEK_TRAINING_ADDR": nowhere, "ONESEEK_METRICS_ADDR": metrics.addr}
    try:
        gateway = start_gateway(gateway_env, tmp_path / "gateway.log")
    except BaseException:
        metrics.stop()
        raise
    yield parts, gateway
    gateway_code = gateway.stop()
    metrics_code = parts["metrics"].stop()
    assert gateway_code == 0, gateway.output()
    assert metrics_code == 0, parts["metrics"].output()


def stored_events(addr: str, run_id: str) -> list[dict[str, Any]]:
    """Every stored event of the run, from the metrics service's own Subscribe stream."""
    with grpc.insecure_channel(addr) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        last = stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=run_id), timeout=10)
        runs = stub.ListRuns(metrics_pb2.ListRunsRequest(), timeout=10).runs
        last_seq = next(run.last_seq for run in runs if run.run_id == run_id)
        assert last.run_id == run_id
        events: list[dict[str, Any]] = []
        stream = stub.Subscribe(metrics_pb2.SubscribeRequest(run_id=run_id), timeout=30)
        for event in stream:
            if event.WhichOneof("payload") != "initial_state":
                events.append(event_to_dict(event))
            if event.seq >= last_seq and (events or last_seq == 0):
                stream.cancel()
                break
        return events


def test_every_acknowledged_report_is_stored_once_across_a_kill(
    services: tuple[dict[str, ServiceProcess], GatewayProcess], tmp_path: Path
) -> None:
    parts, gateway = services
    trainer = Trainer(f"{gateway.url}/api/training/{RUN_ID}/metrics")
    thread = threading.Thread(target=trainer.run, name="outside-trainer", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(trainer.acked) < KILL_AFTER and thread.is_alive():
            assert time.monotonic() < deadline, "the trainer made no progress"
            time.sleep(0.01)
        parts["metrics"].kill()  # SIGKILL, while the trainer is posting
        while not trainer.failures and thread.is_alive():  # it has seen the outage
            assert time.monotonic() < deadline + 60, "the trainer never noticed the kill"
            time.sleep(0.01)
        parts["metrics"] = restart(parts["metrics"], tmp_path / "metrics-restarted.log")
        thread.join(120)
        assert not thread.is_alive(), "the trainer did not finish within 120 s"
    finally:
        trainer.stop.set()
        thread.join(30)

    assert trainer.refusals == []
    assert trainer.failures, "the kill was never seen by the trainer"
    assert sorted(trainer.acked) == list(range(1, TOTAL + 1))

    # stored exactly once each: the run's events are the acknowledged epochs, seq 1..TOTAL
    events = stored_events(parts["metrics"].addr, RUN_ID)
    assert [e["seq"] for e in events] == list(range(1, TOTAL + 1))
    assert all(e["type"] == "epoch_end" for e in events)
    assert {e["epoch"]: e["seq"] for e in events} == trainer.acked
    for event in events:
        sent = report_body(event["epoch"])
        assert event["val_losses"] == sent["val_losses"]
        assert event["train_losses"] == sent["train_losses"]

    # ... and GET …/metrics through the gateway agrees
    status, metrics = post_get(gateway.url + f"/api/training/{RUN_ID}/metrics")
    assert status == 200
    assert [h["epoch"] for h in metrics["training_history"]] == list(range(1, TOTAL + 1))
    print(
        f"{len(trainer.acked)} reports acknowledged, {len(events)} stored, "
        f"{len(trainer.failures)} retried answers during the outage"
    )


def post_get(url: str) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.status, json.loads(reply.read())


def test_a_report_whose_acknowledgement_was_lost_is_retried_safely(
    services: tuple[dict[str, ServiceProcess], GatewayProcess], tmp_path: Path
) -> None:
    """Stored, then the service died before the trainer heard back: the retry, after the
    restart, gets the same seq and adds nothing; a different report for that epoch is a 409."""
    parts, gateway = services
    run_id = "run-20250505-101501"
    url = f"{gateway.url}/api/training/{run_id}/metrics"
    assert post(url, report_body(1))[0] == 200
    request = metrics_pb2.ReportMetricsRequest(run_id=run_id, epoch=2)
    for key in ("val_losses", "train_losses", "weights"):
        getattr(request, key).update(report_body(2)[key])
    with grpc.insecure_channel(parts["metrics"].addr) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        reply = stub.ReportMetrics(
            request, timeout=10, metadata=(("authorization", f"Bearer {REPORTER}"),)
        )
    stored_seq = reply.seq  # the acknowledgement the trainer never got
    parts["metrics"].kill()
    parts["metrics"] = restart(parts["metrics"], tmp_path / "metrics-restarted.log")

    deadline = time.monotonic() + 30
    while True:  # the gateway reconnects by itself
        status, answer = post(url, report_body(2))
        if status == 200 or time.monotonic() > deadline:
            break
        assert status == 503, answer
        time.sleep(0.1)
    assert (status, answer) == (200, {"success": True, "seq": stored_seq})
    changed = {**report_body(2), "val_losses": {"reporter-a": 9.0, "reporter-b": 9.0}}
    status, answer = post(url, changed)
    assert status == 409 and answer["error"] == "conflict"
    assert "already reported" in answer["message"] and f"seq {stored_seq}" in answer["message"]
    assert post(url, report_body(3)) == (200, {"success": True, "seq": stored_seq + 1})
    events = stored_events(parts["metrics"].addr, run_id)
    assert [(e["seq"], e["epoch"]) for e in events] == [(1, 1), (2, 2), (3, 3)]
