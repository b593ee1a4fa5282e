"""The SQLite metrics store: idempotent batches, the cursor in the same transaction, reopening."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.api import training_pb2
from services.core.errors import InvalidInput
from services.metrics.records import SOURCE_EXTERNAL, RunRecord, record_from_run
from services.metrics.sqlite_store import SQLiteStore, sqlite_path
from services.metrics.store import default_db_url, open_store
from tests.metrics.sample_run import RUN_ID, run_events, run_message, three_epochs, with_cursors


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    opened = SQLiteStore(tmp_path / "var" / "metrics.db")
    await opened.open()
    yield opened
    await opened.close()


async def test_a_batch_is_stored_once_however_often_it_is_replayed(store: SQLiteStore) -> None:
    events = with_cursors(run_events(three_epochs()))
    record = record_from_run(run_message())
    first = await store.append_events(events[:10], cursor=10, runs=[record])
    assert [e.seq for e in first] == list(range(1, 11))
    # the follower crashed before it learned the batch was stored: the stream sends it again
    again = await store.append_events(events[5:], cursor=len(events), runs=[record])
    assert [e.seq for e in again] == list(range(11, len(events) + 1))
    stored = await store.events(RUN_ID)
    assert [e.seq for e in stored] == [e.seq for e in events]
    for original, back in zip(events, stored, strict=True):
        original.ClearField("cursor")
        assert back == original
    assert await store.cursor() == len(events)


async def test_the_run_row_follows_its_events(store: SQLiteStore) -> None:
    events = run_events(three_epochs())
    await store.append_events(events[:4], runs=[record_from_run(run_message())])
    running = await store.run(RUN_ID)
    assert running is not None
    assert (running.status, running.current_epoch, running.total_epochs) == ("running", 0, 3)
    assert running.last_seq == 4 and running.base_models == tuple(run_message().config.base_models)
    await store.append_events(events[4:])
    done = await store.run(RUN_ID)
    assert done is not None
    assert (done.status, done.current_epoch, done.last_seq) == ("completed", 3, len(events))
    assert done.best_model == "tiny-llama" and done.dna == "dna-v2:abc123"
    assert done.run_config() == run_message().config
    assert [m.name for m in done.model_infos()] == list(run_message().config.base_models)


async def test_events_and_cursor_commit_together_or_not_at_all(store: SQLiteStore) -> None:
    events = with_cursors(run_events(three_epochs()))
    await store.append_events(events[:3], cursor=3, runs=[record_from_run(run_message())])
    # the cursor write, the last statement of the transaction, fails after the events went in
    other = sqlite3.connect(store.path)
    other.execute(
        "CREATE TRIGGER refuse_cursor BEFORE UPDATE ON follower_cursor WHEN NEW.cursor = 5 "
        "BEGIN SELECT RAISE(ABORT, 'disk full'); END"
    )
    other.commit()
    other.close()
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        await store.append_events(events[3:5], cursor=5)
    assert [e.seq for e in await store.events(RUN_ID)] == [1, 2, 3]
    assert await store.cursor() == 3
    record = await store.run(RUN_ID)
    assert record is not None and record.last_seq == 3
    # the same batch goes in once the fault is gone
    assert len(await store.append_events(events[3:6], cursor=6)) == 3
    assert await store.cursor() == 6


async def test_an_event_that_cannot_be_encoded_stores_nothing(store: SQLiteStore) -> None:
    events = run_events(three_epochs())
    broken = training_pb2.TrainingEvent()
    broken.CopyFrom(events[1])
    broken.ClearField("payload")
    with pytest.raises(ValueError, match="no payload"):
        await store.append_events([events[0], broken], cursor=2)
    assert await store.events(RUN_ID) == [] and await store.cursor() == 0


async def test_everything_reads_back_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "metrics.db"
    first = await open_store(str(path))
    events = with_cursors(run_events(three_epochs()))
    await first.append_events(events, cursor=len(events), runs=[record_from_run(run_message())])
    await first.close()
    second = await open_store(f"sqlite:///{path}")
    try:
        assert await second.cursor() == len(events)
        assert len(await second.events(RUN_ID)) == len(events)
        assert [e.seq for e in await second.events(RUN_ID, after_seq=5, limit=3)] == [6, 7, 8]
        record = await second.run(RUN_ID)
        assert record is not None and record.status == "completed"
    finally:
        await second.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_runs_are_listed_newest_first_and_by_status(store: SQLiteStore) -> None:
    for second, status in ((1, "completed"), (3, "running"), (2, "failed")):
        run_id = f"run-20260131-14250{second}"
        await store.append_events(
            [],
            runs=[
                RunRecord(
                    run_id=run_id,
                    source=SOURCE_EXTERNAL,
                    status=status,
                    created_at=f"2026-01-31T14:25:0{second}.000Z",
                )
            ],
        )
    listed = await store.list_runs()
    assert [r.run_id[-1] for r in listed] == ["3", "2", "1"]
    assert [r.run_id[-1] for r in await store.list_runs(limit=2)] == ["3", "2"]
    assert [r.status for r in await store.list_runs("failed")] == ["failed"]
    assert await store.list_runs("stopped") == []


async def test_registering_a_run_twice_keeps_its_progress(store: SQLiteStore) -> None:
    record = record_from_run(run_message())
    await store.append_events(run_events(three_epochs()), runs=[record])
    await store.append_events([], runs=[record])  # a late GetRun answer for the same run
    again = await store.run(RUN_ID)
    assert again is not None and again.status == "completed" and again.current_epoch == 3


def test_database_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sqlite_path("sqlite:///var/metrics.db") == "var/metrics.db"
    assert sqlite_path("sqlite:////srv/metrics.db") == "/srv/metrics.db"
    assert sqlite_path("/srv/metrics.db") == "/srv/metrics.db"
    with pytest.raises(InvalidInput, match="names no file"):
        sqlite_path("sqlite://")
    monkeypatch.delenv("ONESEEK_DB_URL", raising=False)
    monkeypatch.setenv("ONESEEK_STATE_DIR", "/tmp/oneseek-state")
    assert default_db_url() == "sqlite:////tmp/oneseek-state/metrics.db"
    monkeypatch.delenv("ONESEEK_STATE_DIR")
    assert default_db_url() == "sqlite:///var/metrics.db"
    monkeypatch.setenv("ONESEEK_DB_URL", "sqlite:///elsewhere.db")
    assert default_db_url() == "sqlite:///elsewhere.db"


async def test_postgresql_is_refused_without_echoing_the_password() -> None:
    with pytest.raises(InvalidInput, match="PostgreSQL is not available yet") as caught:
        await open_store("postgresql://user:s3cret@db.example/metrics")
    assert "s3cret" not in str(caught.value)
    with pytest.raises(InvalidInput, match="Unsupported database URL scheme 'mysql'"):
        await open_store("mysql://db/metrics")
