"""The metrics service over real gRPC on a free loopback port: every RPC, its errors, Subscribe's
exactly-once replay-then-live, slow subscribers, health, reflection, auth and shutdown.

Events of training-service runs are handed to the server's catalog exactly as the follower
hands them over (tests/metrics/test_follower.py covers the follower itself).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio
from grpc.aio import EOF  # type: ignore[attr-defined]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2
from services.api.codec import message_to_dict
from services.api.runtime import bearer
from services.cli import main as oneseek
from services.metrics.catalog import RunCatalog
from services.metrics.records import record_from_run
from services.metrics.server import SERVICE_NAME, MetricsServer
from tests.metrics.sample_run import RUN_ID, run_events, run_message, three_epochs, with_cursors

OUTSIDE = "run-20260201-090000"
DEAD_TRAINING_ADDR = "127.0.0.1:1"  # nothing listens: lookups fail fast, as when it is down


@dataclass
class Service:
    server: MetricsServer
    channel: aio.Channel
    stub: Any  # MetricsServiceAsyncStub

    @property
    def catalog(self) -> RunCatalog:
        assert self.server.catalog is not None
        return self.server.catalog


async def start(tmp_path: Path, queue_size: int = 2048) -> Service:
    server = MetricsServer(
        "127.0.0.1:0",
        DEAD_TRAINING_ADDR,
        f"sqlite:///{tmp_path / 'metrics.db'}",
        queue_size=queue_size,
        follow=False,
    )
    port = await server.start()
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    return Service(server, channel, metrics_pb2_grpc.MetricsServiceStub(channel))


@pytest.fixture
async def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Service]:
    monkeypatch.delenv("ONESEEK_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ONESEEK_REPORT_TOKEN", raising=False)
    running = await start(tmp_path)
    yield running
    await running.channel.close(None)
    await running.server.stop(grace=1)


async def feed(service: Service, events: list[training_pb2.TrainingEvent], register: bool) -> None:
    """What the follower does with a batch from StreamEvents."""
    runs = [record_from_run(run_message(events[0].run_id))] if register else []
    await service.catalog.commit(with_cursors(events), cursor=None, new_runs=runs)


async def rpc_error(call: Any) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


def outside_report(epoch: int = 1, **fields: Any) -> metrics_pb2.ReportMetricsRequest:
    values: dict[str, Any] = {
        "run_id": OUTSIDE,
        "epoch": epoch,
        "total_epochs": 5,
        "val_losses": {"mine-a": 2.0 - 0.1 * epoch, "mine-b": 2.5 - 0.1 * epoch},
    }
    values.update(fields)
    return metrics_pb2.ReportMetricsRequest(**values)


# ---- reads ----------------------------------------------------------------------------------


async def test_metrics_and_leaderboard_exist_from_the_start_and_follow_the_run(
    service: Service,
) -> None:
    await service.catalog.register([record_from_run(run_message())])
    metrics = await service.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=RUN_ID))
    assert metrics.status == training_pb2.RUN_STATUS_RUNNING
    assert metrics.current_epoch == 0 and metrics.total_epochs == 3
    board = await service.stub.GetLeaderboard(metrics_pb2.GetLeaderboardRequest(run_id=RUN_ID))
    assert len(board.leaderboard) == 3 and not board.leaderboard[0].HasField("val_loss")

    events = run_events(three_epochs())
    await feed(service, events, register=False)
    metrics = await service.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=RUN_ID))
    data = message_to_dict(metrics)
    assert data["status"] == "completed" and data["progress_percent"] == 100
    assert data["current_epoch"] == 3 and len(data["training_history"]) == 3
    assert data["val_losses"] == three_epochs()[-1]
    board = await service.stub.GetLeaderboard(metrics_pb2.GetLeaderboardRequest(run_id=RUN_ID))
    assert [e.model_name for e in board.leaderboard] == ["tiny-llama", "tiny-qwen", "tiny-gpt2"]
    assert [e.rank for e in board.leaderboard] == [1, 2, 3]


async def test_unknown_and_malformed_run_ids(service: Service) -> None:
    for method in (service.stub.GetMetrics, service.stub.GetLeaderboard):
        request_type = (
            metrics_pb2.GetMetricsRequest
            if method is service.stub.GetMetrics
            else metrics_pb2.GetLeaderboardRequest
        )
        error = await rpc_error(method(request_type(run_id="run-20990101-000000")))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "is not known to the metrics service; list runs with" in (error.details() or "")
        error = await rpc_error(method(request_type(run_id="../../etc/passwd")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "expected run-YYYYMMDD-HHMMSS" in (error.details() or "")


async def test_runs_are_listed_newest_first(service: Service) -> None:
    await feed(service, run_events(three_epochs()), register=True)
    await service.stub.ReportMetrics(outside_report())
    listed = await service.stub.ListRuns(metrics_pb2.ListRunsRequest())
    # the outside run was created now, after the sample run's start
    assert [r.run_id for r in listed.runs] == [OUTSIDE, RUN_ID]
    sample = listed.runs[1]
    assert sample.status == training_pb2.RUN_STATUS_COMPLETED and sample.dataset_id == "sample"
    assert sample.best_model == "tiny-llama" and sample.last_seq > 10
    done = await service.stub.ListRuns(
        metrics_pb2.ListRunsRequest(status=training_pb2.RUN_STATUS_COMPLETED)
    )
    assert [r.run_id for r in done.runs] == [RUN_ID]
    one = await service.stub.ListRuns(metrics_pb2.ListRunsRequest(limit=1))
    assert [r.run_id for r in one.runs] == [OUTSIDE]
    error = await rpc_error(service.stub.ListRuns(metrics_pb2.ListRunsRequest(limit=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit" in (error.details() or "")


# ---- reports --------------------------------------------------------------------------------


async def test_a_report_is_stored_as_an_event_and_shows_in_the_metrics(service: Service) -> None:
    answer = await service.stub.ReportMetrics(outside_report(weights={"mine-a": 1.2}))
    assert answer.success and answer.seq == 1
    metrics = await service.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=OUTSIDE))
    assert metrics.current_epoch == 1 and metrics.total_epochs == 5
    assert dict(metrics.weights) == {"mine-a": 1.2, "mine-b": 1.0}
    assert metrics.training_history[0].val_losses["mine-a"] == pytest.approx(1.9)
    second = await service.stub.ReportMetrics(outside_report(2))
    assert second.seq == 2
    retry = await service.stub.ReportMetrics(outside_report(2))
    assert retry.seq == 2  # stored once
    assert [e.seq for e in await service.catalog.store.events(OUTSIDE)] == [1, 2]


async def test_bad_reports_get_the_right_status(service: Service) -> None:
    await feed(service, run_events(three_epochs()), register=True)
    cases = [
        (outside_report(run_id="nope"), grpc.StatusCode.INVALID_ARGUMENT, "Run id 'nope'"),
        (outside_report(epoch=0), grpc.StatusCode.INVALID_ARGUMENT, "epoch must be"),
        (outside_report(val_losses={}), grpc.StatusCode.INVALID_ARGUMENT, "val_losses is empty"),
        (
            outside_report(val_losses={"a": float("nan")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "val_losses['a'] must be a finite number",
        ),
        (
            outside_report(weights={"mine-a": -1.0}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "weights['mine-a']",
        ),
        (
            outside_report(run_id=RUN_ID),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"run {RUN_ID} is trained by the training service; only outside runs can be reported",
        ),
    ]
    for request, code, words in cases:
        error = await rpc_error(service.stub.ReportMetrics(request))
        assert error.code() == code, words
        assert words.lower() in (error.details() or "").lower()
    await service.stub.ReportMetrics(outside_report())
    error = await rpc_error(service.stub.ReportMetrics(outside_report(val_losses={"mine-a": 9.0})))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "report epoch 2 next" in (error.details() or "")


async def test_concurrent_reports_get_distinct_gapless_seqs(service: Service) -> None:
    runs = [f"run-20260201-0900{n:02d}" for n in range(12)]

    async def report_epochs(run_id: str) -> list[int]:
        seqs = []
        for epoch in range(1, 6):
            answer = await service.stub.ReportMetrics(outside_report(epoch, run_id=run_id))
            seqs.append(answer.seq)
        return seqs

    results = await asyncio.gather(*(report_epochs(r) for r in runs))
    # epoch 5 of 5 completes the run: its training_complete takes seq 6
    assert all(seqs == [1, 2, 3, 4, 5] for seqs in results)
    for run_id in runs:
        stored = await service.catalog.store.events(run_id)
        assert [e.seq for e in stored] == [1, 2, 3, 4, 5, 6]
        assert stored[-1].WhichOneof("payload") == "training_complete"

    # one epoch raced with two different values: exactly one wins
    contested = [
        service.stub.ReportMetrics(outside_report(1, run_id="run-20260201-091000", val_losses=v))
        for v in ({"a": 1.0}, {"a": 2.0}, {"a": 3.0}, {"a": 1.0})
    ]
    outcomes = await asyncio.gather(*contested, return_exceptions=True)
    won = [o for o in outcomes if isinstance(o, metrics_pb2.ReportMetricsResponse)]
    lost = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert {o.seq for o in won} == {1}
    assert all(o.code() == grpc.StatusCode.ALREADY_EXISTS for o in lost)
    assert len(await service.catalog.store.events("run-20260201-091000")) == 1


# ---- Subscribe ------------------------------------------------------------------------------


async def take(call: Any, count: int) -> list[training_pb2.TrainingEvent]:
    got: list[training_pb2.TrainingEvent] = []
    while len(got) < count:
        event = await call.read()
        if event is EOF:
            break
        got.append(event)
    return got


async def test_subscribe_sends_initial_state_then_exactly_the_missing_events_then_live(
    service: Service,
) -> None:
    events = run_events(three_epochs())
    half = len(events) // 2
    await feed(service, events[:half], register=True)
    for after in (0, 3, half):
        call = service.stub.Subscribe(metrics_pb2.SubscribeRequest(run_id=RUN_ID, after_seq=after))
        first = await call.read()
        assert first.WhichOneof("payload") == "initial_state" and first.seq == half
        assert list(first.initial_state.config.base_models) == list(
            run_message().config.base_models
        )
        replayed = await take(call, half - after)
        assert [e.seq for e in replayed] == list(range(after + 1, half + 1))
        assert all(e.cursor == 0 for e in replayed)
        call.cancel()
    # live after the replay, through the seam
    call = service.stub.Subscribe(metrics_pb2.SubscribeRequest(run_id=RUN_ID, after_seq=2))
    assert (await call.read()).seq == half
    rest = asyncio.create_task(take(call, len(events) - 2))
    await feed(service, events[half:], register=False)
    got = await asyncio.wait_for(rest, 10)
    assert [e.seq for e in got] == list(range(3, len(events) + 1))
    assert got[-1].WhichOneof("payload") == "training_complete"
    call.cancel()


async def test_subscribe_errors(service: Service) -> None:
    cases = [
        (metrics_pb2.SubscribeRequest(run_id="run-20990101-000000"), grpc.StatusCode.NOT_FOUND),
        (metrics_pb2.SubscribeRequest(run_id="bad id"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            metrics_pb2.SubscribeRequest(run_id=RUN_ID, after_seq=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        call = service.stub.Subscribe(request)
        error = await rpc_error(call.read())
        assert error.code() == code


async def test_a_slow_subscriber_is_dropped_while_a_fast_one_gets_everything(
    tmp_path: Path,
) -> None:
    service = await start(tmp_path, queue_size=32)
    try:
        await service.catalog.register([record_from_run(run_message())])
        request = metrics_pb2.SubscribeRequest(run_id=RUN_ID)
        # two clients, two connections; the slow one buffers little (no BDP window growth)
        slow_channel = aio.insecure_channel(
            f"127.0.0.1:{service.server.port}",
            options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)],
        )
        slow: Any = metrics_pb2_grpc.MetricsServiceStub(slow_channel).Subscribe(request)
        fast = service.stub.Subscribe(request)
        assert (await slow.read()).seq == 0 and (await fast.read()).seq == 0
        total = 1500
        got: list[training_pb2.TrainingEvent] = []
        received_more = asyncio.Condition()

        async def read_fast() -> None:
            while len(got) < total and (event := await fast.read()) is not EOF:
                got.append(event)
                async with received_more:
                    received_more.notify_all()

        fast_got = asyncio.create_task(read_fast())
        wide = {f"model-{i:02d}-" + "x" * 100: 1.0 + i for i in range(10)}  # ~3 KB each
        for start_seq in range(1, total + 1, 10):
            # never more than 20 events ahead of the fast client, however slow this machine
            # is: only the client that does not read may fill its queue of 32
            async with received_more:
                await received_more.wait_for(lambda: len(got) >= start_seq - 21)  # noqa: B023
            batch = []
            for seq in range(start_seq, start_seq + 10):
                event = training_pb2.TrainingEvent(run_id=RUN_ID, seq=seq)
                event.timestamp.GetCurrentTime()
                event.epoch_end.epoch = seq
                event.epoch_end.val_losses.update(wide)
                batch.append(event)
            await service.catalog.commit(batch)
            await asyncio.sleep(0.002)  # ~5,000 events/s: far above a real run's rate
        await asyncio.wait_for(fast_got, 60)
        assert [e.seq for e in got] == list(range(1, total + 1))
        received: list[training_pb2.TrainingEvent] = []
        with pytest.raises(aio.AioRpcError) as caught:
            while (item := await slow.read()) is not EOF:
                received.append(item)
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # what it got is a gapless prefix, and the error says where to resume
        assert [e.seq for e in received] == list(range(1, len(received) + 1))
        assert len(received) < total
        assert error.details() == (
            "Client too slow: more than 32 events were waiting. "
            f"Reconnect with after_seq={len(received)} (the last seq received)."
        )
        await slow_channel.close(None)
    finally:
        await service.channel.close(None)
        await service.server.stop(grace=1)


async def test_shutdown_ends_open_streams_cleanly(tmp_path: Path) -> None:
    service = await start(tmp_path)
    await service.catalog.register([record_from_run(run_message())])
    call = service.stub.Subscribe(metrics_pb2.SubscribeRequest(run_id=RUN_ID))
    await call.read()
    health = health_pb2_grpc.HealthStub(service.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(service.server.stop(grace=5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # a health Watch never ends by itself: it would hold the grace period
    assert await asyncio.wait_for(call.read(), 5) is EOF
    assert await call.code() == grpc.StatusCode.OK
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(stopping, 10)
    assert loop.time() - began < 4  # nothing left open waited for the 5 s grace
    await service.channel.close(None)


# ---- health, reflection, auth ---------------------------------------------------------------


async def test_health_and_reflection(service: Service) -> None:
    health = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", SERVICE_NAME):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name for s in (await call.read()).list_services_response.service]
    assert "oneseek.metrics.v1.MetricsService" in names
    call.cancel()


async def test_a_batch_answers_each_report_as_report_metrics_would(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    await feed(service, run_events(three_epochs()), register=True)
    other = "run-20260201-092000"
    batch = metrics_pb2.ReportMetricsBatchRequest(
        reports=[
            outside_report(1),
            outside_report(1, run_id=other),
            outside_report(2),  # after epoch 1 of the same run: they keep their order
            outside_report(epoch=0),
            outside_report(run_id=RUN_ID),
            outside_report(1, val_losses={"mine-a": 9.0}),
        ]
    )
    results = (await service.stub.ReportMetricsBatch(batch)).results
    assert [(r.code, r.seq) for r in results[:3]] == [(0, 1), (0, 1), (0, 2)]
    invalid, refused, conflict = results[3:]
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and invalid.field == "epoch"
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "trained by the training service" in refused.message
    assert conflict.code == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert [e.seq for e in await service.catalog.store.events(OUTSIDE)] == [1, 2]
    # the same token rule as ReportMetrics
    monkeypatch.setenv("ONESEEK_REPORT_TOKEN", "report-secret")
    error = await rpc_error(service.stub.ReportMetricsBatch(batch))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    again = await service.stub.ReportMetricsBatch(
        metrics_pb2.ReportMetricsBatchRequest(reports=[outside_report(2)]),
        metadata=bearer("report-secret"),
    )
    assert [(r.code, r.seq) for r in again.results] == [(0, 2)]  # a retry: stored once


async def test_reports_need_a_token_once_one_is_set(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONESEEK_ADMIN_TOKEN", "admin-secret")
    monkeypatch.setenv("ONESEEK_REPORT_TOKEN", "report-secret")
    error = await rpc_error(service.stub.ReportMetrics(outside_report()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Missing bearer token" in (error.details() or "")
    error = await rpc_error(service.stub.ReportMetrics(outside_report(), metadata=bearer("guess")))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not valid" in (error.details() or "")
    ok = await service.stub.ReportMetrics(outside_report(), metadata=bearer("report-secret"))
    assert ok.seq == 1
    ok = await service.stub.ReportMetrics(outside_report(2), metadata=bearer("admin-secret"))
    assert ok.seq == 2
    # reads stay open
    metrics = await service.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=OUTSIDE))
    assert metrics.current_epoch == 2


async def test_a_restart_answers_from_the_stored_events(tmp_path: Path) -> None:
    first = await start(tmp_path)
    await feed(first, run_events(three_epochs()), register=True)
    await first.stub.ReportMetrics(outside_report())
    before = await first.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=RUN_ID))
    await first.channel.close(None)
    await first.server.stop(grace=1)
    second = await start(tmp_path)
    try:
        after = await second.stub.GetMetrics(metrics_pb2.GetMetricsRequest(run_id=RUN_ID))
        assert after == before
        # the outside run goes on where it stopped
        answer = await second.stub.ReportMetrics(outside_report(2))
        assert answer.seq == 2
    finally:
        await second.channel.close(None)
        await second.server.stop(grace=1)


# ---- the command ----------------------------------------------------------------------------


def test_the_command_serves_until_sigterm_then_stops_cleanly(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "ONESEEK_DB_URL": "postgresql://must-not-be-used"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "metrics-service",
            f"--addr=127.0.0.1:{port}",
            f"--training-addr={DEAD_TRAINING_ADDR}",
            f"--db-url=sqlite:///{tmp_path / 'var' / 'metrics.db'}",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                timeout=20,
                wait_for_ready=True,
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "metrics service stopped" in output
    assert (tmp_path / "var" / "metrics.db").exists()


def test_the_command_refuses_postgresql_for_now(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["metrics-service", "--addr=127.0.0.1:0", "--db-url=postgresql://u:secret@db/metrics"]
    assert oneseek(argv) == 2
    printed = capsys.readouterr().err
    assert "PostgreSQL is not available yet" in printed and "secret" not in printed
