"""The catalog's ordering guarantees: a state loaded while events keep arriving misses none, a run
the training service has just started is known before its first event, and outside reports
never shadow a training run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.api import metrics_pb2, training_pb2
from services.api.run_state import fold
from services.metrics.catalog import RunCatalog
from services.metrics.fanout import EventFanout
from services.metrics.records import record_from_run
from services.metrics.reports import ReportRefused
from services.metrics.sqlite_store import SQLiteStore
from tests.metrics.sample_run import RUN_ID, run_events, run_message, three_epochs


class GatedStore(SQLiteStore):
    """Event reads wait at a gate, so a test can commit while a state is being loaded."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = asyncio.Event()
        self.gate.set()
        self.reading = asyncio.Event()

    async def events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[training_pb2.TrainingEvent]:
        page = await super().events(run_id, after_seq, limit)
        self.reading.set()
        await self.gate.wait()
        return page


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[GatedStore]:
    opened = GatedStore(tmp_path / "metrics.db")
    await opened.open()
    yield opened
    await opened.close()


async def test_a_state_loaded_while_events_arrive_misses_none(store: GatedStore) -> None:
    events = run_events(three_epochs())
    catalog = RunCatalog(store, EventFanout())
    await catalog.commit(events[:5], new_runs=[record_from_run(run_message())])
    store.gate.clear()
    loading = asyncio.create_task(catalog.state(RUN_ID))
    await store.reading.wait()  # the first page (seq 1-5) is read, not yet applied
    await catalog.commit(events[5:9])  # published while the state is not cached yet
    store.gate.set()
    state = await loading
    assert state is not None and state.last_seq == 9
    expected = fold(record_from_run(run_message()).state(), events[:9])
    assert state.metrics() == expected.metrics()
    await catalog.commit(events[9:])
    assert state.last_seq == len(events) and state.status == "completed"


async def test_a_just_started_run_is_looked_up_on_the_training_service(store: GatedStore) -> None:
    asked: list[str] = []

    async def lookup(run_id: str) -> training_pb2.Run | None:
        asked.append(run_id)
        return run_message() if run_id == RUN_ID else None

    catalog = RunCatalog(store, EventFanout(), lookup=lookup)
    state = await catalog.state(RUN_ID)
    assert state is not None and state.status == "running" and state.total_epochs == 3
    assert await catalog.state("run-20990101-000000") is None
    assert await catalog.state(RUN_ID) is state
    assert asked == [RUN_ID, "run-20990101-000000"]
    record = await store.run(RUN_ID)
    assert record is not None and record.source == "training"
    # an outside process cannot report under its id
    with pytest.raises(ReportRefused, match="trained by the training service"):
        await catalog.report(
            metrics_pb2.ReportMetricsRequest(run_id=RUN_ID, epoch=1, val_losses={"a": 1.0})
        )


async def test_a_report_under_an_id_the_training_service_owns_is_refused_before_any_event(
    store: GatedStore,
) -> None:
    async def lookup(run_id: str) -> training_pb2.Run | None:
        return run_message(run_id)

    catalog = RunCatalog(store, EventFanout(), lookup=lookup)
    request = metrics_pb2.ReportMetricsRequest(run_id=RUN_ID, epoch=1, val_losses={"a": 1.0})
    with pytest.raises(ReportRefused):
        await catalog.report(request)
    assert await store.events(RUN_ID) == []
    # its events, when they come, are taken
    await catalog.commit(run_events(three_epochs()[:1], ending="running"))
    assert len(await store.events(RUN_ID)) > 0


async def test_training_events_under_an_outside_run_id_are_not_merged_into_it(
    store: GatedStore,
) -> None:
    catalog = RunCatalog(store, EventFanout())
    request = metrics_pb2.ReportMetricsRequest(run_id=RUN_ID, epoch=1, val_losses={"a": 1.0})
    assert await catalog.report(request) == 1
    inserted = await catalog.commit(run_events(three_epochs()), cursor=7)
    assert inserted == []
    assert [e.seq for e in await store.events(RUN_ID)] == [1]
    assert await store.cursor() == 7  # the stream still moves on
