"""The follower against an in-test TrainingService (a real grpc.aio server on a free port) that
streams prepared events, breaks streams mid-way and restarts: every event is stored exactly once,
and the follower's own restart resumes from the committed cursor."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio

from services.api import training_pb2, training_pb2_grpc
from services.metrics.catalog import RunCatalog
from services.metrics.fanout import EventFanout
from services.metrics.follower import TrainingFollower
from services.metrics.sqlite_store import SQLiteStore
from tests.metrics.sample_run import run_events, run_message, three_epochs

RUN_A = "run-20260131-142500"
RUN_B = "run-20260131-150000"


class FakeTraining(training_pb2_grpc.TrainingServiceServicer):
    """Serves a growing global event log; `cut_after` ends each stream with UNAVAILABLE after
    that many messages, as a crashing service would."""

    def __init__(self) -> None:
        self.log: list[training_pb2.TrainingEvent] = []
        self.runs: dict[str, training_pb2.Run] = {}
        self.cut_after: int | None = None
        self.requests: list[int] = []
        self.get_run_calls: list[str] = []
        self._grew = asyncio.Condition()

    async def add(self, events: list[training_pb2.TrainingEvent]) -> None:
        for event in events:
            copy = training_pb2.TrainingEvent()
            copy.CopyFrom(event)
            copy.cursor = len(self.log) + 1
            self.log.append(copy)
        async with self._grew:
            self._grew.notify_all()

    def _has_more(self, position: int) -> bool:
        return position < len(self.log)

    async def GetRun(self, request: training_pb2.GetRunRequest, context: Any) -> training_pb2.Run:
        self.get_run_calls.append(request.run_id)
        if request.run_id not in self.runs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id}")
        return self.runs[request.run_id]

    async def StreamEvents(
        self, request: training_pb2.StreamEventsRequest, context: Any
    ) -> AsyncIterator[training_pb2.TrainingEvent]:
        self.requests.append(request.after_cursor)
        position, sent = request.after_cursor, 0
        while True:
            while position < len(self.log):
                if self.cut_after is not None and sent >= self.cut_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker crashed")
                yield self.log[position]
                position += 1
                sent += 1
            async with self._grew:
                await self._grew.wait_for(functools.partial(self._has_more, position))


class FakeServer:
    """The fake on a fixed port, so it can be stopped and started again at the same address."""

    def __init__(self, servicer: FakeTraining) -> None:
        self.servicer = servicer
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server: aio.Server | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = aio.server()
        training_pb2_grpc.add_TrainingServiceServicer_to_server(self.servicer, self.server)
        assert self.server.add_insecure_port(self.addr) == self.port
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace=None)
            self.server = None


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


class Follower:
    """Store + catalog + follower task, as the metrics service wires them."""

    def __init__(self, path: Path, addr: str) -> None:
        self.path, self.addr = path, addr

    async def start(self) -> None:
        self.store = SQLiteStore(self.path)
        await self.store.open()
        self.fanout = EventFanout()
        self.catalog = RunCatalog(self.store, self.fanout)
        await self.catalog.load()
        self.follower = TrainingFollower(
            self.addr, self.catalog, backoff_initial=0.02, backoff_max=0.2
        )
        self.catalog.lookup = self.follower.lookup_run
        self.task = asyncio.create_task(self.follower.run())

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.follower.close()
        await self.store.close()

    async def stored(self, count: int) -> bool:
        return await self.store.cursor() >= count


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = FakeServer(FakeTraining())  # type: ignore[abstract]
    await server.start()
    yield server
    await server.stop()


async def test_every_event_is_stored_once_across_both_sides_restarting(
    fake: FakeServer, tmp_path: Path
) -> None:
    training = fake.servicer
    run_a = run_events(three_epochs(), run_id=RUN_A)
    run_b = run_events(three_epochs()[:2], run_id=RUN_B, ending="failed")
    training.runs[RUN_A] = run_message(RUN_A)
    training.runs[RUN_B] = run_message(RUN_B)
    await training.add(run_a[:10])

    metrics = Follower(tmp_path / "metrics.db", fake.addr)
    await metrics.start()
    live = metrics.fanout.subscribe(RUN_A)
    await wait_until(lambda: metrics.stored(10))

    # the training service dies and comes back with more events
    await fake.stop()
    await training.add(run_a[10:15])
    await fake.start()
    await wait_until(lambda: metrics.stored(15))

    # streams now break every 4 messages, mid-replay: each reconnect resumes at the cursor
    training.cut_after = 4
    await training.add(run_a[15:] + run_b[:6])
    await wait_until(lambda: metrics.stored(len(run_a) + 6))

    # the metrics side restarts too, while events keep coming
    await metrics.stop()
    await training.add(run_b[6:])
    training.cut_after = None
    metrics = Follower(tmp_path / "metrics.db", fake.addr)
    await metrics.start()
    await wait_until(lambda: metrics.stored(len(run_a) + len(run_b)))

    for run_id, events in ((RUN_A, run_a), (RUN_B, run_b)):
        stored = await metrics.store.events(run_id)
        assert [e.seq for e in stored] == [e.seq for e in events]
        assert [e.WhichOneof("payload") for e in stored] == [
            e.WhichOneof("payload") for e in events
        ]
    assert training.get_run_calls.count(RUN_A) == 1  # once per new run, not per batch
    assert training.get_run_calls.count(RUN_B) == 1
    # each reconnect asked for exactly what was not committed yet
    assert training.requests[0] == 0 and all(r > 0 for r in training.requests[1:])
    assert len(training.requests) > 5  # the cut streams really were resumed
    assert training.requests == sorted(training.requests)
    assert max(training.requests) <= len(run_a) + len(run_b)

    record_a, record_b = await metrics.store.run(RUN_A), await metrics.store.run(RUN_B)
    assert record_a is not None and record_a.status == "completed"
    assert record_a.run_config() == run_message(RUN_A).config
    assert record_b is not None and record_b.status == "failed"
    state = await metrics.catalog.state(RUN_B)
    assert state is not None and state.status == "failed" and state.current_epoch == 2

    # the first incarnation's subscriber saw run A's events live, in order, once each
    seen = []
    for _ in run_a:
        event = await asyncio.wait_for(live.next(), 1)
        assert event is not None
        seen.append(event.seq)
    assert seen == list(range(1, len(run_a) + 1))
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(live.next(), 0.05)
    await metrics.stop()


async def test_a_run_whose_config_cannot_be_fetched_is_still_followed(
    fake: FakeServer, tmp_path: Path
) -> None:
    events = run_events(three_epochs()[:1], run_id=RUN_A, ending="running")
    await fake.servicer.add(events)  # GetRun answers NOT_FOUND for it
    metrics = Follower(tmp_path / "metrics.db", fake.addr)
    await metrics.start()
    try:
        await wait_until(lambda: metrics.stored(len(events)))
        state = await metrics.catalog.state(RUN_A)
        assert state is not None
        # learned from its epoch_start: models and total epochs
        assert sorted(state.names) == sorted(run_message().config.base_models)
        assert state.total_epochs == 3 and state.current_epoch == 1
    finally:
        await metrics.stop()


async def test_the_follower_keeps_retrying_while_the_training_service_is_down(
    tmp_path: Path,
) -> None:
    servicer = FakeTraining()  # type: ignore[abstract]
    down = FakeServer(servicer)  # not started yet
    metrics = Follower(tmp_path / "metrics.db", down.addr)
    await metrics.start()
    try:
        await asyncio.sleep(0.3)  # several failed attempts, backoff capped at 0.2 s
        assert not metrics.task.done()
        await servicer.add(run_events(three_epochs()[:1], run_id=RUN_A, ending="running"))
        await down.start()
        await wait_until(lambda: metrics.stored(1))
    finally:
        await metrics.stop()
        await down.stop()
