"""`kill -9` of the metrics service, and of the gateway, each in the middle of a real run (one
tiny model, six short epochs), with the three processes on loopback.

Metrics service killed: the gateway keeps answering (/healthz 503 `degraded` naming it, 503 with
the error envelope on the metrics routes, its own routes as usual), the training service keeps
training, and once the metrics service is back (same address, same database) the gateway
recovers by itself. A websocket client that stayed connected, and one that left during the
outage and resumes with `since`, each end with the run's complete event sequence: equal, event
for event, to the training service's own log, no gap, no duplicate.

Gateway killed: the services keep answering (the run goes on and the metrics service follows
it); a client resumes with `since` on the restarted gateway and ends with the complete sequence.

Either way the run ends `completed`.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.api.codec import event_to_dict
from tests.processes import GatewayProcess, ServiceProcess, workspace_env

pytestmark = pytest.mark.slow

EPOCHS = 6
Event = dict[str, Any]


@dataclass
class Suite:
    env: dict[str, str]
    root: Path
    training: ServiceProcess
    metrics: ServiceProcess | None = None
    gateway: GatewayProcess | None = None

    def training_stub(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(grpc.insecure_channel(self.training.addr))

    def metrics_stub(self) -> metrics_pb2_grpc.MetricsServiceStub:
        assert self.metrics is not None
        return metrics_pb2_grpc.MetricsServiceStub(grpc.insecure_channel(self.metrics.addr))

    def start_metrics(self, log: str, same_as: ServiceProcess | None = None) -> ServiceProcess:
        db = f"sqlite:///{self.root / 'metrics.db'}"
        args = ("--training-addr", self.training.addr, "--db-url", db)
        metrics = ServiceProcess("metrics-service", *args, env=self.env, log=self.root / log)
        if same_as is not None:  # a restart: same address
            metrics.port, metrics.addr = same_as.port, same_as.addr
        self.metrics = metrics.start()
        return metrics

    def start_gateway(self, log: str, same_as: GatewayProcess | None = None) -> GatewayProcess:
        assert self.metrics is not None
        env = {
            **self.env,
            "ONESEEK_TRAINING_ADDR": self.training.addr,
            "ONESEEK_METRICS_ADDR": self.metrics.addr,
        }
        gateway = GatewayProcess(env, self.root / log)
        if same_as is not None:
            gateway.port, gateway.url = same_as.port, same_as.url
        self.gateway = gateway.start()
        return gateway

    def ws_url(self, run_id: str, since: int | None = None) -> str:
        assert self.gateway is not None
        url = f"{self.gateway.url.replace('http', 'ws', 1)}/ws/training?runId={run_id}"
        return url if since is None else f"{url}&since={since}"


@pytest.fixture(scope="module")
def training(
    tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path
) -> Iterator[tuple[ServiceProcess, dict[str, str]]]:
    root = tmp_path_factory.mktemp("services-faults")
    env = workspace_env(root / "work", demo_models_dir, records=30)
    service = ServiceProcess("training-service", env=env, log=root / "training.log").start()
    yield service, env
    assert service.stop() == 0, service.output()


@pytest.fixture
def suite(training: tuple[ServiceProcess, dict[str, str]], tmp_path: Path) -> Iterator[Suite]:
    """The training service (shared), and a metrics service and a gateway of this test's own;
    whatever is running at the end must stop cleanly."""
    service, env = training
    parts = Suite(env=env, root=tmp_path, training=service)
    parts.start_metrics("metrics.log")
    parts.start_gateway("gateway.log")
    yield parts
    codes = {}
    for name, part in (("gateway", parts.gateway), ("metrics", parts.metrics)):
        if part is not None and part.process is not None and part.process.poll() is None:
            codes[name] = part.stop()
    assert all(code == 0 for code in codes.values()), codes


def start_run(suite: Suite) -> str:
    request = training_pb2.StartRunRequest(
        dataset_id="small",
        base_models=["tiny-gpt2"],
        epochs=EPOCHS,
        batch_size=8,
        max_seq_length=32,
        refresh_interval=0.05,
        auto_stop_threshold=0.0,
    )
    stub = suite.training_stub()
    deadline = time.monotonic() + 120
    while True:  # the previous test's worker may still be finishing
        try:
            return str(stub.StartRun(request, timeout=30).run_id)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            assert time.monotonic() < deadline, "the training service stayed busy"
            time.sleep(0.1)


def truth(suite: Suite, run_id: str) -> list[Event]:
    """The training service's own log of the run, to its end."""
    stream = suite.training_stub().WatchRun(
        training_pb2.WatchRunRequest(run_id=run_id), timeout=240
    )
    return [event_to_dict(event) for event in stream]


def wait_epoch_end_after(suite: Suite, run_id: str, seq: int) -> Event:
    """The training service's next epoch_end (or end of the run) after `seq`."""
    stream = suite.training_stub().WatchRun(
        training_pb2.WatchRunRequest(run_id=run_id, after_seq=seq), timeout=120
    )
    for event in stream:
        if event.WhichOneof("payload") in ("epoch_end", "training_complete", "training_error"):
            stream.cancel()
            return event_to_dict(event)
    raise AssertionError(f"{run_id} sent nothing after seq {seq}")


def http(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


class Client:
    """A websocket client of the feed: its initial_state seq and every event after it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, since: int | None = None) -> None:
        self.ws = ws
        self.first_seq = since
        self.events: list[Event] = []

    @property
    def last_seq(self) -> int:
        assert self.first_seq is not None
        return self.events[-1]["seq"] if self.events else self.first_seq

    async def read(self, until: Callable[[Event], bool], timeout: float = 180) -> None:
        """Reads until an event satisfies `until`; AssertionError if the socket closes first."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.ws.receive()
                assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data)
                event = json.loads(message.data)
                if event["type"] == "heartbeat":
                    continue
                if event["type"] == "initial_state":
                    assert self.first_seq is None, "initial_state after a since"
                    self.first_seq = event["seq"]
                    continue
                self.events.append(event)
                if until(event):
                    return


