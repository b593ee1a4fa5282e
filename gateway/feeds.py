"""Live feeds of runs for websocket clients: one upstream `MetricsService.Subscribe` stream per
run, shared by every client of that run.

A `RunFeed` keeps its run's events in memory, each encoded once as the websocket frame every
client receives, and folds them with the metrics service's own `RunState`, so a client's
`initial_state` (or its `since` replay) and the live events that follow meet exactly at one seq:
both are taken from the feed with no await in between. If the upstream stream breaks (the
metrics service restarted), the feed subscribes again after its last seq, with backoff; its
clients stay connected and miss nothing.

`RunFeeds` owns the feeds: it creates one on a run's first client, sends every feed's
heartbeat, retires a feed when it has had no client for a while, and closes everything on
shutdown.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Callable
from typing import Protocol

import grpc
from grpc import aio

from gateway.bodies import encode
from gateway.frames import text_frame
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream
from services.api import metrics_pb2, training_pb2
from services.api.codec import (
    event_to_dict,
    format_timestamp,
    message_to_dict,
    now_timestamp,
    run_status_name,
)
from services.api.run_state import RunState

log = logging.getLogger("oneseek.gateway.feeds")

GOING_AWAY = 1001
INTERNAL_ERROR = 1011


class Subscriber(Protocol):
    """A websocket client as a feed sees it. `offer` must never wait."""

    def offer(self, frame: bytes, seq: int | None, *, replay: bool = False) -> None:
        """Send or queue `frame`, a complete websocket frame (of event `seq`; None for a
        heartbeat). A replay is never refused as too much."""

    def skip_through(self, seq: int) -> None:
        """Drop later offers of events with seq <= `seq` (the client has them already)."""

    def end(self, code: int, reason: str) -> None:
        """Close the client's connection with `code` (1013 too slow, 1001 shutdown)."""


class FeedError(Exception):
    """A feed could not give a client its run (before the client was attached)."""

    code = "service_unavailable"


class RunUnknown(FeedError):
    code = "not_found"


class FeedUnavailable(FeedError):
    code = "service_unavailable"


class GatewayClosing(FeedError):
    code = "going_away"


_CLOSING = "The gateway is shutting down; reconnect in a moment."


def error_message(run_id: str | None, code: str, message: str) -> bytes:
    return encode(
        {
            "type": "error",
            "run_id": run_id,
            "seq": None,
            "timestamp": format_timestamp(now_timestamp()),
            "error": code,
            "message": message,
        }
    )


