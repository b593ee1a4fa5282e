"""Live fan-out: bounded per-subscriber queues, dropping only the slow one, clean close."""

from __future__ import annotations

import asyncio

import pytest

from services.api import training_pb2
from services.metrics.fanout import EventFanout, SubscriberTooSlow

RUN = "run-20260131-142500"


def event(seq: int, run_id: str = RUN) -> training_pb2.TrainingEvent:
    return training_pb2.TrainingEvent(run_id=run_id, seq=seq, heartbeat=training_pb2.Heartbeat())


async def test_a_full_queue_drops_only_its_subscriber() -> None:
    fanout = EventFanout(queue_size=3)
    with fanout.subscribe(RUN) as slow, fanout.subscribe(RUN) as fast:
        received = []
        for seq in range(1, 8):
            fanout.publish(event(seq))
            received.append((await fast.next()).seq)  # type: ignore[union-attr]
        assert received == list(range(1, 8))
        assert slow.dropped and fanout.subscribers(RUN) == 1
        with pytest.raises(SubscriberTooSlow):
            await slow.next()


async def test_events_go_only_to_their_run() -> None:
    fanout = EventFanout()
    with fanout.subscribe(RUN) as mine:
        fanout.publish(event(1, "run-20260131-142501"))
        fanout.publish(event(1))
        got = await mine.next()
        assert got is not None and got.run_id == RUN
    assert fanout.subscribers(RUN) == 0  # leaving the block unsubscribes


async def test_close_ends_a_waiting_subscriber_and_refuses_new_ones() -> None:
    fanout = EventFanout()
    subscription = fanout.subscribe(RUN)
    waiting = asyncio.create_task(subscription.next())
    await asyncio.sleep(0)
    fanout.close()
    assert await asyncio.wait_for(waiting, 1) is None
    late = fanout.subscribe(RUN)
    assert late.closed and await late.next() is None


async def test_events_already_sent_from_the_store_do_not_count_against_the_queue() -> None:
    fanout = EventFanout(queue_size=3)
    with fanout.subscribe(RUN) as catching_up:
        for seq in range(1, 4):
            fanout.publish(event(seq))
        catching_up.sent = 3  # meanwhile read from the store and sent: stale in the queue
        for seq in range(4, 7):
            fanout.publish(event(seq))
        assert not catching_up.dropped
        received = [await catching_up.next() for _ in range(3)]
        assert [e.seq for e in received if e is not None] == [4, 5, 6]
        for seq in range(7, 11):  # ... but a subscriber that does not read is still dropped
            fanout.publish(event(seq))
        assert catching_up.dropped
        with pytest.raises(SubscriberTooSlow):
            await catching_up.next()
