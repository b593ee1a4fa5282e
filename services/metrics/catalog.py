"""Every run the metrics service knows, and the one path by which events enter it: stored first
(with the follower cursor, in one transaction), then folded into the run's in-memory RunState,
then published to live subscribers. Reads of metrics and leaderboards never touch the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from services.api import metrics_pb2, training_pb2
from services.api.codec import format_timestamp, now_timestamp
from services.api.reports import check_report
from services.api.run_state import RunState
from services.metrics.fanout import EventFanout
from services.metrics.records import (
    SOURCE_EXTERNAL,
    SOURCE_TRAINING,
    RunRecord,
    record_from_run,
)
from services.metrics.reports import ReportRefused, plan_report
from services.metrics.store import MetricsStore

log = logging.getLogger("oneseek.metrics")

RunLookup = Callable[[str], Awaitable[training_pb2.Run | None]]
"""Asks the training service about a run: its Run, or None when it does not know it (or cannot
be asked)."""

PAGE_SIZE = 512


class RunCatalog:
    """Owns the RunState of each run in memory (loaded lazily from the store), and orders every
    write so that a subscriber sees each event exactly once: store, fold, publish."""

    def __init__(
        self, store: MetricsStore, fanout: EventFanout, *, lookup: RunLookup | None = None
    ) -> None:
        self.store = store
        self.fanout = fanout
        self.lookup = lookup
        self._sources: dict[str, str] = {}
        self._states: dict[str, RunState] = {}
        self._published: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.listeners: list[Callable[[], None]] = []
        """Called (with no argument, on the event loop) after every write that stored something,
        e.g. to wake the MLflow mirror, which then reads the store. Must never wait."""

    async def load(self) -> None:
        """Learns which runs exist (their states are loaded when first asked for)."""
        for record in await self.store.list_runs():
            self._sources[record.run_id] = record.source
            self._published[record.run_id] = record.last_seq

    def source(self, run_id: str) -> str | None:
        return self._sources.get(run_id)

    def _lock(self, run_id: str) -> asyncio.Lock:
        return self._locks.setdefault(run_id, asyncio.Lock())

    # ---- reading a run ----------------------------------------------------------------------

    async def state(self, run_id: str) -> RunState | None:
        """The run's state, or None when neither the store nor the training service knows it.

        A run the training service has started but whose first event has not arrived yet (its
        models are still loading) is registered from its GetRun answer, so its metrics exist
        from the moment it starts."""
        cached = self._states.get(run_id)
        if cached is not None:
            return cached
        # no lock for an unknown id: made-up ids must not leave anything behind
        if run_id not in self._sources and not await self._discover(run_id):
            return None
        async with self._lock(run_id):
            return await self._load(run_id)

    async def _load(self, run_id: str) -> RunState | None:
        """Folds the run's stored events into its state and caches it (lock held)."""
        cached = self._states.get(run_id)
        if cached is not None:
            return cached
        if run_id not in self._sources:
            return None
        record = await self.store.run(run_id)
        if record is None:
            return None
        state = record.state()
        # events committed while a page was being read are in the store but were published
        # before this state was cached: read until the state has caught up with them
        while True:
            page = await self.store.events(run_id, after_seq=state.last_seq, limit=PAGE_SIZE)
            for event in page:
                state.apply(event)
            if len(page) < PAGE_SIZE and state.last_seq >= self._published.get(run_id, 0):
                break
        self._states[run_id] = state
        return state

    async def _discover(self, run_id: str) -> bool:
        if self.lookup is None:
            return False
        run = await self.lookup(run_id)
        if run is None:
            return False
        await self.register([record_from_run(run)])
        log.info("run registered from the training service run_id=%s", run_id)
        return run_id in self._sources

    async def register(self, records: Sequence[RunRecord]) -> None:
        """Creates the rows of runs that have no event yet."""
        await self.store.append_events([], runs=records)
        for record in records:
            self._sources.setdefault(record.run_id, record.source)
        self._stored()

    async def events_after(self, run_id: str, after_seq: int) -> list[training_pb2.TrainingEvent]:
        """One page (at most PAGE_SIZE) of the run's stored events with seq > after_seq."""
        return await self.store.events(run_id, after_seq=after_seq, limit=PAGE_SIZE)

    async def list_runs(self, status: str | None, limit: int) -> list[RunRecord]:
        return await self.store.list_runs(status, limit)

    # ---- writing ----------------------------------------------------------------------------

    async def commit(
        self,
        events: Sequence[training_pb2.TrainingEvent],
        *,
        cursor: int | None = None,
        new_runs: Sequence[RunRecord] = (),
    ) -> list[training_pb2.TrainingEvent]:
        """Stores the training service's `events` (and the follower `cursor`) in one
        transaction, then folds and publishes the ones that were new."""
        accepted = []
        for event in events:
            if self._sources.get(event.run_id) == SOURCE_EXTERNAL:
                # the store would merge two different runs under one id: keep the first owner
                log.error(
                    "event dropped: run id already used by an outside process run_id=%s seq=%d",
                    event.run_id,
                    event.seq,
                )
                continue
            accepted.append(event)
        new_runs = [r for r in new_runs if self._sources.get(r.run_id) != SOURCE_EXTERNAL]
        inserted = await self.store.append_events(accepted, cursor=cursor, runs=new_runs)
        for record in new_runs:
            self._sources.setdefault(record.run_id, record.source)
        for event in inserted:
            self._sources.setdefault(event.run_id, SOURCE_TRAINING)
            event.ClearField("cursor")  # a position in the training service's stream only
            self._publish(event)
        if inserted or new_runs:
            self._stored()
        return inserted

    def _stored(self) -> None:
        for listener in self.listeners:
            listener()

    def _publish(self, event: training_pb2.TrainingEvent) -> None:
        """Folds and fans out one stored event (synchronously: no await between the two, so a
        subscriber's snapshot and its queue always agree)."""
        run_id = event.run_id
        previous = self._published.get(run_id, 0)
        if event.seq != previous + 1 and event.seq > previous:
            log.warning(
                "event seq gap run_id=%s expected_seq=%d got_seq=%d",
                run_id,
                previous + 1,
                event.seq,
            )
        self._published[run_id] = max(previous, event.seq)
        state = self._states.get(run_id)
        if state is not None:
            state.apply(event)
        for dropped in self.fanout.publish(event):
            log.warning("subscriber too slow, dropped run_id=%s seq=%d", dropped.run_id, event.seq)

    async def report(self, request: metrics_pb2.ReportMetricsRequest) -> int:
        """Stores an outside process's epoch report as events of its run; returns the seq of
        its epoch_end. Reports of one run are serialised, so seqs never collide."""
        check_report(request)
        run_id = request.run_id
        self._refuse_training_run(run_id)
        async with self._lock(run_id):
            state = await self._load(run_id)
            new_runs: list[RunRecord] = []
            if state is None:
                # asked once per new id: a run the training service owns must not be shadowed
                # by an outside report that arrives before the run's first event
                run = await self.lookup(run_id) if self.lookup is not None else None
                if run is not None:
                    await self.register([record_from_run(run)])
                    self._refuse_training_run(run_id)
                created = format_timestamp(now_timestamp())
                total = request.total_epochs if request.HasField("total_epochs") else 0
                record = RunRecord(
                    run_id=run_id,
                    source=SOURCE_EXTERNAL,
                    created_at=created,
                    updated_at=created,
                    total_epochs=total,
                )
                new_runs.append(record)
                state = record.state()
            plan = plan_report(state, request, now_timestamp())
            if not plan.events:
                return plan.seq
            stored = await self.store.append_events(plan.events, runs=new_runs)
            if len(stored) != len(plan.events):
                # another process writes to the same database: this state is stale
                self._states.pop(run_id, None)
                raise ReportRefused(
                    f"Run {run_id} was changed by another writer while this report was stored; "
                    "send the report again."
                )
            if new_runs:
                self._sources[run_id] = SOURCE_EXTERNAL
                self._states[run_id] = state
                log.info("outside run created run_id=%s", run_id)
            for event in plan.events:
                self._publish(event)
            self._stored()
            return plan.seq

    def _refuse_training_run(self, run_id: str) -> None:
        if self._sources.get(run_id) == SOURCE_TRAINING:
            raise ReportRefused(
                f"Run {run_id} is trained by the training service; only outside runs can be "
                "reported. Report your own run under a run id the training service does not use."
            )

    async def cursor(self) -> int:
        return await self.store.cursor()
