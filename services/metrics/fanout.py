"""Live fan-out of each run's events to its subscribers. Every subscriber has its own bounded
queue: one that falls behind is dropped (it resumes with after_seq) instead of slowing the
publisher or the other subscribers. Events the subscriber was already sent another way (from the
store, while it caught up) leave its queue first: they never count against it.
"""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

from services.api import training_pb2

DEFAULT_QUEUE_SIZE = 2048


class SubscriberTooSlow(Exception):
    """The subscriber's queue overflowed: it was dropped and should reconnect with after_seq."""


class Subscription:
    """One subscriber's queue of live events of one run; use as a context manager so it is
    always unregistered."""

    def __init__(self, fanout: EventFanout, run_id: str, queue_size: int) -> None:
        self.run_id = run_id
        self.queue_size = queue_size
        self.dropped = False
        self.closed = False
        self.sent = 0
        """The last seq the subscriber was sent from the store: queued events up to it are
        stale (a subscriber catching up must not be dropped for events it already has)."""
        self._fanout = fanout
        self._events: collections.deque[training_pb2.TrainingEvent] = collections.deque()
        self._wake = asyncio.Event()  # set when there is something to see: an event or a flag

    def offer(self, event: training_pb2.TrainingEvent) -> bool:
        """Queues `event` without waiting; False (and the subscriber is dropped) when full."""
        if self.dropped or self.closed:
            return False
        events = self._events
        while events and events[0].seq <= self.sent:
            events.popleft()
        if len(events) >= self.queue_size:
            self.dropped = True
            events.clear()
        else:
            events.append(event)
        self._wake.set()
        return not self.dropped

    def close(self) -> None:
        """Ends the subscription cleanly (the service is shutting down)."""
        self.closed = True
        self._wake.set()

    async def next(self) -> training_pb2.TrainingEvent | None:
        """The next live event; None once closed; SubscriberTooSlow once dropped."""
        while True:
            if self.dropped:
                raise SubscriberTooSlow(self.run_id)
            if self.closed:
                return None
            if self._events:
                return self._events.popleft()
            self._wake.clear()
            await self._wake.wait()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._fanout.unsubscribe(self)


class EventFanout:
    """run id -> its live subscribers. Publishing never waits."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self.queue_size = queue_size
        self.closed = False
        self._subscribers: dict[str, set[Subscription]] = {}

    def subscribe(self, run_id: str) -> Subscription:
        subscription = Subscription(self, run_id, self.queue_size)
        if self.closed:
            subscription.close()
        else:
            self._subscribers.setdefault(run_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.run_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.run_id]

    def subscribers(self, run_id: str) -> int:
        return len(self._subscribers.get(run_id, ()))

    def publish(self, event: training_pb2.TrainingEvent) -> list[Subscription]:
        """Offers `event` to every subscriber of its run; returns the ones dropped by it."""
        dropped = []
        for subscription in list(self._subscribers.get(event.run_id, ())):
            if not subscription.offer(event):
                dropped.append(subscription)
                self.unsubscribe(subscription)
        return dropped

    def close(self) -> None:
        """Ends every subscription and refuses new ones (shutdown)."""
        self.closed = True
        for subscribers in list(self._subscribers.values()):
            for subscription in list(subscribers):
                subscription.close()
        self._subscribers.clear()
