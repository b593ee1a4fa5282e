"""The websocket feed against the real training and metrics services:
close codes, initial_state first, exact `since` replay, a full run's feed equal to the training
service's own event log and to GET …/metrics, slow clients dropped alone, heartbeats, shutdown,
and a metrics-service restart that loses nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from gateway.app import FEEDS
from gateway.settings import GatewaySettings
from services.api import training_pb2
from services.api.codec import event_to_dict
from tests.gateway.conftest import (
    ADMIN,
    REPORT_HEADERS,
    GatewayFactory,
    Suite,
    answer,
    component,
    start_run,
    wait_until,
)
from tests.processes import ServiceProcess

pytestmark = pytest.mark.slow
Client = TestClient[web.Request, web.Application]
Socket = aiohttp.ClientWebSocketResponse
TERMINAL = ("training_complete", "training_error")
MESSAGE = component("WebSocketMessage")


async def next_message(ws: Socket, timeout: float = 60) -> dict[str, Any]:
    """The next message that is not a heartbeat, validated against the OpenAPI schema."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        message = await ws.receive(max(deadline - loop.time(), 0.001))
        assert message.type == WSMsgType.TEXT, (message.type, message.data, message.extra)
        data: dict[str, Any] = json.loads(message.data)
        MESSAGE.validate(data)
        if data["type"] != "heartbeat":
            return data


async def collect(
    ws: Socket, until: Callable[[dict[str, Any]], bool], timeout: float = 180
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not seen or not until(seen[-1]):
        left = deadline - asyncio.get_running_loop().time()
        seen.append(await next_message(ws, timeout=max(left, 0.01)))
    return seen


async def closed_with(ws: Socket, timeout: float = 30) -> tuple[int | None, list[dict[str, Any]]]:
    """Reads until the server closes; returns its close code and the messages before it."""
    messages: list[dict[str, Any]] = []
    while True:
        message = await ws.receive(timeout)
        if message.type == WSMsgType.CLOSE:
            return int(message.data), messages  # the code the server sent
        if message.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
            return ws.close_code, messages
        assert message.type == WSMsgType.TEXT, message
        messages.append(json.loads(message.data))


def watch(suite: Suite, run_id: str) -> list[dict[str, Any]]:
    """The training service's own record of the run: its WatchRun stream to the end."""
    stub = suite.training_stub()
    request = training_pb2.WatchRunRequest(run_id=run_id)
    return [event_to_dict(e) for e in stub.WatchRun(request, timeout=180)]


def payload(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("type", "run_id", "seq", "timestamp")}


def feed_path(run_id: str, since: int | None = None) -> str:
    return f"/ws/training?runId={run_id}" + ("" if since is None else f"&since={since}")


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?runId=", "?since=3"])
async def test_no_run_id_closes_1008(gateway: Client, query: str) -> None:
    ws = await gateway.ws_connect("/ws/training" + query)
    code, messages = await closed_with(ws)
    assert code == 1008 and messages == []


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("runId=run-1:2", "bad_request"),
        ("runId=..%2F..%2Fetc", "bad_request"),
        ("runId=run-20000101-000000", "not_found"),
        ("runId=run-20000101-000000&since=-1", "bad_request"),
        ("runId=run-20000101-000000&since=two", "bad_request"),
    ],
)
async def test_bad_or_unknown_run_gets_one_error_then_1008(
    gateway: Client, query: str, error: str
) -> None:
    ws = await gateway.ws_connect("/ws/training?" + query)
    code, messages = await closed_with(ws)
    assert code == 1008
    assert len(messages) == 1, messages
    MESSAGE.validate(messages[0])
    assert messages[0]["type"] == "error" and messages[0]["error"] == error
    assert messages[0]["message"]