def ended(event: Event) -> bool:
    return event["type"] in ("training_complete", "training_error")


def complete_after(events: list[Event], log: list[Event], since: int) -> None:
    """`events` are exactly the run's events after `since`: no gap, no duplicate, same content."""
    assert [e["seq"] for e in events] == list(range(since + 1, len(log) + 1))
    assert events == log[since:]


# ---- the metrics service dies -------------------------------------------------------------------


async def test_metrics_service_killed_mid_run(suite: Suite) -> None:
    run_id = await asyncio.to_thread(start_run, suite)
    assert suite.gateway is not None and suite.metrics is not None
    base = suite.gateway.url
    async with aiohttp.ClientSession() as session:
        stays = Client(await session.ws_connect(suite.ws_url(run_id)))
        leaves = Client(await session.ws_connect(suite.ws_url(run_id)))
        for client in (stays, leaves):
            await client.read(lambda e: e["type"] == "epoch_end")

        killed = suite.metrics
        killed.kill()  # SIGKILL, mid-run
        await leaves.ws.close()  # a page closed during the outage; it comes back with since

        # the survivors keep answering
        status, health = await asyncio.to_thread(http, f"{base}/healthz")
        assert status == 503
        assert health == {"status": "degraded", "training": True, "metrics": False}
        status, error = await asyncio.to_thread(http, f"{base}/api/training/{run_id}/metrics")
        assert status == 503 and error["error"] == "service_unavailable"
        assert "metrics service" in error["message"] and "try again" in error["message"]

        def leaderboard_refused() -> bool:  # once the gateway's feed has seen its stream break
            return http(f"{base}/api/training/{run_id}/leaderboard")[0] == 503

        await asyncio.to_thread(wait_for, leaderboard_refused, "leaderboard 503", 10)
        assert (await asyncio.to_thread(http, f"{base}/api/config"))[0] == 200
        status, models = await asyncio.to_thread(http, f"{base}/api/admin/models")
        assert status == 200 and models["models"]
        # ... and the run goes on without the metrics service
        later = await asyncio.to_thread(wait_epoch_end_after, suite, run_id, stays.last_seq)
        assert later["seq"] > stays.last_seq

        await asyncio.to_thread(suite.start_metrics, "metrics-restarted.log", killed)

        def recovered() -> bool:  # by itself: nothing restarts the gateway
            return http(f"{base}/healthz")[0] == 200

        await asyncio.to_thread(wait_for, recovered, "the gateway's recovery", 30)

        log = await asyncio.to_thread(truth, suite, run_id)
        assert log[-1]["type"] == "training_complete" and log[-1]["status"] == "completed"
        await stays.read(ended)
        assert not stays.ws.closed
        complete_after(stays.events, log, stays.first_seq or 0)

        back = Client(
            await session.ws_connect(suite.ws_url(run_id, leaves.last_seq)), leaves.last_seq
        )
        await back.read(ended)
        complete_after(leaves.events + back.events, log, leaves.first_seq or 0)

    def finished() -> bool:
        code, metrics = http(f"{base}/api/training/{run_id}/metrics")
        return code == 200 and metrics["status"] == "completed"

    await asyncio.to_thread(wait_for, finished, "status completed through the gateway", 30)
    history = http(f"{base}/api/training/{run_id}/metrics")[1]["training_history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    print(f"metrics killed at seq {leaves.last_seq} of {len(log)}: 0 lost, 0 duplicated")


# ---- the gateway dies ---------------------------------------------------------------------------


async def test_gateway_killed_mid_run(suite: Suite) -> None:
    run_id = await asyncio.to_thread(start_run, suite)
    assert suite.gateway is not None
    async with aiohttp.ClientSession() as session:
        before = Client(await session.ws_connect(suite.ws_url(run_id)))
        await before.read(lambda e: e["type"] == "epoch_end")

        killed = suite.gateway
        killed.kill()  # SIGKILL, mid-run
        while (message := await before.ws.receive(timeout=30)).type == aiohttp.WSMsgType.TEXT:
            event = json.loads(message.data)  # already on its way: the resume starts after it
            if event["type"] != "heartbeat":
                before.events.append(event)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message

        # the services keep answering and the run goes on
        later = await asyncio.to_thread(wait_epoch_end_after, suite, run_id, before.last_seq)
        assert later["seq"] > before.last_seq
        metrics = suite.metrics_stub().GetMetrics(
            metrics_pb2.GetMetricsRequest(run_id=run_id), timeout=10
        )
        assert metrics.run_id == run_id and metrics.current_epoch >= 1

        await asyncio.to_thread(suite.start_gateway, "gateway-restarted.log", killed)
        since = before.last_seq
        after = Client(await session.ws_connect(suite.ws_url(run_id, since)), since)
        await after.read(ended)

    log = await asyncio.to_thread(truth, suite, run_id)
    assert log[-1]["type"] == "training_complete" and log[-1]["status"] == "completed"
    complete_after(before.events + after.events, log, before.first_seq or 0)
    status, final = await asyncio.to_thread(
        http, f"{suite.gateway.url}/api/training/{run_id}/metrics"
    )
    assert status == 200 and final["status"] == "completed"
    print(f"gateway killed at seq {since} of {len(log)}: 0 lost, 0 duplicated")