class RunFeed:
    """One run's events, its folded state, and the clients following it."""

    def __init__(
        self,
        run_id: str,
        upstream: Upstream,
        settings: GatewaySettings,
        on_event: Callable[[], None] = lambda: None,
    ) -> None:
        self.run_id = run_id
        self.on_event = on_event
        self.upstream = upstream
        self.settings = settings
        self.state: RunState | None = None
        self.subscribers: set[Subscriber] = set()
        self.waiting = 0
        """Clients waiting for the feed to become ready (it is not idle while they wait)."""
        self.idle_since: float | None = time.monotonic()
        self._seqs: list[int] = []
        self._frames: list[bytes] = []
        self._target_seq = 0
        self._snapshot_status: str | None = None
        self._initial: tuple[int, bytes] | None = None
        self._leaderboard: tuple[int, bytes] | None = None
        self._upstream_seq: int | None = None
        """The metrics service's seq when the current Subscribe stream began; None while there
        is no stream (the service is down): the feed's state may be stale then."""
        self.written = 0
        """The last seq this gateway stored for the run (a report it acknowledged): reads
        from the feed wait for the stream to bring it, so a reporter reads its own write."""
        self._broken = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name=f"feed-{run_id}")

    # ---- the clients' side --------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._broken or (self._ready.done() and self._ready.exception() is not None)

    @property
    def caught_up(self) -> bool:
        """Ready (caught up once with the metrics service) and not failed."""
        return self._ready.done() and not self.failed

    @property
    def last_seq(self) -> int:
        return self.state.last_seq if self.state is not None else 0

    async def ready(self, timeout: float) -> None:
        """Returns once the feed has caught up with the metrics service; FeedError if it
        cannot (unknown run, service down, or no answer within `timeout`)."""
        self.waiting += 1
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            raise FeedUnavailable(
                f"The metrics service did not send run {self.run_id} within {timeout:g} s; "
                "reconnect in a moment."
            ) from None
        finally:
            self.waiting -= 1

    def attach(self, subscriber: Subscriber, since: int | None) -> None:
        """Queues the client's first frames and adds it to the live fan-out, atomically: no
        event can fall between its replay and its first live frame.

        Without `since`: initial_state (everything up to the last seq), then live events.
        With `since`: exactly the events after `since`, then live events."""
        assert self.state is not None, "attach only after ready()"
        last = self.state.last_seq
        if since is None:
            subscriber.offer(self._initial_state(), last, replay=True)
        else:
            start = bisect.bisect_right(self._seqs, since)
            for seq, frame in zip(self._seqs[start:], self._frames[start:], strict=True):
                subscriber.offer(frame, seq, replay=True)
        # a `since` ahead of this feed (another gateway replica was further on): skip until it
        subscriber.skip_through(max(last, since or 0))
        self.subscribers.add(subscriber)
        self.idle_since = None

    def detach(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)
        if not self.subscribers:
            self.idle_since = time.monotonic()

    def _initial_state(self) -> bytes:
        """The initial_state frame at the current seq, encoded once for every client that
        connects before the next event."""
        assert self.state is not None
        last = self.state.last_seq
        if self._initial is None or self._initial[0] != last:
            event = self.state.initial_state(now_timestamp())
            self._initial = (last, text_frame(encode(event_to_dict(event))))
        return self._initial[1]

    def leaderboard_body(self) -> bytes | None:
        """GET …/leaderboard's JSON body at the current seq, encoded once per seq; None
        while the feed is not ready or has not yet received the run's last acknowledged
        report."""
        if self.state is None or not self._ready.done() or self.failed:
            return None
        last = self.state.last_seq
        # no stream (the service is down, its answer a 503) or not caught up with it yet
        if self._upstream_seq is None or last < max(self.written, self._upstream_seq):
            return None
        if self._leaderboard is None or self._leaderboard[0] != last:
            self._leaderboard = (last, encode(message_to_dict(self.state.leaderboard())))
        return self._leaderboard[1]

    def heartbeat(self) -> None:
        if self.state is None or not self.subscribers:
            return
        frame = text_frame(
            encode(
                {
                    "type": "heartbeat",
                    "run_id": self.run_id,
                    "seq": self.state.last_seq,
                    "timestamp": format_timestamp(now_timestamp()),
                }
            )
        )
        for subscriber in list(self.subscribers):
            subscriber.offer(frame, None)

    def end_all(self, code: int, reason: str) -> None:
        for subscriber in list(self.subscribers):
            subscriber.end(code, reason)
        self.subscribers.clear()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])  # unlike `await task`, never mistakes its end for ours
        if not self._ready.done():
            self._ready.set_exception(GatewayClosing(_CLOSING))
        # nobody may be waiting on a failed future any more; mark its exception as seen
        if self._ready.done() and not self._ready.cancelled():
            self._ready.exception()

    # ---- the upstream side --------------------------------------------------------------------

    def _fail(self, error: FeedError) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: waiters that left early must not warn

    def _receive(self, event: training_pb2.TrainingEvent) -> None:
        kind = event.WhichOneof("payload")
        if kind == "initial_state":
            self._upstream_seq = event.seq
            if self.state is None:
                self._start_state(event)
            return  # after a re-subscription the feed's own state is already further on
        if kind == "heartbeat" or self.state is None:
            return
        if event.seq != self.state.last_seq + 1 and event.seq > self.state.last_seq:
            log.warning(
                "seq gap run_id=%s expected=%d got=%d",
                self.run_id,
                self.state.last_seq + 1,
                event.seq,
            )
        if not self.state.apply(event):
            return  # already folded (a re-subscription's replay overlaps)
        self.on_event()
        frame = text_frame(encode(event_to_dict(event)))  # once, for every client
        self._seqs.append(event.seq)
        self._frames.append(frame)
        for subscriber in list(self.subscribers):
            subscriber.offer(frame, event.seq)
        self._check_ready()

    def _start_state(self, event: training_pb2.TrainingEvent) -> None:
        snapshot = event.initial_state
        self.state = RunState(
            self.run_id,
            config=snapshot.config if snapshot.HasField("config") else None,
            models=snapshot.models,
            # with no event yet, the snapshot is stamped with the run's creation time
            created_at=format_timestamp(event.timestamp) if event.seq == 0 else "",
            total_epochs=snapshot.metrics.total_epochs,
        )
        self._target_seq = event.seq
        self._snapshot_status = run_status_name(snapshot.metrics.status)
        self._check_ready()

    def _check_ready(self) -> None:
        if self._ready.done() or self.state is None or self.state.last_seq < self._target_seq:
            return
        # the metrics service's snapshot is the authority on the status at its seq (a status
        # can come from the run's record, e.g. a run registered before its first event)
        if self.state.last_seq == self._target_seq and self._snapshot_status:
            self.state.status = self._snapshot_status
        self._ready.set_result(None)
        log.info("feed ready run_id=%s seq=%d", self.run_id, self.state.last_seq)

    async def _run(self) -> None:
        try:
            await self._follow()
        except Exception:  # a bug here must not leave clients waiting on a silent feed
            log.exception("feed failed run_id=%s", self.run_id)
            self._broken = True
            self._fail(FeedUnavailable("The gateway's feed of this run failed; reconnect."))
            self.end_all(INTERNAL_ERROR, "The gateway's feed of this run failed; reconnect.")

    async def _follow(self) -> None:
        delay = self.settings.resubscribe_initial
        while True:
            request = metrics_pb2.SubscribeRequest(run_id=self.run_id, after_seq=self.last_seq)
            call = self.upstream.metrics_stub.Subscribe(request)
            try:
                async for event in call:
                    self._receive(event)
                    delay = self.settings.resubscribe_initial
                problem: FeedError = FeedUnavailable(
                    "The metrics service ended the run's stream (it is restarting); reconnect."
                )
            except aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    problem = RunUnknown(error.details() or f"Run {self.run_id} is not known.")
                else:
                    problem = FeedUnavailable(
                        f"The metrics service is unavailable ({self.settings.metrics_addr}: "
                        f"{error.code().name.lower()}); reconnect in a moment."
                    )
            finally:
                call.cancel()
                self._upstream_seq = None
            if not self._ready.done():
                self._fail(problem)
                return
            log.warning(
                "upstream stream lost run_id=%s last_seq=%d retry_in=%.1fs: %s",
                self.run_id,
                self.last_seq,
                delay,
                problem,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.settings.resubscribe_max)


