"""Where the metrics service keeps runs, events and its follower cursor: the `MetricsStore`
protocol, and its SQLite implementation (one connection, owned by one thread).

The protocol is async so that a PostgreSQL store (asyncpg, several replicas sharing one database,
DESIGN.md section 10) can stand behind it later without touching the service.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

from services.api import training_pb2
from services.api.codec import event_from_dict, event_to_dict, format_timestamp
from services.core.errors import InvalidInput
from services.core.ledger import state_dir
from services.metrics.records import SOURCE_TRAINING, RunRecord

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id        TEXT PRIMARY KEY,
    source        TEXT NOT NULL CHECK (source IN ('training', 'external')),
    status        TEXT NOT NULL,
    dataset_id    TEXT NOT NULL DEFAULT '',
    base_models   TEXT NOT NULL DEFAULT '[]',
    config        TEXT,
    models        TEXT NOT NULL DEFAULT '[]',
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    current_epoch INTEGER NOT NULL DEFAULT 0,
    total_epochs  INTEGER NOT NULL DEFAULT 0,
    best_model    TEXT,
    dna           TEXT,
    last_seq      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_newest ON runs (created_at DESC, run_id DESC);
CREATE TABLE IF NOT EXISTS events (
    run_id    TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    type      TEXT NOT NULL,
    timestamp TEXT NOT NULL,
    payload   TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS follower_cursor (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    cursor INTEGER NOT NULL
);
"""
_RUN_COLUMNS = (
    "run_id, source, status, dataset_id, base_models, config, models, created_at, updated_at, "
    "current_epoch, total_epochs, best_model, dna, last_seq"
)


class MetricsStore(Protocol):
    """Everything the metrics service persists. Every method is safe to call from the event loop:
    implementations do their I/O off it."""

    async def append_events(
        self,
        events: Sequence[training_pb2.TrainingEvent],
        *,
        cursor: int | None = None,
        runs: Sequence[RunRecord] = (),
    ) -> list[training_pb2.TrainingEvent]:
        """In one transaction: create the rows of `runs` (an existing row only gains a config or
        models it lacked), insert `events` (one already stored under its (run_id, seq) is
        skipped), move each run's summary, and set the follower cursor when given.
        Returns the events that were new, in the order given."""
        ...

    async def events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[training_pb2.TrainingEvent]:
        """The run's events with seq > after_seq, in seq order, at most `limit`."""
        ...

    async def run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(self, status: str | None = None, limit: int = 0) -> list[RunRecord]:
        """Runs newest first (by created_at, then run id); only `status` when given; 0 = all."""
        ...

    async def cursor(self) -> int:
        """The follower's position in the training service's global stream (0 at first)."""
        ...

    async def close(self) -> None: ...


def default_db_url() -> str:
    """ONESEEK_DB_URL, else a SQLite file under the suite's state folder (var/ by default)."""
    configured = os.environ.get("ONESEEK_DB_URL")
    if configured:
        return configured
    return f"sqlite:///{state_dir() / 'metrics.db'}"


def sqlite_path(db_url: str) -> str:
    """The file a SQLite URL names. As in SQLAlchemy: `sqlite:///var/metrics.db` is relative,
    `sqlite:////srv/metrics.db` absolute, `sqlite:///:memory:` in memory; a plain path is a path.
    """
    if "://" not in db_url:
        path = db_url
    elif db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///") :]
    else:
        path = ""
    if not path:
        raise InvalidInput(
            "The SQLite URL names no file: use sqlite:///var/metrics.db (relative), "
            "sqlite:////absolute/path/metrics.db or a plain file path.",
            field="db_url",
        )
    return path


async def open_store(db_url: str) -> MetricsStore:
    """The store a database URL names: `sqlite:///path` or a plain path today."""
    scheme = db_url.split("://", 1)[0].lower() if "://" in db_url else ""
    if scheme in ("postgresql", "postgres"):
        # the URL is not repeated: it may carry a password
        raise InvalidInput(
            "PostgreSQL is not available yet as a metrics store (the store protocol is ready "
            "for it, DESIGN.md section 10); set ONESEEK_DB_URL / --db-url to "
            "sqlite:///path/to/metrics.db for now.",
            field="db_url",
        )
    if scheme not in ("", "sqlite"):
        raise InvalidInput(
            f"Unsupported database URL scheme {scheme!r}: use sqlite:///path/to/metrics.db "
            "or a plain file path.",
            field="db_url",
        )
    store = SQLiteStore(sqlite_path(db_url))
    await store.open()
    return store


