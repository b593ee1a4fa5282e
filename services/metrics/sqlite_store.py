"""The SQLite metrics store: one connection owned by one thread, and group commit, so that
concurrent writers share transactions instead of queueing for one each.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from services.api import training_pb2
from services.api.codec import event_from_dict, event_to_dict
from services.api.run_state import summary_changes
from services.core.errors import InvalidInput
from services.metrics.records import SOURCE_TRAINING, MirrorPosition, RunRecord

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
CREATE TABLE IF NOT EXISTS mirror_positions (
    target      TEXT NOT NULL,
    run_id      TEXT NOT NULL,
    external_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    status      TEXT NOT NULL,
    PRIMARY KEY (target, run_id)
) WITHOUT ROWID;
"""
_RUN_COLUMNS = (
    "run_id, source, status, dataset_id, base_models, config, models, created_at, updated_at, "
    "current_epoch, total_epochs, best_model, dna, last_seq"
)


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


class SQLiteStore:
    """SQLite in WAL mode with synchronous=NORMAL: a commit survives a process crash and costs
    no fsync (a power cut may lose the last commits, which the follower then fetches again,
    because the cursor is committed with them). One connection, used only by one thread, so
    every call is serialised in submission order; appends that wait while the thread is busy
    are committed together in one transaction (group commit)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-sqlite")
        self._db: sqlite3.Connection | None = None
        self._closed = False
        # writes waiting for the database thread; it takes them all at once
        self._pending: list[_Append] = []
        self._pending_lock = threading.Lock()

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
        if self._closed:
            raise RuntimeError("the metrics store is closed")
        loop = asyncio.get_running_loop()
        write = _Append(list(events), cursor, list(runs), loop, loop.create_future())
        with self._pending_lock:
            self._pending.append(write)
            first = len(self._pending) == 1
        if first:  # else a commit job is queued already and will take this write along
            self._executor.submit(self._commit_pending)
        return await write.future

    def _commit_pending(self) -> None:
        """On the database thread: every write queued so far, in one transaction."""
        with self._pending_lock:
            group, self._pending = self._pending, []
        if self._db is None:
            outcomes: list[Any] = [RuntimeError("the metrics store is not open")] * len(group)
        else:
            outcomes = _append_group(self._db, group)
        for write, outcome in zip(group, outcomes, strict=True):
            write.loop.call_soon_threadsafe(_settle, write.future, outcome)

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

    # ---- mirrors (services/metrics/mlflow_mirror.py) ------------------------------------------

    async def mirror_backlog(self, target: str) -> list[tuple[RunRecord, MirrorPosition | None]]:
        def read(db: sqlite3.Connection) -> list[tuple[RunRecord, MirrorPosition | None]]:
            columns = ", ".join(f"r.{name.strip()}" for name in _RUN_COLUMNS.split(","))
            rows = db.execute(
                f"SELECT {columns}, m.external_id, m.seq, m.status FROM runs r "
                "LEFT JOIN mirror_positions m ON m.target = ? AND m.run_id = r.run_id "
                "WHERE m.run_id IS NULL OR r.last_seq > m.seq "
                "ORDER BY r.created_at, r.run_id",
                (target,),
            ).fetchall()
            backlog = []
            for row in rows:
                record = _record(row[:-3])
                external_id, seq, status = row[-3:]
                position = (
                    None
                    if external_id is None
                    else MirrorPosition(record.run_id, external_id, seq, status)
                )
                backlog.append((record, position))
            return backlog

        return await self._call(read)

    async def save_mirror_position(self, target: str, position: MirrorPosition) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO mirror_positions (target, run_id, external_id, seq, status) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (target, run_id) DO UPDATE SET "
                "external_id = excluded.external_id, seq = excluded.seq, "
                "status = excluded.status",
                (target, position.run_id, position.external_id, position.seq, position.status),
            )

        await self._call(write)


# ---- what runs on the database thread -------------------------------------------------------

_EventRow = tuple[str, int, str, str, str]


def _event_row(event: training_pb2.TrainingEvent) -> _EventRow:
    data = event_to_dict(event)
    return (event.run_id, event.seq, data["type"], data["timestamp"], json.dumps(data))


def _decode(payloads: Sequence[str]) -> list[training_pb2.TrainingEvent]:
    return [event_from_dict(json.loads(payload)) for payload in payloads]


@dataclass(frozen=True)
class _Append:
    events: list[training_pb2.TrainingEvent]
    cursor: int | None
    runs: list[RunRecord]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[training_pb2.TrainingEvent]]


def _settle(future: asyncio.Future[list[training_pb2.TrainingEvent]], outcome: Any) -> None:
    if future.done():  # its caller was cancelled; the write itself went ahead
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _append_group(db: sqlite3.Connection, group: Sequence[_Append]) -> list[Any]:
    """Each write's new events, or the exception that stopped it. A write that cannot be
    encoded fails alone; a database error fails the whole transaction, so every write in it."""
    outcomes: list[Any] = [None] * len(group)
    encoded: list[tuple[int, list[_EventRow]]] = []
    for index, write in enumerate(group):
        try:  # encoded before the write lock is taken
            encoded.append((index, [_event_row(event) for event in write.events]))
        except Exception as error:
            outcomes[index] = error
    if not encoded:
        return outcomes
    everything_new: list[tuple[training_pb2.TrainingEvent, str]] = []
    cursors = [c for i, _ in encoded if (c := group[i].cursor) is not None]
    db.execute("BEGIN IMMEDIATE")
    try:
        for index, rows in encoded:
            write = group[index]
            for record in write.runs:
                _upsert_run(db, record)
            new = []
            for event, row in zip(write.events, rows, strict=True):
                done = db.execute(
                    "INSERT OR IGNORE INTO events (run_id, seq, type, timestamp, payload) "
                    "VALUES (?, ?, ?, ?, ?)",
                    row,
                )
                if done.rowcount == 1:
                    new.append(event)
                    everything_new.append((event, row[3]))
            outcomes[index] = new
        _move_summaries(db, everything_new)
        if cursors:
            db.execute(
                "INSERT INTO follower_cursor (id, cursor) VALUES (1, ?) "
                "ON CONFLICT (id) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
                (max(cursors),),
            )
        db.execute("COMMIT")
    except BaseException as error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        for index, _ in encoded:
            outcomes[index] = error
    return outcomes


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


def _move_summaries(
    db: sqlite3.Connection, events: Iterable[tuple[training_pb2.TrainingEvent, str]]
) -> None:
    """One UPDATE per run for the summary columns its new events moved (`summary_changes`,
    the same rule RunState follows); the later event wins."""
    by_run: dict[str, dict[str, Any]] = {}
    for event, stamp in events:
        changes = by_run.setdefault(event.run_id, {"last_seq": 0, "updated_at": ""})
        changes.update(summary_changes(event))
        changes["last_seq"] = max(changes["last_seq"], event.seq)
        changes["updated_at"] = max(changes["updated_at"], stamp)
    for run_id, changes in by_run.items():
        moved = db.execute(
            _MOVE_SUMMARY,
            (*(changes.get(name) for name in _SUMMARY_COLUMNS), run_id),
        )
        if moved.rowcount == 0:
            # an event of a run nobody registered: keep it findable rather than drop it
            first = changes["updated_at"]
            _upsert_run(db, RunRecord(run_id, SOURCE_TRAINING, created_at=first))
            db.execute(
                _MOVE_SUMMARY,
                (*(changes.get(name) for name in _SUMMARY_COLUMNS), run_id),
            )


_MOVE_SUMMARY = (
    "UPDATE runs SET status = COALESCE(?, status), current_epoch = COALESCE(?, current_epoch), "
    "total_epochs = COALESCE(?, total_epochs), best_model = COALESCE(?, best_model), "
    "dna = COALESCE(?, dna), last_seq = MAX(last_seq, ?), updated_at = MAX(updated_at, ?) "
    "WHERE run_id = ?"
)
_SUMMARY_COLUMNS = (
    "status",
    "current_epoch",
    "total_epochs",
    "best_model",
    "dna",
    "last_seq",
    "updated_at",
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
