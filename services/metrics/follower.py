"""Follows the training service's global event stream into the metrics store, resuming from the
cursor committed with the last batch, so neither side's restart leaves a gap or a duplicate.

Batching is group commit: a batch is whatever has arrived when the previous write finishes (at
most `batch_max` events, waiting at most `linger` for more), so a quiet stream is written event
by event with no added latency and a busy one in large transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

from services.api import training_pb2, training_pb2_grpc
from services.api.codec import format_timestamp
from services.api.runtime import admin_token, bearer, client_channel
from services.metrics.catalog import RunCatalog
from services.metrics.records import SOURCE_TRAINING, RunRecord, record_from_run

log = logging.getLogger("oneseek.metrics.follower")


@dataclass(frozen=True)
class _Ended:
    """The reader's last item: the stream ended, cleanly or with `error`."""

    error: Exception | None


class TrainingFollower:
    """Owns one channel to the training service; `run()` follows it until cancelled."""

    def __init__(
        self,
        training_addr: str,
        catalog: RunCatalog,
        *,
        batch_max: int = 256,
        linger: float = 0.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 1.0,
        lookup_timeout: float = 2.0,
        root_certificates: bytes | None = None,
    ) -> None:
        self.training_addr = training_addr
        self.catalog = catalog
        self.batch_max = batch_max
        self.linger = linger
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.lookup_timeout = lookup_timeout
        self.cursor = 0
        self._delay = backoff_initial
        # TLS trusting `root_certificates` when given, plaintext otherwise
        self._channel = client_channel(training_addr, root_certificates)
        self._stub = training_pb2_grpc.TrainingServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(None)

    # ---- asking about one run ---------------------------------------------------------------

    async def lookup_run(self, run_id: str) -> training_pb2.Run | None:
        """GetRun, or None when the training service does not know the run or cannot answer."""
        try:
            return await self._stub.GetRun(
                training_pb2.GetRunRequest(run_id=run_id),
                timeout=self.lookup_timeout,
                metadata=bearer(admin_token()),
            )
        except aio.AioRpcError as error:
            # NOT_FOUND is an answer; UNAVAILABLE is already logged by the stream
            if error.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                log.warning(
                    "GetRun failed run_id=%s code=%s details=%s",
                    run_id,
                    error.code().name,
                    error.details(),
                )
            return None

    # ---- following --------------------------------------------------------------------------

    async def run(self) -> None:
        """Follows the stream forever: reconnects with exponential backoff (reset by every
        message received). Only cancellation ends it."""
        self.cursor = await self.catalog.cursor()
        failures = 0
        while True:
            try:
                await self._follow_once()
                log.info("training stream ended addr=%s cursor=%d", self.training_addr, self.cursor)
            except aio.AioRpcError as error:
                failures = 1 if self._delay == self.backoff_initial else failures + 1
                # the first failure and then one in ten: a service that is down for an hour
                # should not fill the log
                log.log(
                    logging.WARNING if failures % 10 == 1 else logging.DEBUG,
                    "training stream lost addr=%s cursor=%d code=%s details=%s attempt=%d "
                    "retry_in=%.1fs",
                    self.training_addr,
                    self.cursor,
                    error.code().name,
                    error.details(),
                    failures,
                    self._delay,
                )
            except Exception:
                # a store failure: nothing past the committed cursor is lost, so start over
                log.exception("following the training stream failed cursor=%d", self.cursor)
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, self.backoff_max)

    async def _follow_once(self) -> None:
        # wait_for_ready: while the service is down the call waits for the channel, which
        # reconnects within a second of its return, instead of failing at once
        call = self._stub.StreamEvents(
            training_pb2.StreamEventsRequest(after_cursor=self.cursor),
            metadata=bearer(admin_token()),
            wait_for_ready=True,
        )
        inbox: asyncio.Queue[training_pb2.TrainingEvent | _Ended] = asyncio.Queue(
            4 * self.batch_max
        )
        reader = asyncio.create_task(self._read(call, inbox), name="metrics-follower-reader")
        try:
            while True:
                batch, ended = await self._next_batch(inbox)
                if batch:
                    await self._commit(batch)
                if ended is not None:
                    if ended.error is not None:
                        raise ended.error
                    return
        finally:
            call.cancel()
            reader.cancel()
            # gather hands back the reader's own CancelledError as a value, but raises ours
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(
        self,
        call: aio.UnaryStreamCall[training_pb2.StreamEventsRequest, training_pb2.TrainingEvent],
        inbox: asyncio.Queue[training_pb2.TrainingEvent | _Ended],
    ) -> None:
        """Moves the stream into `inbox` (bounded: a slow store slows the stream, through gRPC
        flow control) and ends it with an _Ended carrying the stream's error, if any."""
        first = True
        try:
            async for event in call:
                if first:
                    log.info(
                        "following training stream addr=%s after_cursor=%d",
                        self.training_addr,
                        self.cursor,
                    )
                    first = False
                self._delay = self.backoff_initial
                await inbox.put(event)
        except Exception as error:  # CancelledError is not an Exception: it propagates
            await inbox.put(_Ended(error))
        else:
            await inbox.put(_Ended(None))

    async def _next_batch(
        self, inbox: asyncio.Queue[training_pb2.TrainingEvent | _Ended]
    ) -> tuple[list[training_pb2.TrainingEvent], _Ended | None]:
        """Waits for one event, then takes what else has arrived, up to batch_max (waiting at
        most `linger` for more)."""
        batch: list[training_pb2.TrainingEvent] = []
        item = await inbox.get()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.linger
        while not isinstance(item, _Ended):
            batch.append(item)
            if len(batch) >= self.batch_max:
                return batch, None
            try:
                item = inbox.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return batch, None
                try:
                    item = await asyncio.wait_for(inbox.get(), remaining)
                except asyncio.TimeoutError:  # not the builtin one before Python 3.11
                    return batch, None
        return batch, item

    async def _commit(self, batch: Sequence[training_pb2.TrainingEvent]) -> None:
        # events at or before the committed cursor are already stored (a server replaying more
        # than it was asked for): skipping them keeps the cursor from moving backwards
        fresh = [event for event in batch if event.cursor > self.cursor]
        if not fresh:
            return
        new_runs = []
        for run_id in dict.fromkeys(event.run_id for event in fresh):
            if self.catalog.source(run_id) is None:
                new_runs.append(await self._record_for(run_id, fresh))
        cursor = max(event.cursor for event in fresh)
        await self.catalog.commit(fresh, cursor=cursor, new_runs=new_runs)
        self.cursor = cursor

    async def _record_for(
        self, run_id: str, batch: Sequence[training_pb2.TrainingEvent]
    ) -> RunRecord:
        run = await self.lookup_run(run_id)
        if run is not None:
            log.info("new run followed run_id=%s", run_id)
            return record_from_run(run)
        log.warning("new run without its config (GetRun gave no answer) run_id=%s", run_id)
        first = next(event for event in batch if event.run_id == run_id)
        stamp = format_timestamp(first.timestamp)
        return RunRecord(run_id=run_id, source=SOURCE_TRAINING, created_at=stamp, updated_at=stamp)