class SQLiteStore:
    """SQLite in WAL mode with synchronous=NORMAL: a commit survives a process crash and costs
    no fsync (a power cut may lose the last commits, which the follower then fetches again,
    because the cursor is committed with them). One connection, used only by one thread, so
    every call is serialised in submission order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False

    async def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise RuntimeError("the metrics store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._on_thread, work)

    def _on_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._db is None:
            raise RuntimeError("the metrics store is not open")
        return work(self._db)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=5000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            db.close()
            raise InvalidInput(
                f"The metrics database {self.path} has schema version {version}, newer than "
                f"this service understands ({SCHEMA_VERSION}); upgrade the service.",
                field="db_url",
            )
        db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._db = db

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._disconnect)
        self._executor.shutdown(wait=False)

    def _disconnect(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # ---- writes -----------------------------------------------------------------------------

    async def append_events(
        self,
        events: Sequence[training_pb2.TrainingEvent],
        *,
        cursor: int | None = None,
        runs: Sequence[RunRecord] = (),
    ) -> list[training_pb2.TrainingEvent]:
        batch = list(events)
        return await self._call(lambda db: _append(db, batch, cursor, runs))

    # ---- reads ------------------------------------------------------------------------------

    async def events(
        self, run_id: str, after_seq: int = 0, limit: int | None = None
    ) -> list[training_pb2.TrainingEvent]:
        def read(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT payload FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (run_id, after_seq, -1 if limit is None else limit),
            ).fetchall()
            return [row[0] for row in rows]

        payloads = await self._call(read)
        # decoding is CPU work on immutable text: off the loop, and off the database thread
        return await asyncio.to_thread(_decode, payloads)

    async def run(self, run_id: str) -> RunRecord | None:
        def read(db: sqlite3.Connection) -> RunRecord | None:
            row = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
            found = row.fetchone()
            return None if found is None else _record(found)

        return await self._call(read)

    async def list_runs(self, status: str | None = None, limit: int = 0) -> list[RunRecord]:
        def read(db: sqlite3.Connection) -> list[RunRecord]:
            where, params = ("WHERE status = ?", [status]) if status else ("", [])
            rows = db.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs {where} "
                "ORDER BY created_at DESC, run_id DESC LIMIT ?",
                (*params, limit if limit > 0 else -1),
            ).fetchall()
            return [_record(row) for row in rows]

        return await self._call(read)

    async def cursor(self) -> int:
        def read(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT cursor FROM follower_cursor WHERE id = 1").fetchone()
            return 0 if row is None else int(row[0])

        return await self._call(read)


# ---- what runs on the database thread -------------------------------------------------------

_EventRow = tuple[str, int, str, str, str]


def _event_row(event: training_pb2.TrainingEvent) -> _EventRow:
    data = event_to_dict(event)
    return (event.run_id, event.seq, data["type"], data["timestamp"], json.dumps(data))


def _decode(payloads: Sequence[str]) -> list[training_pb2.TrainingEvent]:
    return [event_from_dict(json.loads(payload)) for payload in payloads]


def _append(
    db: sqlite3.Connection,
    events: Sequence[training_pb2.TrainingEvent],
    cursor: int | None,
    runs: Sequence[RunRecord],
) -> list[training_pb2.TrainingEvent]:
    rows = [_event_row(event) for event in events]  # encoded before the write lock is taken
    inserted: list[training_pb2.TrainingEvent] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for record in runs:
            _upsert_run(db, record)
        for event, row in zip(events, rows, strict=True):
            done = db.execute(
                "INSERT OR IGNORE INTO events (run_id, seq, type, timestamp, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            )
            if done.rowcount == 1:
                inserted.append(event)
        _move_summaries(db, inserted)
        if cursor is not None:
            db.execute(
                "INSERT INTO follower_cursor (id, cursor) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
                (cursor,),
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return inserted


def _upsert_run(db: sqlite3.Connection, record: RunRecord) -> None:
    db.execute(
        f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({', '.join('?' * 14)}) "
        "ON CONFLICT (run_id) DO UPDATE SET "
        "config = COALESCE(runs.config, excluded.config), "
        "models = CASE WHEN runs.models = '[]' THEN excluded.models ELSE runs.models END, "
        "dataset_id = CASE WHEN runs.dataset_id = '' THEN excluded.dataset_id "
        "ELSE runs.dataset_id END, "
        "base_models = CASE WHEN runs.base_models = '[]' THEN excluded.base_models "
        "ELSE runs.base_models END",
        _record_row(record),
    )


def _move_summaries(db: sqlite3.Connection, events: Iterable[training_pb2.TrainingEvent]) -> None:
    by_run: dict[str, list[training_pb2.TrainingEvent]] = {}
    for event in events:
        by_run.setdefault(event.run_id, []).append(event)
    for run_id, run_events in by_run.items():
        found = db.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        row = found.fetchone()
        if row is None:
            # an event of a run nobody registered: keep it findable rather than drop it
            first = format_timestamp(run_events[0].timestamp)
            record = RunRecord(run_id=run_id, source=SOURCE_TRAINING, created_at=first)
            _upsert_run(db, replace(record, updated_at=first))
        else:
            record = _record(row)
        for event in run_events:
            record = record.with_changes(event)
        db.execute(
            "UPDATE runs SET status = ?, current_epoch = ?, total_epochs = ?, best_model = ?, "
            "dna = ?, last_seq = ?, updated_at = ? WHERE run_id = ?",
            (
                record.status,
                record.current_epoch,
                record.total_epochs,
                record.best_model,
                record.dna,
                record.last_seq,
                record.updated_at,
                run_id,
            ),
        )


def _record_row(record: RunRecord) -> tuple[Any, ...]:
    return (
        record.run_id,
        record.source,
        record.status,
        record.dataset_id,
        json.dumps(list(record.base_models)),
        None if record.config is None else json.dumps(record.config),
        json.dumps([dict(m) for m in record.models]),
        record.created_at,
        record.updated_at or record.created_at,
        record.current_epoch,
        record.total_epochs,
        record.best_model,
        record.dna,
        record.last_seq,
    )


def _record(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        run_id=row[0],
        source=row[1],
        status=row[2],
        dataset_id=row[3],
        base_models=tuple(json.loads(row[4])),
        config=None if row[5] is None else json.loads(row[5]),
        models=tuple(json.loads(row[6])),
        created_at=row[7],
        updated_at=row[8],
        current_epoch=row[9],
        total_epochs=row[10],
        best_model=row[11],
        dna=row[12],
        last_seq=row[13],
    )