class RunFeeds:
    """run id -> its feed; the owner of every feed task and of the heartbeat."""

    def __init__(
        self,
        upstream: Upstream,
        settings: GatewaySettings,
        on_event: Callable[[], None] = lambda: None,
    ) -> None:
        self.upstream = upstream
        self.settings = settings
        self.on_event = on_event
        """Called once for each new event any feed receives (the gateway's event counter)."""
        self.feeds: dict[str, RunFeed] = {}
        self.closed = False
        self._ticker: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick(), name="feeds-heartbeat")

    async def attach(self, run_id: str, subscriber: Subscriber, since: int | None) -> RunFeed:
        """Attaches `subscriber` to `run_id`'s feed (created if needed); FeedError if not."""
        if self.closed:
            raise GatewayClosing(_CLOSING)
        feed = self.feeds.get(run_id)
        if feed is None or feed.failed:
            feed = self.feeds[run_id] = RunFeed(run_id, self.upstream, self.settings, self.on_event)
        try:
            await feed.ready(self.settings.ready_timeout)
        except FeedError:
            if feed.failed and self.feeds.get(run_id) is feed and feed.waiting == 0:
                self._retire(feed)
            raise
        if self.closed:
            raise GatewayClosing(_CLOSING)
        feed.attach(subscriber, since)
        return feed

    async def leaderboard(self, run_id: str) -> bytes | None:
        """The run's leaderboard body from its feed (created if need be, and kept while it is
        asked for), so a GET costs no call to the metrics service; None when the feed cannot
        answer (unknown run, service down): the caller asks the service, which says why."""
        if self.closed:
            return None
        feed = self.feeds.get(run_id)
        if feed is None or feed.failed:
            feed = self.feeds[run_id] = RunFeed(run_id, self.upstream, self.settings, self.on_event)
        if not feed.subscribers:
            feed.idle_since = time.monotonic()  # a polled feed is not idle
        if feed.caught_up:  # the common case: no future, no timer per GET
            return feed.leaderboard_body()
        try:
            await feed.ready(min(self.settings.ready_timeout, self.settings.rpc_timeout))
        except FeedError:
            if feed.failed and self.feeds.get(run_id) is feed and feed.waiting == 0:
                self._retire(feed)
            return None
        return feed.leaderboard_body()

    def written(self, run_id: str, seq: int) -> None:
        """A report of `run_id` was stored under `seq` through this gateway."""
        feed = self.feeds.get(run_id)
        if feed is not None:  # a feed made later replays it before it is ready
            feed.written = max(feed.written, seq)

    def _retire(self, feed: RunFeed) -> None:
        if self.feeds.get(feed.run_id) is feed:
            del self.feeds[feed.run_id]
        task = asyncio.create_task(feed.close(), name=f"retire-{feed.run_id}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            now = time.monotonic()
            for feed in list(self.feeds.values()):
                feed.heartbeat()
                idle = feed.idle_since is not None and feed.waiting == 0
                if idle and now - (feed.idle_since or now) >= self.settings.feed_linger:
                    log.info("feed retired (no client) run_id=%s", feed.run_id)
                    self._retire(feed)

    async def close(self) -> None:
        """Shutdown: every client closed with 1001, every task cancelled and awaited."""
        self.closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.wait([self._ticker])
            self._ticker = None
        feeds = list(self.feeds.values())
        self.feeds.clear()
        for feed in feeds:
            feed.end_all(GOING_AWAY, "The gateway is shutting down; reconnect with since.")
        await asyncio.gather(*(feed.close() for feed in feeds), *self._retiring)