async def test_websocket_auth_off_loopback(make_gateway: GatewayFactory, finished_run: str) -> None:
    gateway = await make_gateway(host="0.0.0.0")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(feed_path(finished_run))
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await gateway.ws_connect(feed_path(finished_run) + "&token=wrong")
    ws = await gateway.ws_connect(feed_path(finished_run) + f"&token={ADMIN}")
    assert (await next_message(ws))["type"] == "initial_state"
    header = await gateway.ws_connect(
        feed_path(finished_run), headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert (await next_message(header))["type"] == "initial_state"
    # another site's page, even with the token in hand, cannot read the feed
    with pytest.raises(aiohttp.WSServerHandshakeError) as cross:
        await gateway.ws_connect(
            feed_path(finished_run) + f"&token={ADMIN}", headers={"Origin": "https://evil.example"}
        )
    assert cross.value.status == 403


# ---- a whole run --------------------------------------------------------------------------------


async def test_a_full_run_is_fed_exactly(gateway: Client, suite: Suite) -> None:
    run_id = await asyncio.to_thread(start_run, suite, 3)
    live = await gateway.ws_connect(feed_path(run_id))
    first = await next_message(live)
    assert first["type"] == "initial_state" and first["run_id"] == run_id
    assert first["config"]["base_models"] == ["tiny-llama", "tiny-gpt2"]
    assert [m["name"] for m in first["models"]] == ["tiny-llama", "tiny-gpt2"]
    events = await collect(live, lambda e: e["type"] in TERMINAL)
    assert events[-1]["type"] == "training_complete" and events[-1]["status"] == "completed"

    # every event after the snapshot, in seq order, no gap, no duplicate: the service's own log
    truth = await asyncio.to_thread(watch, suite, run_id)
    assert [e["seq"] for e in truth] == list(range(1, len(truth) + 1))
    assert events == truth[first["seq"] :]
    # ... and the snapshot is the fold of everything before it
    before = [payload(e) for e in truth[: first["seq"]] if e["type"] == "epoch_end"]
    assert first["training_history"] == before

    # the websocket's epoch_ends are GET …/metrics' training_history, event for event
    metrics = await answer(await gateway.get(f"/api/training/{run_id}/metrics"), 200)
    fed = first["training_history"] + [payload(e) for e in events if e["type"] == "epoch_end"]
    assert fed == metrics["training_history"]
    assert [h["epoch"] for h in fed] == [1, 2, 3]

    # a late client's initial_state is GET …/metrics plus config and models
    late = await gateway.ws_connect(feed_path(run_id))
    snapshot = await next_message(late)
    assert snapshot["seq"] == len(truth)
    assert {k: snapshot[k] for k in metrics if k != "run_id"} == {
        k: v for k, v in metrics.items() if k != "run_id"
    }

    # a page that reconnects with since gets exactly the rest, whatever since is
    for since in (0, 1, len(truth) // 2, len(truth) - 1, len(truth)):
        again = await gateway.ws_connect(feed_path(run_id, since))
        rest = [await next_message(again) for _ in range(len(truth) - since)]
        assert rest == truth[since:]
        with pytest.raises(asyncio.TimeoutError):  # nothing more but heartbeats
            await next_message(again, timeout=0.6)
        await again.close()

    # a since beyond the feed's last seq waits for that seq instead of replaying anything
    ahead = await gateway.ws_connect(feed_path(run_id, len(truth) + 5))
    with pytest.raises(asyncio.TimeoutError):
        await next_message(ahead, timeout=0.6)


async def test_clients_of_a_run_share_one_feed_and_it_is_retired(
    gateway: Client, finished_run: str
) -> None:
    sockets = [await gateway.ws_connect(feed_path(finished_run)) for _ in range(20)]
    firsts = [await next_message(ws) for ws in sockets]
    assert all(f == firsts[0] for f in firsts) and firsts[0]["type"] == "initial_state"
    feeds = gateway.app[FEEDS].feeds
    assert list(feeds) == [finished_run]
    assert len(feeds[finished_run].subscribers) == 20
    for ws in sockets:
        await ws.close()

    async def retired() -> bool:
        return finished_run not in gateway.app[FEEDS].feeds

    await wait_until(retired, timeout=10)


async def test_heartbeats(gateway: Client, finished_run: str) -> None:
    ws = await gateway.ws_connect(feed_path(finished_run))
    first = await next_message(ws)
    beats: list[dict[str, Any]] = []
    while len(beats) < 2:
        message = json.loads((await ws.receive(5)).data)
        MESSAGE.validate(message)
        assert message["type"] == "heartbeat"
        beats.append(message)
    assert all(b["seq"] == first["seq"] and b["run_id"] == finished_run for b in beats)


async def test_shutdown_closes_clients_with_1001(
    make_gateway: GatewayFactory, finished_run: str
) -> None:
    gateway = await make_gateway()
    sockets = [await gateway.ws_connect(feed_path(finished_run)) for _ in range(3)]
    for ws in sockets:
        await next_message(ws)
    await gateway.server.close()  # the server only: the client session keeps its sockets
    for ws in sockets:
        code, _ = await closed_with(ws)
        assert code == 1001


# ---- slow clients -------------------------------------------------------------------------------


def big_report(epoch: int) -> dict[str, Any]:
    """About 50 KB as an epoch_end event: a slow reader falls behind within a few MB."""
    names = [f"model-{i:03d}-" + "x" * 100 for i in range(100)]
    return {
        "epoch": epoch,
        "val_losses": {n: 1.0 + i / 100 + 1 / epoch for i, n in enumerate(names)},
        "train_losses": {n: 2.0 + i / 100 for i, n in enumerate(names)},
        "weights": {n: 1.0 for n in names},
        "lr_multipliers": {n: 1e-4 for n in names},
    }


async def test_a_slow_client_is_dropped_and_the_others_get_everything(
    make_gateway: GatewayFactory,
) -> None:
    gateway = await make_gateway(client_queue_size=8, client_send_buffer=64 * 1024)
    run_id = "run-20030303-000001"
    path = f"/api/training/{run_id}/metrics"
    first = await gateway.post(path, json=big_report(1), headers=REPORT_HEADERS)
    assert first.status == 200
    normal = await gateway.ws_connect(feed_path(run_id))
    slow = await gateway.ws_connect(feed_path(run_id))  # never reads until the end
    assert (await next_message(normal))["seq"] == 1
    reports = 150

    received: list[dict[str, Any]] = []
    progress = asyncio.Condition()

    def behind(epoch: int) -> int:
        return epoch - (received[-1]["seq"] if received else 1)

    async def pump() -> None:
        for epoch in range(2, reports + 1):
            # the normal client is this test's own code on a possibly busy machine: keep it
            # within a few events (the limit is 8), so only the client that never reads lags
            async with progress:
                await progress.wait_for(lambda e=epoch: behind(e) <= 3)
            response = await gateway.post(path, json=big_report(epoch), headers=REPORT_HEADERS)
            assert response.status == 200, await response.text()

    async def read() -> None:
        while not received or received[-1]["seq"] < reports:
            event = await next_message(normal, timeout=120)
            async with progress:
                received.append(event)
                progress.notify_all()

    await asyncio.gather(pump(), read())
    assert [e["seq"] for e in received] == list(range(2, reports + 1))
    assert [e["epoch"] for e in received] == list(range(2, reports + 1))

    code, messages = await closed_with(slow, timeout=30)
    assert code == 1013
    # what it got before being dropped is an exact prefix: it reconnects with since
    assert messages[0]["type"] == "initial_state"
    got = [m["seq"] for m in messages[1:] if m["type"] != "heartbeat"]
    assert got == list(range(2, 2 + len(got))) and len(got) < reports - 1
    resumed = await gateway.ws_connect(feed_path(run_id, got[-1] if got else 1))
    rest = [await next_message(resumed) for _ in range(reports - 1 - len(got))]
    assert [e["seq"] for e in rest] == list(range(2 + len(got), reports + 1))
    assert not normal.closed


# ---- the metrics service restarts ---------------------------------------------------------------


async def test_a_metrics_restart_loses_nothing(
    make_gateway: GatewayFactory, suite: Suite, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'own-metrics.db'}"
    args = ("--training-addr", suite.training.addr, "--db-url", db)
    metrics = ServiceProcess("metrics-service", *args, env=suite.env, log=tmp_path / "m1.log")
    await asyncio.to_thread(metrics.start)
    gateway = await make_gateway(metrics_addr=metrics.addr)
    run_id = "run-20040404-000001"
    path = f"/api/training/{run_id}/metrics"

    async def report(epoch: int) -> int:
        body = {"epoch": epoch, "val_losses": {"a": 3.0 - epoch / 10, "b": 3.0}}
        response = await gateway.post(path, json=body, headers=REPORT_HEADERS)
        return response.status

    try:
        for epoch in (1, 2):
            assert await report(epoch) == 200
        ws = await gateway.ws_connect(feed_path(run_id))
        assert (await next_message(ws))["seq"] == 2
        assert await report(3) == 200
        assert (await next_message(ws))["seq"] == 3

        assert await asyncio.to_thread(metrics.stop) == 0
        down = await gateway.post(
            path, json={"epoch": 4, "val_losses": {"a": 1.0}}, headers=REPORT_HEADERS
        )
        assert (await answer(down, 503))["error"] == "service_unavailable"

        again = ServiceProcess("metrics-service", *args, env=suite.env, log=tmp_path / "m2.log")
        again.port, again.addr = metrics.port, metrics.addr
        metrics = again
        await asyncio.to_thread(metrics.start)

        async def recovered() -> bool:
            return await report(4) == 200

        await wait_until(recovered, timeout=30)
        assert await report(5) == 200
        after = [await next_message(ws) for _ in range(2)]
        assert [e["seq"] for e in after] == [4, 5]
        assert [e["epoch"] for e in after] == [4, 5]
        assert not ws.closed
    finally:
        if metrics.process is not None and metrics.process.poll() is None:
            await asyncio.to_thread(metrics.stop)


async def test_unavailable_metrics_service_is_1013(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(metrics_addr="127.0.0.1:9")
    ws = await gateway.ws_connect(feed_path("run-20000101-000000"))
    code, messages = await closed_with(ws)
    assert code == 1013
    assert messages[0]["error"] == "service_unavailable"


# ---- one address, many sockets ------------------------------------------------------------------


async def test_one_address_holds_at_most_ws_max_per_ip_sockets(
    make_gateway: GatewayFactory, finished_run: str
) -> None:
    gateway = await make_gateway(ws_max_per_ip=3)
    held = [await gateway.ws_connect(feed_path(finished_run)) for _ in range(3)]
    for ws in held:
        assert (await next_message(ws))["type"] == "initial_state"
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await gateway.ws_connect(feed_path(finished_run))
    assert refused.value.status == 429
    # refused before the upgrade, with the JSON envelope and when to come back
    plain = await gateway.get(feed_path(finished_run))
    body = await answer(plain, 429)
    assert body["error"] == "too_many_requests" and "3 websockets" in body["message"]
    assert int(plain.headers["Retry-After"]) > 0
    # a refused socket holds nothing; a closed one frees its place
    await held.pop().close()

    async def admitted() -> bool:
        try:
            ws = await gateway.ws_connect(feed_path(finished_run))
        except aiohttp.WSServerHandshakeError as error:
            assert error.status == 429
            return False
        held.append(ws)
        return True

    await wait_until(admitted, timeout=10)
    assert (await next_message(held[-1]))["type"] == "initial_state"
    for ws in held:
        await ws.close()


async def test_ws_max_per_ip_zero_is_no_limit(
    make_gateway: GatewayFactory, finished_run: str
) -> None:
    gateway = await make_gateway(ws_max_per_ip=0)
    sockets = [await gateway.ws_connect(feed_path(finished_run)) for _ in range(70)]
    firsts = [await next_message(ws) for ws in sockets]  # more than the default 64
    assert all(first["type"] == "initial_state" for first in firsts)
    for ws in sockets:
        await ws.close()


def test_ws_max_per_ip_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ONESEEK_WS_MAX_PER_IP", raising=False)
    assert GatewaySettings.from_env().ws_max_per_ip == 64
    monkeypatch.setenv("ONESEEK_WS_MAX_PER_IP", "2500")
    assert GatewaySettings.from_env().ws_max_per_ip == 2500
    monkeypatch.setenv("ONESEEK_WS_MAX_PER_IP", "0")
    assert GatewaySettings.from_env().ws_max_per_ip == 0
    for bad in ("-1", "ten", "1e3"):
        monkeypatch.setenv("ONESEEK_WS_MAX_PER_IP", bad)
        with pytest.raises(ValueError, match="ONESEEK_WS_MAX_PER_IP"):
            GatewaySettings.from_env()
