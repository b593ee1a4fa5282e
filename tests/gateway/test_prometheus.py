"""`GET /metrics` of the gateway, and `--metrics-port` of the gRPC services: the Prometheus text
format, parsed by prometheus-client's own parser, holding what the suite just did."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from tests.gateway.conftest import ADMIN, Suite, answer, start_run, wait_until
from tests.processes import ServiceProcess, free_port, workspace_env

pytestmark = pytest.mark.slow
Client = TestClient[web.Request, web.Application]
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample: (name, labels) -> value."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(parsed: dict[Any, float], name: str, **labels: str) -> float:
    return parsed.get((name, frozenset(labels.items())), 0.0)


async def scrape(gateway: Client) -> dict[Any, float]:
    response = await gateway.get("/metrics")
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    return samples(await response.text())


async def test_requests_websockets_and_grpc_calls_are_counted(
    gateway: Client, suite: Suite
) -> None:
    before = await scrape(gateway)
    for _ in range(3):
        await answer(await gateway.get("/api/config"), 200)
    refused = await gateway.get("/api/admin/models")  # no token
    assert refused.status == 401
    await answer(await gateway.get("/api/admin/models", headers=ADMIN_HEADERS), 200)
    after = await scrape(gateway)

    requests = "oneseek_gateway_http_requests_total"
    config = {"route": "/api/config", "method": "GET", "status": "200"}
    assert value(after, requests, **config) - value(before, requests, **config) == 3
    assert value(after, requests, route="/api/admin/models", method="GET", status="401") >= 1
    latency = "oneseek_gateway_http_request_seconds_count"
    assert value(after, latency, route="/api/config", method="GET") >= 3
    # the ListModels call went through the client timer
    calls = "oneseek_grpc_client_call_seconds_count"
    listed = {"service": "training service", "method": "ListModels", "outcome": "done"}
    assert value(after, calls, **listed) >= 1
    # a raw path is never a label: one run id per label would grow without end
    await gateway.get("/api/training/run-20200101-000000/metrics")
    labels = {dict(key[1]).get("route") for key in (await scrape(gateway))}
    assert "/api/training/{runId}/metrics" in labels
    assert not any(route and "run-2020" in route for route in labels)
    # the process collectors are there
    assert value(after, "process_resident_memory_bytes") > 0

    run_id = start_run(suite, epochs=2)
    async with gateway.session.ws_connect(gateway.make_url(f"/ws/training?runId={run_id}")) as ws:
        await wait_until(lambda: _connected(gateway, 1), timeout=30)
        # the events of the run reach the feed, once each
        await wait_until(lambda: _events_at_least(gateway, 3), timeout=180)
        await ws.close()
    await wait_until(lambda: _connected(gateway, 0), timeout=30)
    final = await scrape(gateway)
    assert value(final, "oneseek_gateway_websocket_sessions_total") >= 1
    assert value(final, "oneseek_gateway_websocket_session_seconds_count") >= 1


async def _connected(gateway: Client, count: int) -> bool:
    return value(await scrape(gateway), "oneseek_gateway_websocket_clients") == count


async def _events_at_least(gateway: Client, count: int) -> bool:
    return value(await scrape(gateway), "oneseek_gateway_events_total") >= count


async def test_active_runs_and_their_epoch_and_loss(gateway: Client, suite: Suite) -> None:
    run_id = start_run(suite, epochs=6)
    stub = suite.training_stub()
    try:

        async def trained_an_epoch() -> bool:
            parsed = await scrape(gateway)
            return value(parsed, "oneseek_run_current_epoch", run_id=run_id) >= 1

        await wait_until(trained_an_epoch, timeout=180)
        parsed = await scrape(gateway)
        assert value(parsed, "oneseek_active_runs") == 1
        metrics = await answer(await gateway.get(f"/api/training/{run_id}/metrics"), 200)
        loss = value(parsed, "oneseek_run_population_loss", run_id=run_id)
        assert loss > 0
        assert any(epoch["total_loss"] == loss for epoch in metrics["training_history"])
    finally:
        stub.StopRun(
            training_pb2.StopRunRequest(run_id=run_id),
            metadata=(("authorization", f"Bearer {ADMIN}"),),
            timeout=60,
        )

    async def ended() -> bool:
        return value(await scrape(gateway), "oneseek_active_runs") == 0

    await wait_until(ended, timeout=120)
    assert (
        "oneseek_run_current_epoch",
        frozenset({("run_id", run_id)}),
    ) not in await scrape(gateway)  # a run that ended leaves the gauges


async def test_metrics_need_the_token_off_loopback(make_gateway: Any) -> None:
    gateway = await make_gateway(host="0.0.0.0")
    refused = await gateway.get("/metrics")
    assert refused.status == 401
    allowed = await gateway.get("/metrics", headers=ADMIN_HEADERS)
    assert allowed.status == 200


def test_the_grpc_services_serve_their_own(tmp_path: Path, demo_models_dir: Path) -> None:
    port = free_port()
    env = workspace_env(tmp_path / "own", demo_models_dir, ONESEEK_ADMIN_TOKEN=ADMIN)
    training = ServiceProcess(
        "training-service", "--metrics-port", str(port), env=env, log=tmp_path / "t.log"
    ).start()
    try:
        with grpc.insecure_channel(training.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            for _ in range(4):
                stub.ListRuns(training_pb2.ListRunsRequest(), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.GetRun(training_pb2.GetRunRequest(run_id="nonsense"), timeout=10)
            with pytest.raises(grpc.RpcError):  # refused by the token check: counted too
                stub.StopRun(training_pb2.StopRunRequest(run_id="run-20200101-000000"))
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            parsed = samples(reply.read().decode())
        service = "oneseek.training.v1.TrainingService"
        handled = "oneseek_grpc_server_handled_total"
        assert value(parsed, handled, service=service, method="ListRuns", code="OK") == 4
        assert (
            value(parsed, handled, service=service, method="GetRun", code="INVALID_ARGUMENT") == 1
        )
        assert (
            value(parsed, handled, service=service, method="StopRun", code="UNAUTHENTICATED") == 1
        )
        assert value(parsed, "oneseek_training_active_runs") == 0
        assert ("oneseek_training_events_total", frozenset()) in parsed
        assert value(parsed, "process_resident_memory_bytes") > 0

        metrics_port = free_port()
        metrics = ServiceProcess(
            "metrics-service",
            "--training-addr",
            training.addr,
            "--metrics-port",
            str(metrics_port),
            env=env,
            log=tmp_path / "m.log",
        ).start()
        try:
            with grpc.insecure_channel(metrics.addr) as channel:
                metrics_stub = metrics_pb2_grpc.MetricsServiceStub(channel)
                metrics_stub.ListRuns(metrics_pb2.ListRunsRequest(), timeout=10)
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                parsed = samples(reply.read().decode())
            listed = {"service": "oneseek.metrics.v1.MetricsService", "method": "ListRuns"}
            assert value(parsed, handled, **listed, code="OK") == 1
            # the committed cursor of the training stream it follows
            assert ("oneseek_metrics_followed_events_total", frozenset()) in parsed
        finally:
            assert metrics.stop() == 0, metrics.output()
    finally:
        assert training.stop() == 0, training.output()
